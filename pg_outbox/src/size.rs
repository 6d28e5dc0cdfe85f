//! The size rule: what the worker will send (the key's bytes, the JSON text of headers and
//! payload, or a binary payload's bytes) against `pg_outbox.max_message_size`, checked before
//! anything is written and, where it can be, before a TOASTed payload is read.

use crate::error;
use crate::guc::MAX_MESSAGE_SIZE;
use crate::jsonb::Jsonb;
use crate::varlena::Varlena;
use pgrx::pg_sys;

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
    headers_len: usize,
    payload: pg_sys::Datum,
    is_json: bool,
) {
    let (limit_bytes, _) = limit.bytes();
    // SAFETY: a non-NULL varlena datum; reads only its header (the raw size of a TOAST pointer
    // or compressed value; an in-line plain one's size is in its header).
    let stored = unsafe {
        let value = payload.cast_mut_ptr::<pg_sys::varlena>();
        if pgrx::varlena::varatt_is_4b_u(value) {
            pgrx::varlena::varsize_4b(value)
        } else {
            pg_sys::toast_raw_datum_size(payload)
        }
    } - pg_sys::VARHDRSZ;
    if is_json {
        if stored > limit_bytes.saturating_mul(STORED_PER_TEXT_BYTE) {
            refuse(function, limit, key_len(key), headers_len, stored);
        }
    } else {
        check_total(function, limit, key_len(key), headers_len, stored);
    }
}

/// The size rule, part two: what the worker sends, counted as the SQL install counts it: the
/// key's bytes, the JSON text of the headers and of the payload (a jsonb of a few kilobytes can
/// print as gigabytes), against the limit. Returns the payload's JSON text length.
pub fn check_json_size(
    function: &str,
    limit: SizeLimit,
    key: Option<&Varlena<'_>>,
    headers_len: usize,
    payload: &Jsonb,
) -> usize {
    let payload_len = payload.text_len();
    check_total(function, limit, key_len(key), headers_len, payload_len);
    payload_len
}

/// The headers' JSON text length, counted once per message for the size rule and the envelope.
pub fn headers_len(headers: &Jsonb) -> usize {
    if headers.is_empty_object() {
        2
    } else {
        headers.text_len()
    }
}

/// The size rule in a database whose encoding is not UTF-8, where what is sent is the text
/// converted to UTF-8 (pgoutput converts the table form's; the wal form converts its own): each
/// text must convert, or the walsender would fail on that row at every reconnect and nothing
/// after it would ever be delivered; and the limit counts the converted bytes (a LATIN1 `é` is
/// sent as 2). An ERROR names the first text that does not convert. Not called in a UTF-8
/// database, whose text is sent as it is stored.
pub fn check_converted_size(
    function: &str,
    limit: SizeLimit,
    key: Option<&Varlena<'_>>,
    headers: &Jsonb,
    payload: Result<&Jsonb, usize>,
) {
    let key = key.map_or(0, |k| k.to_utf8().len());
    let headers = if headers.is_empty_object() {
        2
    } else {
        headers.to_text().len()
    };
    let payload = match payload {
        Ok(json) => json.to_text().len(),
        // Binary: its bytes, as they are.
        Err(len) => len,
    };
    check_total(function, limit, key, headers, payload);
}

fn key_len(key: Option<&Varlena<'_>>) -> usize {
    key.map_or(0, |k| k.bytes.len())
}

fn check_total(function: &str, limit: SizeLimit, key: usize, headers: usize, payload: usize) {
    let size = key.saturating_add(headers).saturating_add(payload);
    if size > limit.bytes().0 {
        refuse(function, limit, key, headers, payload);
    }
}

fn refuse(function: &str, limit: SizeLimit, key: usize, headers: usize, payload: usize) -> ! {
    let (limit, name) = limit.bytes();
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
