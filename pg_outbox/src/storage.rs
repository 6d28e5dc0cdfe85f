//! Writes one message in the configured storage form: a row of `outbox.messages` (`table`) or a
//! transactional logical decoding message (`wal`). Both are part of the caller's transaction.

use crate::envelope::{self, Envelope};
use crate::error;
use crate::guc::{Storage, STORAGE};
use crate::jsonb::Jsonb;
use pgrx::pg_sys;
use pgrx::IntoDatum;

pub enum Payload<'a> {
    Json(Jsonb),
    Bytes {
        datum: pg_sys::Datum,
        bytes: &'a [u8],
    },
}

pub struct Message<'a> {
    pub id: uuid::Uuid,
    pub queue: &'a str,
    pub key: Option<&'a str>,
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
    pub fn open() -> Writer {
        match STORAGE.get() {
            Storage::Table => Writer::Table(MessagesTable::open()),
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
            Writer::Table(table) => table.insert(message),
            Writer::Wal => emit_logical_message(message),
        }
    }
}

/// `outbox.messages`, written with `heap_insert` and `index_insert` directly: the executor and
/// SPI would cost more than the insert itself (see BENCHMARKS.md). The table belongs to the
/// extension: no triggers, no constraints beyond the NOT NULLs every message satisfies, and only
/// plain-column indexes (any other kind is refused with a clear error).
pub struct MessagesTable {
    rel: pg_sys::Relation,
}

const COLUMNS: usize = 7;

impl MessagesTable {
    fn open() -> MessagesTable {
        unsafe {
            let namespace = pg_sys::get_namespace_oid(c"outbox".as_ptr(), false);
            let relid = pg_sys::get_relname_relid(c"messages".as_ptr(), namespace);
            if relid == pg_sys::InvalidOid {
                error::raise(
                    pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                    "pg_outbox: table outbox.messages does not exist".into(),
                    "Recreate the extension: DROP EXTENSION pg_outbox; CREATE EXTENSION pg_outbox;",
                );
            }
            let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as _);
            if (*(*rel).rd_att).natts as usize != COLUMNS {
                error::raise(
                    pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "pg_outbox: outbox.messages does not have the columns this version expects".into(),
                    "Do not alter outbox.messages; ALTER EXTENSION pg_outbox UPDATE brings it to this version.",
                );
            }
            MessagesTable { rel }
        }
    }

    fn insert(&self, message: &Message) {
        let (payload, payload_bytes) = match &message.payload {
            Payload::Json(json) => (Some(json.datum()), None),
            Payload::Bytes { datum, .. } => (None, Some(*datum)),
        };
        let columns: [Option<pg_sys::Datum>; COLUMNS] = [
            pgrx::Uuid::from_bytes(*message.id.as_bytes()).into_datum(),
            message.queue.into_datum(),
            message.key.and_then(|key| key.into_datum()),
            payload,
            payload_bytes,
            Some(message.headers.datum()),
            Some(pg_sys::Datum::from(message.created_at)),
        ];
        let mut values = columns.map(|c| c.unwrap_or(pg_sys::Datum::from(0)));
        let mut nulls = columns.map(|c| c.is_none());
        unsafe {
            let tuple = pg_sys::heap_form_tuple(
                (*self.rel).rd_att,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            pg_sys::simple_heap_insert(self.rel, tuple);
            self.insert_index_entries(tuple, &mut values, &mut nulls);
            pg_sys::heap_freetuple(tuple);
        }
    }

    unsafe fn insert_index_entries(
        &self,
        tuple: pg_sys::HeapTuple,
        values: &mut [pg_sys::Datum],
        nulls: &mut [bool],
    ) {
        unsafe {
            let indexes = pg_sys::RelationGetIndexList(self.rel);
            if indexes.is_null() {
                return;
            }
            for i in 0..(*indexes).length as usize {
                let index = pg_sys::index_open(
                    (*(*indexes).elements.add(i)).oid_value,
                    pg_sys::RowExclusiveLock as _,
                );
                let info = pg_sys::BuildIndexInfo(index);
                if !(*info).ii_Expressions.is_null() || !(*info).ii_Predicate.is_null() {
                    error::raise(
                        pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                        "pg_outbox: an index on outbox.messages uses an expression or a predicate".into(),
                        "Only plain-column indexes are supported on outbox.messages; drop that index.",
                    );
                }
                let keys = (*info).ii_NumIndexAttrs as usize;
                let mut key_values = [pg_sys::Datum::from(0); 32];
                let mut key_nulls = [false; 32];
                for k in 0..keys {
                    let column = (*info).ii_IndexAttrNumbers[k] as usize - 1;
                    key_values[k] = values[column];
                    key_nulls[k] = nulls[column];
                }
                let unique = if (*info).ii_Unique {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
                } else {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
                };
                pg_sys::index_insert(
                    index,
                    key_values.as_mut_ptr(),
                    key_nulls.as_mut_ptr(),
                    &mut (*tuple).t_self,
                    self.rel,
                    unique,
                    false,
                    info,
                );
                pg_sys::index_close(index, pg_sys::NoLock as _);
            }
            pg_sys::list_free(indexes);
        }
    }
}

impl Drop for MessagesTable {
    fn drop(&mut self) {
        // Keep the lock until the end of the transaction, as the executor does.
        unsafe { pg_sys::table_close(self.rel, pg_sys::NoLock as _) };
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
    let headers = if message.headers.is_empty_object() {
        "{}".to_string()
    } else {
        message.headers.to_text()
    };
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
            LogLogicalMessage(
                PREFIX.as_ptr(),
                content.as_ptr().cast(),
                content.len(),
                true,
            );
            #[cfg(feature = "pg17")]
            LogLogicalMessage(
                PREFIX.as_ptr(),
                content.as_ptr().cast(),
                content.len(),
                true,
                false,
            );
        })
    };
}
