//! Shared harness for the end-to-end tests: each test starts the real processes it needs.

pub mod postgres;

pub use postgres::PgCluster;
