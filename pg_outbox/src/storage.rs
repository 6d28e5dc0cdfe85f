//! Writes one message in the configured storage form: a row of `outbox.messages` (`table`) or a
//! transactional logical decoding message (`wal`). Both are part of the caller's transaction, and
//! both are refused where an INSERT would be (read-only transaction, standby) and above
//! `pg_outbox.max_message_size`.

use crate::error;
use crate::guc::{Storage, MAX_MESSAGE_SIZE, STORAGE};
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
    /// `pg_outbox.max_message_size`: every message, a redriven one too (a dead letter may have
    /// been written by hand: redrive applies publish's checks).
    Setting,
}

impl SizeLimit {
    /// The limit in bytes and its name for messages.
    fn bytes(self) -> (usize, &'static str) {
        let SizeLimit::Setting = self;
        let (kb, name) = (MAX_MESSAGE_SIZE.get(), "pg_outbox.max_message_size");
        (kb as usize * 1024, name)
    }
}

/// A jsonb value's binary form is never more than about 4.3 times its JSON text (`[0, 0, ...]`:
/// 13 bytes stored per 3 printed); with this margin, a JSON payload stored larger than this many
/// times the limit is over the limit without being read.
const STORED_PER_TEXT_BYTE: usize = 8;

/// The size rule, part one, before the payload is detoasted (a TOASTed value can be a gigabyte):
/// a binary payload is checked exactly (its uncompressed size is in its header), a JSON payload
/// is refused if its stored size alone rules it out. Part two is [`check_json_size`].
pub fn check_size(
    function: &str,
    limit: SizeLimit,
    key: Option<&Varlena<'_>>,
    headers: &Jsonb,
    payload: pg_sys::Datum,
    is_json: bool,
) {
    let (limit_bytes, _) = limit.bytes();
    // SAFETY: a non-NULL varlena datum; reads only its header (the raw size of a TOAST pointer).
    let stored = unsafe { pg_sys::toast_raw_datum_size(payload) } - pg_sys::VARHDRSZ;
    if is_json {
        if stored > limit_bytes.saturating_mul(STORED_PER_TEXT_BYTE) {
            refuse(function, limit, key, headers_size(headers), stored);
        }
    } else {
        check_total(function, limit, key, headers_size(headers), stored);
    }
}

/// The size rule, part two: what the worker sends, counted as the SQL install counts it: the
/// key's bytes, the JSON text of the headers and of the payload (a jsonb of a few kilobytes can
/// print as gigabytes), against the limit.
pub fn check_json_size(
    function: &str,
    limit: SizeLimit,
    key: Option<&Varlena<'_>>,
    headers: &Jsonb,
    payload: &Jsonb,
) {
    check_total(
        function,
        limit,
        key,
        headers_size(headers),
        payload.text_len(),
    );
}

fn headers_size(headers: &Jsonb) -> usize {
    if headers.is_empty_object() {
        2
    } else {
        headers.text_len()
    }
}

fn check_total(
    function: &str,
    limit: SizeLimit,
    key: Option<&Varlena<'_>>,
    headers: usize,
    payload: usize,
) {
    let size = key
        .map_or(0, |k| k.bytes.len())
        .saturating_add(headers)
        .saturating_add(payload);
    if size > limit.bytes().0 {
        refuse(function, limit, key, headers, payload);
    }
}

fn refuse(
    function: &str,
    limit: SizeLimit,
    key: Option<&Varlena<'_>>,
    headers: usize,
    payload: usize,
) -> ! {
    let (limit, name) = limit.bytes();
    let key = key.map_or(0, |k| k.bytes.len());
    let size = key.saturating_add(headers).saturating_add(payload);
    error::raise(
        pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        format!(
            "{function}: the message is {size} bytes (key {key}, headers {headers}, payload {payload}), \
             more than {name} ({limit} bytes)"
        ),
        "Brokers refuse large messages: store the large part elsewhere (a table, object storage) and publish a reference to it, \
         or raise pg_outbox.max_message_size (superuser, at most 64MB) together with the broker's limit.",
    )
}
