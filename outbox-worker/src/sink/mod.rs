//! Where messages go. One small trait; one module per broker.

pub mod amqp;
pub mod kafka;
#[cfg(any(test, feature = "test-utils"))]
pub mod scripted;
mod stdout;

use std::sync::Arc;

use futures::future::BoxFuture;
use thiserror::Error;

pub use crate::config::SinkId;
use crate::config::{Config, SinkConfig};
use crate::fatal::Fatal;
use crate::lsn::Position;
use crate::message::Message;
use crate::router::Destination;

/// The outcome of one send attempt, resolved once the broker has answered.
pub type Ack = BoxFuture<'static, Result<Receipt, SinkError>>;

/// Where the broker put an acknowledged message, as far as it says (Kafka: partition and offset),
/// for the message's trace span.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Receipt {
    pub partition: Option<i32>,
    pub offset: Option<i64>,
}

impl Receipt {
    pub fn kafka(partition: i32, offset: i64) -> Receipt {
        Receipt {
            partition: Some(partition),
            offset: Some(offset),
        }
    }
}

#[derive(Debug, Clone, Error, PartialEq)]
pub enum SinkError {
    /// The broker is unreachable, slow or busy: the same message will succeed later.
    #[error("{0}")]
    Transient(String),
    /// The broker refused this very message (too large, invalid destination, not authorized):
    /// retrying the same bytes is unlikely to help.
    #[error("{0}")]
    Permanent(String),
    /// The sink can never deliver again (stdout's reader went away): the worker stops.
    #[error("{0}")]
    Closed(String),
}

/// A broker the worker delivers to.
///
/// - `send` is called from one task, in stream order. It must hand the message to the client
///   library before it returns, so that the broker receives messages in call order, and return an
///   [`Ack`] that resolves `Ok` only when the broker has durably accepted the message (Kafka:
///   `acks=all`), or `Err` when this attempt failed.
/// - Delivery is at least once: a message may be sent again after a failed attempt or a crash.
///   Sinks do not de-duplicate; consumers do, by `outbox-id`. An exactly-once sink commits what
///   it acknowledges together with the stream position ([`Sink::delivered_through`]), and the run
///   skips what it already has.
/// - Retrying is the caller's job: a sink reports and classifies a failure, never drops a message
///   and never retries behind the caller's back in a way that reorders messages.
/// - `close` is called at most once, after the last `send`, and waits for pending sends.
pub trait Sink: Send + Sync {
    fn send(&self, destination: &Destination, message: &Arc<Message>) -> Ack;

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// The client keeps each key's messages in order by itself even when some sends fail (Kafka's
    /// idempotent producer fails every later message of the partition too). When false, delivery
    /// sends one message per key at a time (`delivery.ordering = "per_key"`).
    fn keeps_key_order(&self) -> bool {
        false
    }

    /// `messaging.system` in the trace spans of its sends.
    fn system(&self) -> &'static str {
        "pg_outbox"
    }

    /// Connected, as far as the sink knows (for `/health/ready`).
    fn is_ready(&self) -> bool {
        true
    }

    /// Called once before the first message of a run. An exactly-once sink fences earlier
    /// writers of `stream` here and learns up to where the broker already has its messages.
    fn resume<'a>(&'a self, _stream: &'a StreamId) -> BoxFuture<'a, Result<(), Fatal>> {
        Box::pin(async { Ok(()) })
    }

    /// The stream position up to which this sink's messages are in the broker for good (an
    /// exactly-once sink): the run skips them instead of sending them again.
    fn delivered_through(&self) -> Option<Position> {
        None
    }
}

/// Which stream a run delivers: the same for every run and standby of one slot, another for any
/// other slot, database or PostgreSQL system (a restore or `pg_upgrade` makes a new system, whose
/// positions do not compare with the old one's).
#[derive(Debug, Clone)]
pub struct StreamId {
    pub system: String,
    pub database: String,
    pub slot: String,
}

/// Why the sinks are built: a `run` delivers the stream once; a `replay` sends again on purpose,
/// outside the stream's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Stream,
    Replay,
}

/// A sink and the name it has under `[sinks]`.
pub struct NamedSink {
    pub name: String,
    pub sink: Arc<dyn Sink>,
}

/// One value per configured sink, found by [`SinkId`].
pub struct BySink<T>(Vec<T>);

/// Every configured sink.
pub type Sinks = BySink<NamedSink>;

impl Sinks {
    /// One sink per `[sinks.NAME]`, connecting lazily.
    pub fn build(config: &Config, purpose: Purpose) -> anyhow::Result<Sinks> {
        let sinks = config
            .sinks
            .iter()
            .map(|(name, sink)| -> anyhow::Result<NamedSink> {
                let sink: Arc<dyn Sink> = match sink {
                    SinkConfig::Kafka(kafka) => Arc::new(
                        kafka::KafkaSink::new(
                            name,
                            kafka,
                            config.delivery.max_in_flight,
                            kafka.exactly_once && purpose == Purpose::Stream,
                            kafka::progress::routes_fingerprint(config, name),
                        )
                        .map_err(|e| anyhow::anyhow!("sinks.{name}: {e}"))?,
                    ),
                    SinkConfig::Amqp(amqp) => Arc::new(amqp::AmqpSink::start(amqp)),
                    SinkConfig::Stdout {} => Arc::new(stdout::StdoutSink::start()),
                    SinkConfig::Discard {} => Arc::new(Discard),
                };
                Ok(NamedSink {
                    name: name.clone(),
                    sink,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(BySink(sinks))
    }

    /// Sinks made by hand, in [`SinkId`] order (tests).
    pub fn from_named(sinks: Vec<(String, Arc<dyn Sink>)>) -> Sinks {
        BySink(
            sinks
                .into_iter()
                .map(|(name, sink)| NamedSink { name, sink })
                .collect(),
        )
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|s| s.name.as_str()).collect()
    }
}

impl<T> BySink<T> {
    pub fn iter(&self) -> impl Iterator<Item = (SinkId, &T)> {
        self.0.iter().enumerate().map(|(i, s)| (SinkId(i), s))
    }

    /// The same sinks with other values.
    pub fn map<U>(&self, f: impl FnMut(&T) -> U) -> BySink<U> {
        BySink(self.0.iter().map(f).collect())
    }
}

impl<T> std::ops::Index<SinkId> for BySink<T> {
    type Output = T;

    fn index(&self, id: SinkId) -> &T {
        &self.0[id.0]
    }
}

impl<T> std::ops::IndexMut<SinkId> for BySink<T> {
    fn index_mut(&mut self, id: SinkId) -> &mut T {
        &mut self.0[id.0]
    }
}

/// Acknowledges without sending: measures the worker without a broker.
struct Discard;

impl Sink for Discard {
    fn send(&self, _: &Destination, _: &Arc<Message>) -> Ack {
        Box::pin(async { Ok(Receipt::default()) })
    }

    fn keeps_key_order(&self) -> bool {
        true
    }
}
