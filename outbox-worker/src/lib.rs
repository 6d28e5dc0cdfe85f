//! outbox-worker: streams the pg_outbox replication slot to Kafka, RabbitMQ or stdout and
//! confirms the slot only up to what the brokers acknowledged.
//!
//! Data flows one way; each module depends only on those to its left (and on the leaves):
//!
//! ```text
//!   source ──▶ message ──▶ router ──▶ sink ──▶ delivery ──▶ pipeline (confirm the slot)
//!   (slot,      (Message,   (queue →   (Kafka,   (window,     (the run loop, reconnects,
//!    pgoutput,   Quarantined) SinkId,   RabbitMQ, tracker,     dead letters, shutdown)
//!    decode)                 topic)    stdout)   metrics)
//!
//!   leaves: fatal · lsn · secret · rules · telemetry · config (→ rules, secret) · pg (SQL connections)
//! ```
//!
//! `main.rs` is the command line over [`pipeline::run`], [`replay::replay`] and [`admin`].

pub mod admin;
pub mod config;
pub mod dead_letters;
pub mod delivery;
pub mod fatal;
pub mod health;
pub mod http;
pub mod lsn;
pub mod message;
pub mod pg;
pub mod pipeline;
pub mod replay;
pub mod router;
pub mod rules;
pub mod secret;
pub mod sink;
pub mod source;
pub mod telemetry;
