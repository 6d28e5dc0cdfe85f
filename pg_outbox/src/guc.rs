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
    // After this, a misspelt pg_outbox.* setting is an error instead of a silent placeholder.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"pg_outbox".as_ptr()) };
}
