//! pg_outbox: the transactional outbox, built into PostgreSQL.
//!
//! The SQL objects live in `sql/schema.sql` (tables, roles, publication) and `sql/api.sql`
//! (SQL-language functions and grants). This crate adds the parts that must be fast or need the
//! server's internals: the publish functions, the `wal` storage form and the GUCs.

#![deny(unsafe_op_in_unsafe_fn)]

use pgrx::prelude::*;

mod args;
#[cfg(feature = "bench")]
mod bench;
mod checked;
mod envelope;
mod error;
mod guc;
mod json_text;
mod jsonb;
mod message;
mod publish;
mod size;
mod storage;
mod table;
mod varlena;
mod wal;

pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/api.sql", name = "api", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
    checked::register();
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "wal_level = 'logical'",
            "max_replication_slots = 10",
            "max_wal_senders = 10",
        ]
    }
}
