//! The names every outbox message carries on the wire, for outbox-worker (which writes them) and
//! for consumers (which read them): one definition, used by both.

/// The message's id (UUIDv7, stable across redelivery): the key for de-duplication.
pub const HEADER_ID: &str = "outbox-id";
/// The queue it was published to.
pub const HEADER_QUEUE: &str = "outbox-queue";
/// When it was published, RFC 3339 with microseconds, UTC.
pub const HEADER_CREATED_AT: &str = "outbox-created-at";
/// Who redrove the message from the dead letters (`outbox.redrive`: the operator's login role).
/// Reserved: only pg_outbox sets it, so a consumer can tell a redriven message from a first
/// delivery.
pub const HEADER_REDRIVEN_BY: &str = "outbox-redriven-by";
/// When `outbox-worker replay` sent the message again (RFC 3339): a replayed message is a new
/// delivery on purpose, even to a sink that delivers exactly once, and says so.
pub const HEADER_REPLAYED_AT: &str = "outbox-replayed-at";
/// Header names publishers may not use (compared without case).
pub const RESERVED_HEADER_PREFIX: &str = "outbox-";
