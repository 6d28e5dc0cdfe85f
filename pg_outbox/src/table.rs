//! `outbox.messages`, written with `heap_insert` and `index_insert` directly: the executor and
//! SPI would cost more than the insert itself (see BENCHMARKS.md). Because this skips the
//! executor, `open` checks everything the executor would act on and refuses, with a clear
//! error, what this path cannot honour:
//! - the table's shape, column by column (name, type, typmod; dropped columns skipped);
//! - NOT NULL on any column: honoured (SQLSTATE 23502, as an INSERT reports it);
//! - CHECK constraints, triggers (foreign keys and deferrable constraints included), rules,
//!   exclusion constraints, expression and partial indexes, being a partition: refused;
//! - an unlogged table (its rows would never reach logical decoding): refused;
//! - indexes not yet ready for inserts (`CREATE INDEX CONCURRENTLY` in progress): skipped, as
//!   the executor skips them.
//!
//! The checks run once and again after every change to the table (`checked.rs`), not per call.

use std::cell::RefCell;

use pgrx::pg_sys;
use pgrx::{IntoDatum, PgSqlErrorCode, PgTupleDesc};

use crate::checked::{self, Shape};
use crate::error;
use crate::message::{Message, Payload};

pub const COLUMN_COUNT: usize = 7;

/// The columns this version writes, in the order of `values` below.
const COLUMNS: [(&str, pg_sys::Oid); COLUMN_COUNT] = [
    ("id", pg_sys::UUIDOID),
    ("queue", pg_sys::TEXTOID),
    ("key", pg_sys::TEXTOID),
    ("payload", pg_sys::JSONBOID),
    ("payload_bytes", pg_sys::BYTEAOID),
    ("headers", pg_sys::JSONBOID),
    ("created_at", pg_sys::TIMESTAMPTZOID),
];

const SHAPE_HINT: &str = "outbox.messages belongs to pg_outbox: undo the change to the table \
     (ALTER EXTENSION pg_outbox UPDATE brings it to this version's shape).";

pub struct MessagesTable {
    rel: pg_sys::Relation,
    /// Physical attribute index of each of `COLUMNS`.
    positions: [usize; COLUMNS.len()],
    /// Per entry of `COLUMNS`: a NOT NULL constraint the value must satisfy.
    not_null: [bool; COLUMNS.len()],
    indexes: Vec<Index>,
    /// Reused per row: one slot per physical attribute (dropped ones stay NULL).
    row: RefCell<(Vec<pg_sys::Datum>, Vec<bool>)>,
}

struct Index {
    rel: pg_sys::Relation,
    info: *mut pg_sys::IndexInfo,
    unique: pg_sys::IndexUniqueCheck::Type,
}

impl MessagesTable {
    pub fn open(function: &str) -> MessagesTable {
        if let Some(shape) = checked::current() {
            // SAFETY: taking the lock processes pending invalidations, after which the shape is
            // trusted only if none concerned the table. try_: the table checked before may have
            // been dropped since (and another made in its place): NULL, not an XX000 "could not
            // open relation".
            let rel = unsafe { pg_sys::try_table_open(shape.relid, pg_sys::RowExclusiveLock as _) };
            if !rel.is_null() {
                if checked::still_current() {
                    return MessagesTable::with_shape(rel, &shape);
                }
                // Changed while this transaction waited for the lock: found by name and checked
                // again below (the lock is kept, as the executor keeps it).
                // SAFETY: opened just above.
                unsafe { pg_sys::table_close(rel, pg_sys::NoLock as _) };
            }
        }
        MessagesTable::open_and_check(function)
    }

    /// The table and its indexes opened as `shape` describes, with no check repeated.
    fn with_shape(rel: pg_sys::Relation, shape: &Shape) -> MessagesTable {
        let mut table = MessagesTable {
            rel,
            positions: shape.positions,
            not_null: shape.not_null,
            indexes: Vec::with_capacity(shape.indexes.len()),
            row: RefCell::new((
                vec![pg_sys::Datum::from(0); shape.natts],
                vec![true; shape.natts],
            )),
        };
        for &(oid, unique) in &shape.indexes {
            // SAFETY: an index of the locked table, checked when the shape was; opened with the
            // lock an INSERT takes and closed in Drop.
            unsafe {
                let rel = pg_sys::index_open(oid, pg_sys::RowExclusiveLock as _);
                let info = pg_sys::BuildIndexInfo(rel);
                table.indexes.push(Index { rel, info, unique });
            }
        }
        table
    }

    /// Finds the table by name and runs every check (what `open` does when nothing is kept).
    pub fn open_and_check(function: &str) -> MessagesTable {
        // SAFETY: catalog lookups by constant names; `table_open` raises ERROR itself if the
        // relation vanished, and the lock is held to the end of the transaction (see Drop).
        let rel = unsafe {
            let namespace = pg_sys::get_namespace_oid(c"outbox".as_ptr(), false);
            let relid = pg_sys::get_relname_relid(c"messages".as_ptr(), namespace);
            if relid == pg_sys::InvalidOid {
                error::raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                    format!("{function}: table outbox.messages does not exist"),
                    "Recreate the extension: DROP EXTENSION pg_outbox; CREATE EXTENSION pg_outbox;",
                );
            }
            pg_sys::table_open(relid, pg_sys::RowExclusiveLock as _)
        };
        // Built before the checks so Drop closes the table whatever they raise.
        let mut table = MessagesTable {
            rel,
            positions: [0; COLUMNS.len()],
            not_null: [false; COLUMNS.len()],
            indexes: Vec::new(),
            row: RefCell::new((Vec::new(), Vec::new())),
        };
        // After the lock: what it processed is in the relcache the checks read.
        let generation = checked::start_checking();
        table.check_relation(function);
        table.check_columns(function);
        table.open_indexes(function);
        checked::remember(
            generation,
            Shape {
                // SAFETY: the open relation's relcache entry.
                relid: unsafe { (*table.rel).rd_id },
                positions: table.positions,
                not_null: table.not_null,
                natts: table.row.borrow().0.len(),
                // SAFETY: each index was opened in open_indexes.
                indexes: table
                    .indexes
                    .iter()
                    .map(|index| (unsafe { (*index.rel).rd_id }, index.unique))
                    .collect(),
            },
        );
        table
    }

    fn check_relation(&self, function: &str) {
        // SAFETY: `rel` is open and locked; these are plain reads of its relcache entry.
        let (form, constraints, triggers, rules) = unsafe {
            let constr = (*(*self.rel).rd_att).constr;
            (
                &*(*self.rel).rd_rel,
                if constr.is_null() {
                    0
                } else {
                    (*constr).num_check
                },
                !(*self.rel).trigdesc.is_null(),
                !(*self.rel).rd_rules.is_null(),
            )
        };
        let refuse = |what: &str, hint: &str| -> ! {
            error::raise(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("{function}: outbox.messages {what}, which publish cannot honour"),
                hint,
            )
        };
        if form.relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char {
            refuse("is not a plain table", SHAPE_HINT);
        }
        if form.relispartition {
            // heap_insert does not check the partition constraint an INSERT would.
            refuse(
                "is a partition of another table",
                "Detach it (ALTER TABLE ... DETACH PARTITION outbox.messages): publish writes the table directly.",
            );
        }
        if form.relpersistence != pg_sys::RELPERSISTENCE_PERMANENT as std::ffi::c_char {
            refuse(
                "is unlogged or temporary (its rows would never be decoded)",
                "ALTER TABLE outbox.messages SET LOGGED;",
            );
        }
        if constraints > 0 {
            refuse(
                "has a CHECK constraint",
                "Validate messages before publishing, and drop the constraint: publish writes the table directly.",
            );
        }
        if triggers {
            refuse(
                "has a trigger (foreign keys and deferrable constraints add one)",
                "Drop it; to act on published messages, consume them from the broker or the slot.",
            );
        }
        if rules {
            refuse("has a rule", "Drop the rule.");
        }
    }

    fn check_columns(&mut self, function: &str) {
        // SAFETY: the relation's descriptor, valid while `rel` is open; not freed by the wrapper.
        let desc = unsafe { PgTupleDesc::from_pg_unchecked((*self.rel).rd_att) };
        let mut found = [false; COLUMNS.len()];
        for (position, attribute) in desc.iter().enumerate() {
            if attribute.attisdropped {
                continue;
            }
            let name = pgrx::name_data_to_str(&attribute.attname);
            let mismatch = |problem: String| -> ! {
                error::raise(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("{function}: outbox.messages does not have the shape this version writes: {problem}"),
                    SHAPE_HINT,
                )
            };
            let Some(column) = COLUMNS.iter().position(|(n, _)| *n == name) else {
                mismatch(format!("unexpected column \"{name}\""));
            };
            let (_, expected_type) = COLUMNS[column];
            if attribute.atttypid != expected_type || attribute.atttypmod != -1 {
                // SAFETY: format_type_with_typemod returns a palloc'd C string for any type OID.
                let actual = unsafe {
                    std::ffi::CStr::from_ptr(pg_sys::format_type_with_typemod(
                        attribute.atttypid,
                        attribute.atttypmod,
                    ))
                    .to_string_lossy()
                    .into_owned()
                };
                mismatch(format!("column \"{name}\" has type {actual}"));
            }
            if attribute.attgenerated != 0 {
                mismatch(format!("column \"{name}\" is generated"));
            }
            found[column] = true;
            self.positions[column] = position;
            self.not_null[column] = attribute.attnotnull;
        }
        if let Some(missing) = found.iter().position(|f| !f) {
            error::raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "{function}: outbox.messages does not have the shape this version writes: column \"{}\" is missing",
                    COLUMNS[missing].0
                ),
                SHAPE_HINT,
            );
        }
        let natts = desc.len();
        self.row = RefCell::new((vec![pg_sys::Datum::from(0); natts], vec![true; natts]));
    }

    fn open_indexes(&mut self, function: &str) {
        // SAFETY: `rel` is open; each index is opened with the lock an INSERT takes and closed
        // in Drop; BuildIndexInfo reads the open index's catalog entry.
        unsafe {
            let list = pg_sys::RelationGetIndexList(self.rel);
            let count = if list.is_null() { 0 } else { (*list).length };
            for i in 0..count as usize {
                let oid = (*(*list).elements.add(i)).oid_value;
                let rel = pg_sys::index_open(oid, pg_sys::RowExclusiveLock as _);
                let info = pg_sys::BuildIndexInfo(rel);
                // Pushed first so Drop closes it even when a check below raises.
                self.indexes.push(Index {
                    rel,
                    info,
                    unique: pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO,
                });
                let index_name = pgrx::name_data_to_str(&(*(*rel).rd_rel).relname).to_owned();
                let refuse = |what: &str| -> ! {
                    error::raise(
                        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                        format!("{function}: index {index_name} on outbox.messages {what}, which publish cannot maintain"),
                        "Only plain-column indexes are supported on outbox.messages; drop that index.",
                    )
                };
                if !(*info).ii_Expressions.is_null() || !(*info).ii_Predicate.is_null() {
                    refuse("uses an expression or a predicate");
                }
                if !(*info).ii_ExclusionOps.is_null() {
                    refuse("is an exclusion constraint");
                }
                if (*info).ii_Unique {
                    if !(*(*rel).rd_index).indimmediate {
                        refuse("is a deferrable unique constraint");
                    }
                    self.indexes.last_mut().expect("pushed").unique =
                        pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES;
                }
            }
            pg_sys::list_free(list);
        }
    }

    pub fn insert(&self, message: &Message<'_>) {
        let (payload, payload_bytes) = match &message.payload {
            Payload::Json { value, .. } => (Some(value.datum()), None),
            Payload::Bytes(bytes) => (None, Some(bytes.datum)),
        };
        let columns: [Option<pg_sys::Datum>; COLUMNS.len()] = [
            pgrx::Uuid::from_bytes(*message.id.as_bytes()).into_datum(),
            Some(message.queue.datum),
            message.key.map(|key| key.datum),
            payload,
            payload_bytes,
            Some(message.headers.datum()),
            Some(pg_sys::Datum::from(message.created_at)),
        ];
        for (column, value) in columns.iter().enumerate() {
            if value.is_none() && self.not_null[column] {
                error::raise(
                    PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
                    format!(
                        "null value in column \"{}\" of relation \"messages\" violates not-null constraint",
                        COLUMNS[column].0
                    ),
                    "A NOT NULL constraint was added to outbox.messages; drop it or always pass that value.",
                );
            }
        }
        let mut row = self.row.borrow_mut();
        let (values, nulls) = &mut *row;
        for (column, value) in columns.into_iter().enumerate() {
            values[self.positions[column]] = value.unwrap_or(pg_sys::Datum::from(0));
            nulls[self.positions[column]] = value.is_none();
        }
        // SAFETY: `values`/`nulls` have one slot per attribute of `rd_att`, with datums of the
        // checked types; the tuple is freed after both inserts have copied what they need.
        unsafe {
            let tuple = pg_sys::heap_form_tuple(
                (*self.rel).rd_att,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
            pg_sys::simple_heap_insert(self.rel, tuple);
            self.insert_index_entries(tuple, values, nulls);
            pg_sys::heap_freetuple(tuple);
        }
    }

    /// # Safety
    /// `tuple` was just inserted into `rel` and `values`/`nulls` are the row it was formed from.
    unsafe fn insert_index_entries(
        &self,
        tuple: pg_sys::HeapTuple,
        values: &[pg_sys::Datum],
        nulls: &[bool],
    ) {
        const MAX_KEYS: usize = pg_sys::INDEX_MAX_KEYS as usize;
        for index in &self.indexes {
            // SAFETY: `info` was built for this open index; attribute numbers are 1-based
            // positions of plain columns (expression indexes were refused in `open`).
            unsafe {
                let info = &*index.info;
                if !info.ii_ReadyForInserts {
                    // Being built by CREATE INDEX CONCURRENTLY: it will pick this row up itself.
                    continue;
                }
                let mut key_values = [pg_sys::Datum::from(0); MAX_KEYS];
                let mut key_nulls = [false; MAX_KEYS];
                for k in 0..info.ii_NumIndexAttrs as usize {
                    let column = info.ii_IndexAttrNumbers[k] as usize - 1;
                    key_values[k] = values[column];
                    key_nulls[k] = nulls[column];
                }
                pg_sys::index_insert(
                    index.rel,
                    key_values.as_mut_ptr(),
                    key_nulls.as_mut_ptr(),
                    &mut (*tuple).t_self,
                    self.rel,
                    index.unique,
                    false,
                    index.info,
                );
            }
        }
    }
}

impl Drop for MessagesTable {
    fn drop(&mut self) {
        // Keep the locks until the end of the transaction, as the executor does.
        // SAFETY: each relation was opened in `open` and is closed exactly once here.
        unsafe {
            for index in &self.indexes {
                // Since PostgreSQL 17 an index may keep state between inserts (BRIN pins its
                // revmap): released here as the executor's ExecCloseIndices releases it. After an
                // ERROR the transaction's abort releases it instead.
                #[cfg(any(feature = "pg17", feature = "pg18"))]
                if !std::thread::panicking() {
                    pg_sys::index_insert_cleanup(index.rel, index.info);
                }
                pg_sys::index_close(index.rel, pg_sys::NoLock as _);
            }
            pg_sys::table_close(self.rel, pg_sys::NoLock as _);
        }
    }
}
