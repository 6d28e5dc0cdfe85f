//! Where messages go. One small trait; one module per broker.

pub mod amqp;
pub mod kafka;
mod stdout;

use std::sync::Arc;

use futures::future::BoxFuture;
use thiserror::Error;

use crate::config::{Config, SinkConfig};
use crate::message::Message;

/// The outcome of one send attempt, resolved once the broker has answered.
pub type Ack = BoxFuture<'static, Result<(), SinkError>>;

#[derive(Debug, Clone, Error, PartialEq)]
pub enum SinkError {
    /// The broker is unreachable, slow or busy: the same message will succeed later.
    #[error("{0}")]
    Transient(String),
    /// The broker refused this very message (too large, invalid destination, not authorized):
    /// retrying the same bytes is unlikely to help.
    #[error("{0}")]
    Permanent(String),
}

/// A broker the worker delivers to.
///
/// - `send` is called from one task, in stream order. It must hand the message to the client
///   library before it returns, so that the broker receives messages in call order, and return an
///   [`Ack`] that resolves `Ok` only when the broker has durably accepted the message (Kafka:
///   `acks=all`), or `Err` when this attempt failed.
/// - Delivery is at least once: a message may be sent again after a failed attempt or a crash.
///   Sinks do not de-duplicate; consumers do, by `outbox-id`.
/// - Retrying is the caller's job: a sink reports and classifies a failure, never drops a message
///   and never retries behind the caller's back in a way that reorders messages.
/// - `close` is called at most once, after the last `send`, and waits for pending sends.
pub trait Sink: Send + Sync {
    fn send(&self, destination: &str, message: &Message) -> Ack;

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Connected, as far as the sink knows (for `/health/ready`).
    fn is_ready(&self) -> bool {
        true
    }
}

/// Acknowledges without sending: measures the worker without a broker.
struct Discard;

impl Sink for Discard {
    fn send(&self, _: &str, _: &Message) -> Ack {
        Box::pin(async { Ok(()) })
    }
}

/// One sink per `[sinks.NAME]`, in the router's order (sorted by name).
pub fn build_all(config: &Config) -> anyhow::Result<Vec<Arc<dyn Sink>>> {
    config
        .sinks
        .iter()
        .map(|(name, sink)| -> anyhow::Result<Arc<dyn Sink>> {
            Ok(match sink {
                SinkConfig::Kafka(kafka) => Arc::new(
                    kafka::KafkaSink::new(kafka, config.delivery.max_in_flight)
                        .map_err(|e| anyhow::anyhow!("sinks.{name}: {e}"))?,
                ),
                SinkConfig::Amqp(amqp) => Arc::new(amqp::AmqpSink::start(amqp)),
                SinkConfig::Stdout => Arc::new(stdout::StdoutSink::start()),
                SinkConfig::Discard => Arc::new(Discard),
            })
        })
        .collect()
}
