//! The delivery metrics of one sink. Registering a labelled metric allocates and hashes its
//! labels; the success path runs once per message, so its handles are kept (per queue, made on
//! first use). Failures are rare and register as they come.

use std::collections::HashMap;

use crate::message::Message;
use crate::telemetry;

pub struct SinkMetrics {
    sink: String,
    latency: metrics::Histogram,
    published: HashMap<String, metrics::Counter>,
}

impl SinkMetrics {
    pub fn new(sink: &str) -> SinkMetrics {
        SinkMetrics {
            sink: sink.to_owned(),
            latency: metrics::histogram!(telemetry::COMMIT_TO_ACK, "sink" => sink.to_owned()),
            published: HashMap::new(),
        }
    }

    pub fn published(&mut self, message: &Message) {
        let counter = match self.published.get(message.queue.as_str()) {
            Some(counter) => counter,
            None => self
                .published
                .entry(message.queue.clone())
                .or_insert_with(|| {
                    metrics::counter!(telemetry::PUBLISHED, "sink" => self.sink.clone(), "queue" => message.queue.clone())
                }),
        };
        counter.increment(1);
        let latency = chrono::Utc::now() - message.committed_at;
        self.latency
            .record(latency.num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
    }

    pub fn failed(&self, message: &Message, kind: &'static str) {
        metrics::counter!(telemetry::SEND_FAILURES, "sink" => self.sink.clone(), "queue" => message.queue.clone(), "kind" => kind)
            .increment(1);
    }

    pub fn retried(&self) {
        metrics::counter!(telemetry::RETRIES, "sink" => self.sink.clone()).increment(1);
    }
}

/// A message written to the dead letters; `sink` is empty when no route matched.
pub fn dead_lettered(sink: &str, message: &Message) {
    metrics::counter!(telemetry::DEAD_LETTERED, "sink" => sink.to_owned(), "queue" => message.queue.clone())
        .increment(1);
}
