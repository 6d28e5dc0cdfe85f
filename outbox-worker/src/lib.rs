//! outbox-worker: streams the pg_outbox replication slot to Kafka, RabbitMQ or stdout and
//! confirms the slot only up to what the brokers acknowledged.
//!
//! Data flows one way:
//!
//! ```text
//!   source ──▶ message ──▶ router ──▶ sink ──▶ delivery ──▶ outcome ──▶ pipeline (run) · replay
//!   (slot,      (Message,   (queue →   (Kafka,   (window,     (sent or     (the run loop, reconnects,
//!    pgoutput,   Quarantined) SinkId,   RabbitMQ, tracker,     dead-        shutdown) · (replay
//!    decode)                 topic)    stdout)   metrics)     lettered)    from outbox.messages)
//! ```
//!
//! Each module imports only modules on a lower layer (no circle, no arrow back up):
//!
//! 1. leaves: `fatal` · `lsn` · `secret` · `rules` · `telemetry`
//! 2. `config` (rules, secret) · `pg` (secret: every ordinary SQL connection) · `message` (lsn)
//! 3. `source` (config, message, pg, rules) · `router` (config, rules) · `sink` (config, message)
//! 4. `triage` (source, pg: what every error means) · `health` (sink) · `delivery` (router, sink)
//! 5. `setup` (source, triage) · `http` (health) · `dead_letters` (health, pg, triage)
//! 6. `outcome` (delivery, dead_letters)
//! 7. `pipeline` · `replay` · `admin`: siblings on top
//!
//! `main.rs` is the command line over [`pipeline::run`], [`replay::replay`] and [`admin`].

pub mod admin;
pub mod claims;
pub mod config;
pub mod dead_letters;
pub mod delivery;
pub mod fatal;
pub mod health;
pub mod http;
pub mod lsn;
pub mod message;
pub mod outcome;
pub mod pg;
pub mod pipeline;
pub mod replay;
pub mod router;
pub mod rules;
pub mod secret;
pub mod setup;
pub mod sink;
pub mod slot_publication;
pub mod source;
pub mod telemetry;
pub mod traces;
pub mod triage;
