//! The `wal` storage form: one transactional logical decoding message per outbox message (the
//! envelope of `envelope.rs`), written with `LogLogicalMessage` directly. That is why
//! `pg_logical_emit_message` can be revoked from PUBLIC at install without affecting publish.

use crate::envelope::{self, Envelope};
use crate::error;
use crate::jsonb::Jsonb;
use crate::message::{Message, Payload};
use crate::varlena::database_is_utf8;
use pgrx::pg_sys;

thread_local! {
    /// The last `created_at` formatted: every message of a transaction has the same one.
    static CREATED_AT: std::cell::RefCell<(pg_sys::TimestampTz, String)> =
        const { std::cell::RefCell::new((i64::MIN, String::new())) };
}

fn created_at_text(timestamp: pg_sys::TimestampTz) -> String {
    CREATED_AT.with_borrow_mut(|(cached_at, text)| {
        if *cached_at != timestamp {
            *text = envelope::rfc3339(timestamp);
            *cached_at = timestamp;
        }
        text.clone()
    })
}

/// Appends `json`'s text to the envelope; in a UTF-8 database it is UTF-8 (the server validated
/// every string on input), checked here all the same: the worker must be able to parse it.
fn print_utf8(json: &Jsonb, out: &mut Vec<u8>) {
    let start = out.len();
    json.print_text(out);
    if std::str::from_utf8(&out[start..]).is_err() {
        error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            "pg_outbox: a JSON value is not valid UTF-8".into(),
            "Messages are delivered as UTF-8: publish text that UTF-8 can represent.",
        );
    }
}

/// Whatever `pg_outbox.max_message_size` says, no envelope may come near the 1 GB PostgreSQL can
/// allocate: a JSON text can be far longer than its binary form (e.g. numbers with huge scales),
/// and a WAL record the walsender cannot read stops the slot for good.
const ENVELOPE_CEILING: usize = 256 * 1024 * 1024;

// SAFETY: PostgreSQL's declaration of LogLogicalMessage (replication/message.h) for each major;
// pgrx's bindings do not export it.
unsafe extern "C-unwind" {
    #[cfg(not(any(feature = "pg17", feature = "pg18")))]
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
        flush: bool,
    ) -> pg_sys::XLogRecPtr;
}

const PREFIX: &std::ffi::CStr = c"pg_outbox";
const _: () = assert!(PREFIX.to_bytes().len() == envelope::PREFIX.len());

pub fn emit(message: &Message<'_>) {
    if matches!(&message.payload, Payload::Json { value, .. } if value.is_json_null()) {
        // outbox-worker (0.2) reads `"payload":null` as no payload and quarantines the message:
        // refused here, so that every message publish accepts is delivered as published.
        error::invalid(
            "pg_outbox: a JSON null payload cannot be published with pg_outbox.storage = 'wal'".into(),
            "Publish it with pg_outbox.storage = 'table' (the default), or wrap the value, e.g. '{\"value\": null}'.",
        );
    }
    // In a UTF-8 database (the usual case) the JSON text is printed from the binary form
    // straight into the envelope; otherwise jsonb_out's text is converted to UTF-8 first.
    let utf8 = database_is_utf8();
    let headers_text;
    let print_headers = |out: &mut Vec<u8>| print_utf8(&message.headers, out);
    let headers = if message.headers.is_empty_object() {
        envelope::Json::Text("{}")
    } else if utf8 {
        envelope::Json::Printed {
            len: message.headers_text_len,
            print: &print_headers,
        }
    } else {
        headers_text = message.headers.to_text();
        envelope::Json::Text(&headers_text)
    };
    let payload_text;
    let print_payload;
    let payload = match &message.payload {
        Payload::Json { value, text_len } if utf8 => {
            print_payload = |out: &mut Vec<u8>| print_utf8(value, out);
            envelope::Payload::Json(envelope::Json::Printed {
                len: *text_len,
                print: &print_payload,
            })
        }
        Payload::Json { value, .. } => {
            payload_text = value.to_text();
            envelope::Payload::Json(envelope::Json::Text(&payload_text))
        }
        Payload::Bytes(bytes) => envelope::Payload::Bytes(bytes.bytes),
    };
    let key = message.key.as_ref().map(|key| key.to_utf8());
    let queue = message.queue.to_utf8();
    let created_at = created_at_text(message.created_at);
    let envelope = Envelope {
        id: message.id,
        queue: &queue,
        key: key.as_deref(),
        created_at: &created_at,
        headers,
        payload,
    };
    let size = envelope.encoded_len_bound();
    if size > ENVELOPE_CEILING {
        error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "outbox.publish: the wal envelope of message {} would be {size} bytes, more than the ceiling of {ENVELOPE_CEILING}",
                message.id
            ),
            "The payload's JSON text is far longer than its binary form: publish a smaller payload.",
        );
    }
    // Fallible: a failed allocation on the Rust heap would abort the server (every connection
    // reset), so it is an ERROR instead.
    let Ok(content) = envelope.encode() else {
        error::raise(
            pgrx::PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY,
            format!(
                "outbox.publish: out of memory for the {size}-byte wal envelope of message {}",
                message.id
            ),
            "Publish a smaller message, or retry when the server has more memory free.",
        );
    };
    // Transactional: decoded only if the caller's transaction commits, in commit order.
    // SAFETY: prefix and content are valid for the call; LogLogicalMessage copies them into
    // WAL, and the guard turns a PostgreSQL ERROR into a Rust panic pgrx reports.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            #[cfg(not(any(feature = "pg17", feature = "pg18")))]
            LogLogicalMessage(
                PREFIX.as_ptr(),
                content.as_ptr().cast(),
                content.len(),
                true,
            );
            #[cfg(any(feature = "pg17", feature = "pg18"))]
            LogLogicalMessage(
                PREFIX.as_ptr(),
                content.as_ptr().cast(),
                content.len(),
                true,
                false,
            );
        });
    };
}
