//! Writes one message in the configured storage form: a row of `outbox.messages` (`table`) or a
//! transactional logical decoding message (`wal`). Both are part of the caller's transaction, and
//! both are refused where an INSERT would be (read-only transaction, standby) and above
//! `pg_outbox.max_message_size`.

use crate::error;
use crate::guc::{Storage, MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE_CEILING_KB, STORAGE};
use crate::jsonb::Jsonb;
use crate::table::MessagesTable;
use crate::varlena::Varlena;
use crate::wal;
use pgrx::pg_sys;

pub enum Payload<'a> {
    Json(Jsonb),
    Bytes(Varlena<'a>),
}

pub struct Message<'a> {
    pub id: uuid::Uuid,
    /// Validated: ASCII `[A-Za-z0-9._-]`.
    pub queue: Varlena<'a>,
    /// Server encoding.
    pub key: Option<Varlena<'a>>,
    pub headers: Jsonb,
    pub payload: Payload<'a>,
    pub created_at: pg_sys::TimestampTz,
}

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

/// Which size limit a publish is held to.
#[derive(Clone, Copy)]
pub enum SizeLimit {
    /// `pg_outbox.max_message_size`: every new message.
    Setting,
    /// The setting's ceiling (64 MB): a redriven message, accepted once already, which the
    /// operator re-publishes after raising the broker's limit.
    Ceiling,
}

/// Refuses a message larger than the limit: key + headers + payload, as stored (jsonb in its
/// binary form, bytea as its bytes). Reads sizes from the datums' headers, so a huge TOASTed
/// value is refused before it is detoasted.
pub fn check_size(
    function: &str,
    limit: SizeLimit,
    key: Option<&Varlena<'_>>,
    headers: pg_sys::Datum,
    payload: pg_sys::Datum,
) {
    let (limit, name) = match limit {
        SizeLimit::Setting => (MAX_MESSAGE_SIZE.get(), "pg_outbox.max_message_size"),
        SizeLimit::Ceiling => (
            MAX_MESSAGE_SIZE_CEILING_KB,
            "the ceiling of pg_outbox.max_message_size",
        ),
    };
    let limit = limit as usize * 1024;
    // SAFETY: both are non-NULL varlena datums (headers defaults to '{}', payload is required).
    let (headers, payload) = unsafe {
        (
            pg_sys::toast_raw_datum_size(headers) - pg_sys::VARHDRSZ,
            pg_sys::toast_raw_datum_size(payload) - pg_sys::VARHDRSZ,
        )
    };
    let size = key.map_or(0, |k| k.bytes.len()) + headers + payload;
    if size > limit {
        error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "{function}: the message is {size} bytes (key {}, headers {headers}, payload {payload}), \
                 more than {name} ({limit} bytes)",
                key.map_or(0, |k| k.bytes.len())
            ),
            "Brokers refuse large messages: store the large part elsewhere (a table, object storage) and publish a reference to it, \
             or raise pg_outbox.max_message_size (superuser, at most 64MB) together with the broker's limit.",
        );
    }
}
