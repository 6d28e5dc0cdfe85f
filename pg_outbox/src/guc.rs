//! The extension's settings (`pg_outbox.*`).

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::PostgresGucEnum;

/// Where `outbox.publish*` puts a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PostgresGucEnum)]
pub enum Storage {
    /// A row in `outbox.messages`, streamed by the `pg_outbox` publication.
    #[name = c"table"]
    Table,
    /// A transactional logical decoding message only: no row, no vacuum, no bloat.
    #[name = c"wal"]
    Wal,
}

pub static STORAGE: GucSetting<Storage> = GucSetting::<Storage>::new(Storage::Table);

/// How long `outbox.prune()` keeps rows of `outbox.messages`, in seconds.
pub static RETENTION: GucSetting<i32> = GucSetting::<i32>::new(86_400);

/// The largest message `outbox.publish*` accepts, in kB: key + headers + payload as stored.
pub static MAX_MESSAGE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(512);

/// The ceiling of `pg_outbox.max_message_size`, in kB (64 MB): with base64's 4/3 growth a wal
/// envelope stays far below the 1 GB that PostgreSQL can allocate and decode.
pub const MAX_MESSAGE_SIZE_CEILING_KB: i32 = 64 * 1024;

pub fn register() {
    GucRegistry::define_enum_guc(
        c"pg_outbox.storage",
        c"Where outbox.publish stores messages: 'table' (outbox.messages) or 'wal' (logical decoding message only).",
        c"Both forms are decoded by outbox-worker into the same message. Can be set per session, role or database.",
        &STORAGE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.retention",
        c"How long outbox.prune() keeps published rows of outbox.messages.",
        c"Rows older than this are deleted by outbox.prune(). Accepts units: '36h', '7d'.",
        &RETENTION,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.max_message_size",
        c"The largest message outbox.publish* accepts: key + headers + payload, as stored.",
        c"Larger messages are refused before anything is written. Keep it below the broker's limit (Kafka's message.max.bytes is about 1 MB by default); at most 64MB.",
        &MAX_MESSAGE_SIZE,
        1,
        MAX_MESSAGE_SIZE_CEILING_KB,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    // After this, a misspelt pg_outbox.* setting is an error instead of a silent placeholder.
    // SAFETY: called once from _PG_init with a static NUL-terminated prefix.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"pg_outbox".as_ptr()) };
}

/// `pg_outbox.retention` in seconds, for `outbox.prune()`. Calling a C function loads the
/// library, so the setting is always read as the GUC it is, never as an unchecked placeholder
/// string (whose meaning would depend on whether this session had published before).
#[pgrx::pg_extern(sql = r#"
CREATE FUNCTION outbox._retention_seconds() RETURNS integer STABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#)]
fn retention_seconds() -> i32 {
    RETENTION.get()
}
