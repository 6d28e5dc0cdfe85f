//! Writes one message in the configured storage form: a row of `outbox.messages` (`table`) or a
//! transactional logical decoding message (`wal`). Both are part of the caller's transaction.

use crate::envelope::{self, Envelope};
use crate::error;
use crate::guc::{Storage, STORAGE};
use crate::jsonb::Jsonb;
use pgrx::pg_sys;
use pgrx::IntoDatum;
use std::cell::Cell;

pub enum Payload<'a> {
    Json(Jsonb),
    Bytes { datum: pg_sys::Datum, bytes: &'a [u8] },
}

pub struct Message<'a> {
    pub id: uuid::Uuid,
    pub queue: &'a str,
    pub key: Option<&'a str>,
    pub headers: Jsonb,
    pub payload: Payload<'a>,
    pub created_at: pg_sys::TimestampTz,
}

/// Writes messages of one SQL call; for `table` it holds one SPI connection for all of them.
pub enum Writer {
    Table,
    Wal,
}

impl Writer {
    pub fn open() -> Writer {
        match STORAGE.get() {
            Storage::Table => {
                unsafe { pg_sys::SPI_connect() };
                Writer::Table
            }
            Storage::Wal => {
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

    pub fn write(&self, message: &Message) {
        match self {
            Writer::Table => insert_row(message),
            Writer::Wal => emit_logical_message(message),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Writer::Table = self {
            unsafe { pg_sys::SPI_finish() };
        }
    }
}

thread_local! {
    /// The prepared INSERT, kept for the life of the backend (PostgreSQL replans it on DDL).
    static INSERT_PLAN: Cell<pg_sys::SPIPlanPtr> = const { Cell::new(std::ptr::null_mut()) };
}

const INSERT_SQL: &std::ffi::CStr = c"INSERT INTO outbox.messages (id, queue, key, payload, payload_bytes, headers, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)";

fn insert_plan() -> pg_sys::SPIPlanPtr {
    INSERT_PLAN.with(|cell| {
        if cell.get().is_null() {
            let mut types = [
                pg_sys::UUIDOID,
                pg_sys::TEXTOID,
                pg_sys::TEXTOID,
                pg_sys::JSONBOID,
                pg_sys::BYTEAOID,
                pg_sys::JSONBOID,
                pg_sys::TIMESTAMPTZOID,
            ];
            unsafe {
                let plan = pg_sys::SPI_prepare(INSERT_SQL.as_ptr(), 7, types.as_mut_ptr());
                if plan.is_null() {
                    pgrx::error!("pg_outbox: could not prepare the outbox insert");
                }
                pg_sys::SPI_keepplan(plan);
                cell.set(plan);
            }
        }
        cell.get()
    })
}

fn insert_row(message: &Message) {
    let (payload, payload_bytes) = match &message.payload {
        Payload::Json(json) => (Some(json.datum()), None),
        Payload::Bytes { datum, .. } => (None, Some(*datum)),
    };
    let columns = [
        pgrx::Uuid::from_bytes(*message.id.as_bytes()).into_datum(),
        message.queue.into_datum(),
        message.key.and_then(|key| key.into_datum()),
        payload,
        payload_bytes,
        Some(message.headers.datum()),
        Some(pg_sys::Datum::from(message.created_at)),
    ];
    let mut values = columns.map(|c| c.unwrap_or(pg_sys::Datum::from(0)));
    let nulls = columns.map(|c| if c.is_some() { b' ' as std::ffi::c_char } else { b'n' as std::ffi::c_char });
    let status =
        unsafe { pg_sys::SPI_execute_plan(insert_plan(), values.as_mut_ptr(), nulls.as_ptr(), false, 0) };
    if status != pg_sys::SPI_OK_INSERT as i32 {
        pgrx::error!("pg_outbox: inserting into outbox.messages failed (SPI status {status})");
    }
}

unsafe extern "C-unwind" {
    #[cfg(not(feature = "pg17"))]
    fn LogLogicalMessage(
        prefix: *const std::ffi::c_char,
        message: *const std::ffi::c_char,
        size: usize,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;
    #[cfg(feature = "pg17")]
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

fn emit_logical_message(message: &Message) {
    let headers = if message.headers.is_empty_object() { "{}".to_string() } else { message.headers.to_text() };
    let json_payload;
    let payload = match &message.payload {
        Payload::Json(json) => {
            json_payload = json.to_text();
            envelope::Payload::Json(&json_payload)
        }
        Payload::Bytes { bytes, .. } => envelope::Payload::Bytes(bytes),
    };
    let content = Envelope {
        id: message.id,
        queue: message.queue,
        key: message.key,
        created_at: &envelope::rfc3339(message.created_at),
        headers: &headers,
        payload,
    }
    .encode();
    // Transactional: decoded only if the caller's transaction commits, in commit order.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            #[cfg(not(feature = "pg17"))]
            LogLogicalMessage(PREFIX.as_ptr(), content.as_ptr().cast(), content.len(), true);
            #[cfg(feature = "pg17")]
            LogLogicalMessage(PREFIX.as_ptr(), content.as_ptr().cast(), content.len(), true, false);
        })
    };
}
