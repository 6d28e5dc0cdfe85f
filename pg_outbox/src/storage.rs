//! Writes one message in the configured storage form: a row of `outbox.messages` (`table`) or a
//! transactional logical decoding message (`wal`). Both are part of the caller's transaction, and
//! both are refused where an INSERT would be (read-only transaction, standby). The size rule is
//! `size.rs`; the message itself `message.rs`.

use crate::error;
use crate::guc::{Storage, STORAGE};
use crate::message::Message;
use crate::table::MessagesTable;
use crate::wal;
use pgrx::pg_sys;

/// Writes the messages of one SQL call.
pub enum Writer {
    /// `outbox.messages`, opened once per call.
    Table(MessagesTable),
    Wal,
}

impl Writer {
    /// `function` names the SQL function in errors.
    pub fn open(function: &'static str) -> Writer {
        // SAFETY: reads the transaction's read-only flag (true on a standby too).
        if unsafe { pg_sys::XactReadOnly } {
            let name = std::ffi::CString::new(function).expect("a function name has no NUL");
            // SAFETY: a NUL-terminated name; raises the executor's own ERROR (SQLSTATE 25006),
            // exactly as an INSERT would.
            unsafe { pg_sys::PreventCommandIfReadOnly(name.as_ptr()) };
        }
        match STORAGE.get() {
            Storage::Table => Writer::Table(MessagesTable::open(function)),
            Storage::Wal => {
                // SAFETY: reads a server setting fixed at start-up.
                if unsafe { pg_sys::wal_level } < pg_sys::WalLevel::WAL_LEVEL_LOGICAL as i32 {
                    error::raise(
                        pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                        "pg_outbox.storage = 'wal' needs wal_level = logical".into(),
                        "Set wal_level = logical in postgresql.conf and restart, or use pg_outbox.storage = 'table'.",
                    )
                }
                Writer::Wal
            }
        }
    }

    pub fn write(&self, message: &Message<'_>) {
        match self {
            Writer::Table(table) => table.insert(message),
            Writer::Wal => wal::emit(message),
        }
    }
}
