//! outbox-worker: streams the pg_outbox replication slot to Kafka, RabbitMQ or stdout.
//!
//! Not built yet (issues #3 and #5). Until then this binary says so instead of pretending.

fn main() -> std::process::ExitCode {
    eprintln!("outbox-worker is not built yet: see issues #3 (core) and #5 (RabbitMQ, dead letters, metrics).");
    std::process::ExitCode::from(2)
}
