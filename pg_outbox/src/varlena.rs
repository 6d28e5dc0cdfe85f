//! Varlena arguments (text, bytea) read once, and text in the server encoding converted to the
//! UTF-8 that envelopes and brokers use. The table form stores text datums as they are (pgoutput
//! converts them for the worker); the wal form writes bytes into WAL itself, so it must convert,
//! or a LATIN1 database would send mojibake.

use pgrx::pg_sys;
use std::borrow::Cow;

use crate::error;

/// A detoasted varlena datum (`text` in the server encoding, or `bytea`) and its bytes.
#[derive(Clone, Copy)]
pub struct Varlena<'a> {
    pub datum: pg_sys::Datum,
    pub bytes: &'a [u8],
}

impl<'a> Varlena<'a> {
    /// # Safety
    /// `datum` must be a non-NULL `text` (or other varlena) datum.
    pub unsafe fn from_datum(datum: pg_sys::Datum) -> Varlena<'a> {
        // SAFETY: a varlena datum (contract); detoasting returns a pointer valid for the
        // current memory context, which outlives the call that reads it.
        unsafe {
            let datum = pg_sys::Datum::from(pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr()));
            Varlena {
                datum,
                bytes: pgrx::varlena::varlena_to_byte_slice(datum.cast_mut_ptr()),
            }
        }
    }

    /// The text as UTF-8.
    pub fn to_utf8(self) -> Cow<'a, str> {
        server_to_utf8(self.bytes)
    }
}

/// Whether the database's encoding is UTF-8 (its text needs no conversion to be sent).
pub fn database_is_utf8() -> bool {
    // SAFETY: reads the session's database encoding, set for the backend's lifetime.
    unsafe { pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32 }
}

/// Converts bytes in the server encoding to UTF-8: borrowed when nothing changes (a UTF-8
/// database, or ASCII). An unconvertible or invalid byte sequence is an ERROR, never U+FFFD.
pub fn server_to_utf8(bytes: &[u8]) -> Cow<'_, str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        return Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    if database_is_utf8() {
        // The server validated the text on input.
        if let Ok(text) = std::str::from_utf8(bytes) {
            return Cow::Borrowed(text);
        }
    } else {
        // pg_server_to_any raises its own ERROR for text it cannot convert (22021 for SQL_ASCII
        // bytes that are not UTF-8, 22P05 for a character UTF-8 lacks): ours instead, which
        // says what the text is for and what to do, with PostgreSQL's reason in it.
        let reason = |e: &pg_sys::panic::CaughtError| match e {
            pg_sys::panic::CaughtError::PostgresError(report)
            | pg_sys::panic::CaughtError::ErrorReport(report) => report.message().to_owned(),
            pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ereport.message().to_owned(),
        };
        let not_utf8 = |e: pg_sys::panic::CaughtError| -> *mut std::ffi::c_char {
            raise_not_utf8(&reason(&e))
        };
        // SAFETY: `bytes` is valid for `len`; pg_server_to_any returns the input pointer or a
        // palloc'd NUL-terminated copy.
        let converted = pgrx::PgTryBuilder::new(|| unsafe {
            pg_sys::pg_server_to_any(
                bytes.as_ptr().cast(),
                bytes.len() as i32,
                pg_sys::pg_enc::PG_UTF8 as i32,
            )
        })
        .catch_when(
            pgrx::PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            not_utf8,
        )
        .catch_when(
            pgrx::PgSqlErrorCode::ERRCODE_UNTRANSLATABLE_CHARACTER,
            not_utf8,
        )
        .execute();
        // SAFETY: as above: the input or a NUL-terminated palloc'd copy.
        unsafe {
            let len = if converted.cast_const() == bytes.as_ptr().cast() {
                bytes.len()
            } else {
                std::ffi::CStr::from_ptr(converted).to_bytes().len()
            };
            // palloc'd in the current memory context, which outlives the caller's use of it:
            // borrowed, never copied to the Rust heap (whose allocation failure would abort).
            let converted = std::slice::from_raw_parts(converted.cast::<u8>(), len);
            if let Ok(text) = std::str::from_utf8(converted) {
                return Cow::Borrowed(text);
            }
        }
    }
    raise_not_utf8("the converted text is not UTF-8")
}

fn raise_not_utf8(reason: &str) -> ! {
    error::raise(
        pgrx::PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
        format!(
            "pg_outbox: text is not valid in the database encoding and cannot be converted to \
             UTF-8 ({reason})"
        ),
        "Messages are delivered as UTF-8: publish text that UTF-8 can represent.",
    )
}
