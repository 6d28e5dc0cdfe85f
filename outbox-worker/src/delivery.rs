//! The in-flight window and the ordered ack tracker.
//!
//! Messages are sent as they stream in, up to `max_in_flight` unacknowledged. The slot may be
//! confirmed up to a transaction's commit end only when every message of that transaction and of
//! all transactions before it has been acknowledged. A failed send pauses intake; once everything
//! else in flight has settled, the failed messages are sent again in their original order after a
//! backoff, so a broker outage neither drops nor reorders messages.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use rand::Rng;

use crate::config::DeliveryConfig;
use crate::message::{Lsn, Message};
use crate::router::Route;
use crate::sink::{Sink, SinkError};

/// Transactions in stream order, each with its count of unacknowledged messages.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Id of `txs[0]`.
    first: u64,
    txs: VecDeque<Tx>,
}

#[derive(Debug)]
struct Tx {
    pending: usize,
    /// Set at commit.
    end_lsn: Option<Lsn>,
}

pub type TxId = u64;

impl AckTracker {
    pub fn begin(&mut self) -> TxId {
        self.txs.push_back(Tx {
            pending: 0,
            end_lsn: None,
        });
        self.first + self.txs.len() as u64 - 1
    }

    fn tx(&mut self, id: TxId) -> &mut Tx {
        let index = (id - self.first) as usize;
        &mut self.txs[index]
    }

    pub fn sent(&mut self, id: TxId) {
        self.tx(id).pending += 1;
    }

    pub fn acked(&mut self, id: TxId) {
        self.tx(id).pending -= 1;
    }

    pub fn commit(&mut self, id: TxId, end_lsn: Lsn) {
        self.tx(id).end_lsn = Some(end_lsn);
    }

    /// Forgets the open (uncommitted) transaction at the end, if any: after a lost replication
    /// connection it is streamed again in full.
    pub fn abandon_open(&mut self) {
        if self.txs.back().is_some_and(|tx| tx.end_lsn.is_none()) {
            self.txs.pop_back();
        }
    }

    /// Pops every leading transaction that is committed and fully acknowledged; returns the
    /// commit end of the last one: the slot can be confirmed up to there.
    pub fn confirmable(&mut self) -> Option<Lsn> {
        let mut lsn = None;
        while let Some(Tx {
            pending: 0,
            end_lsn: Some(end),
        }) = self.txs.front()
        {
            lsn = Some(*end);
            self.txs.pop_front();
            self.first += 1;
        }
        lsn
    }

    /// No transaction open or waiting for acknowledgements.
    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }
}

/// A sink's metric handles. Registering a labelled metric allocates and hashes its labels; the
/// success path runs once per message, so the handles are kept (per queue, made on first use).
struct SinkMetrics {
    latency: metrics::Histogram,
    published: HashMap<String, metrics::Counter>,
}

impl SinkMetrics {
    fn new(sink: &str) -> SinkMetrics {
        SinkMetrics {
            latency: metrics::histogram!("outbox_commit_to_ack_seconds", "sink" => sink.to_owned()),
            published: HashMap::new(),
        }
    }

    fn published(&mut self, sink: &str, message: &Message) {
        let counter = match self.published.get(message.queue.as_str()) {
            Some(counter) => counter,
            None => self.published.entry(message.queue.clone()).or_insert_with(|| {
                metrics::counter!("outbox_messages_published_total", "sink" => sink.to_owned(), "queue" => message.queue.clone())
            }),
        };
        counter.increment(1);
        let latency = chrono::Utc::now() - message.committed_at;
        self.latency
            .record(latency.num_microseconds().unwrap_or(0).max(0) as f64 / 1e6);
    }
}

/// One message on its way, with what is needed to send it again.
struct Entry {
    seq: u64,
    tx: TxId,
    route: Route,
    message: Arc<Message>,
    attempts: u32,
    permanent_failures: u32,
}

/// A message the broker refused permanently `max_attempts` times. It stays unacknowledged until
/// the caller has dead-lettered it ([`Delivery::dead_lettered`]).
#[derive(Debug)]
pub struct Undeliverable {
    pub tx: TxId,
    pub message: Arc<Message>,
    pub sink: String,
    pub destination: Arc<str>,
    pub attempts: u32,
    pub error: SinkError,
}

pub struct Delivery {
    sinks: Vec<Arc<dyn Sink>>,
    sink_names: Vec<String>,
    config: DeliveryConfig,
    tracker: AckTracker,
    next_seq: u64,
    in_flight: FuturesUnordered<BoxFuture<'static, (Entry, Result<(), SinkError>)>>,
    /// Failed sends waiting for the window to settle, by sequence number.
    failed: BTreeMap<u64, Entry>,
    /// Highest commit end whose transaction and all before it are acknowledged.
    confirmed: Lsn,
    metrics: Vec<SinkMetrics>,
    /// Re-sent messages not yet settled; intake waits for them.
    retries_in_flight: usize,
    /// The latest failure (sink name, error), reported once per retry round.
    last_error: Option<(String, SinkError)>,
}

impl Delivery {
    pub fn new(sinks: Vec<Arc<dyn Sink>>, sink_names: Vec<String>, config: DeliveryConfig) -> Self {
        Delivery {
            sinks,
            sink_names: sink_names.clone(),
            config,
            tracker: AckTracker::default(),
            next_seq: 0,
            in_flight: FuturesUnordered::new(),
            failed: BTreeMap::new(),
            confirmed: 0,
            retries_in_flight: 0,
            last_error: None,
            metrics: sink_names
                .iter()
                .map(|name| SinkMetrics::new(name))
                .collect(),
        }
    }

    pub fn begin(&mut self) -> TxId {
        self.tracker.begin()
    }

    pub fn commit(&mut self, tx: TxId, end_lsn: Lsn) {
        self.tracker.commit(tx, end_lsn);
        self.advance();
    }

    /// Room for one more message, no failed message waiting to be sent again, and no re-sent one
    /// still unacknowledged: a message sent behind a retry could otherwise overtake it if the retry
    /// fails again (for example on a replaced Kafka producer).
    pub fn can_accept(&self) -> bool {
        self.failed.is_empty()
            && self.retries_in_flight == 0
            && self.in_flight.len() < self.config.max_in_flight
    }

    /// Nothing in flight, nothing failed, no transaction open.
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty() && self.failed.is_empty() && self.tracker.is_empty()
    }

    /// Nothing in flight and nothing failed (an open transaction may remain).
    pub fn is_settled(&self) -> bool {
        self.in_flight.is_empty() && self.failed.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len() + self.failed.len()
    }

    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    pub fn send(&mut self, tx: TxId, route: Route, message: Message) {
        self.tracker.sent(tx);
        let entry = Entry {
            seq: self.next_seq,
            tx,
            route,
            message: Arc::new(message),
            attempts: 0,
            permanent_failures: 0,
        };
        self.next_seq += 1;
        self.dispatch(entry);
    }

    fn dispatch(&mut self, mut entry: Entry) {
        entry.attempts += 1;
        let ack = self.sinks[entry.route.sink].send(&entry.route.destination, &entry.message);
        self.in_flight
            .push(Box::pin(async move { (entry, ack.await) }));
    }

    /// Waits for the next acknowledgement or failure, or for the retry backoff to pass once the
    /// window has settled. Returns a message that failed permanently too often; the caller decides
    /// its fate (it stays unacknowledged, so the slot never moves past it).
    /// Pending forever when there is nothing to wait for: use in `select!` with other branches.
    pub async fn progress(&mut self) -> Option<Undeliverable> {
        if let Some((mut entry, result)) = self.in_flight.next().await {
            if entry.attempts > 1 {
                self.retries_in_flight -= 1;
            }
            match result {
                Ok(()) => {
                    self.metrics[entry.route.sink]
                        .published(&self.sink_names[entry.route.sink], &entry.message);
                    self.tracker.acked(entry.tx);
                    self.advance();
                }
                Err(error) => {
                    let sink = self.sink_names[entry.route.sink].clone();
                    let kind = match error {
                        SinkError::Permanent(_) => {
                            entry.permanent_failures += 1;
                            "permanent"
                        }
                        SinkError::Transient(_) => "transient",
                    };
                    metrics::counter!("outbox_send_failures_total", "sink" => sink.clone(), "queue" => entry.message.queue.clone(), "kind" => kind).increment(1);
                    tracing::debug!(
                        id = %entry.message.id, queue = %entry.message.queue, sink,
                        destination = %entry.route.destination, attempt = entry.attempts,
                        %error, "send failed"
                    );
                    if entry.permanent_failures >= self.config.max_attempts {
                        return Some(Undeliverable {
                            tx: entry.tx,
                            message: entry.message,
                            sink,
                            destination: entry.route.destination,
                            attempts: entry.attempts,
                            error,
                        });
                    }
                    self.failed.insert(entry.seq, entry);
                    self.last_error = Some((sink, error));
                }
            }
            return None;
        }
        if self.failed.is_empty() {
            return std::future::pending().await;
        }
        // The window has settled: back off, then send the failed messages again, in order.
        let attempts = self.failed.values().map(|e| e.attempts).max().unwrap_or(1);
        let backoff = self.backoff(attempts);
        if let Some((sink, error)) = self.last_error.take() {
            tracing::warn!(
                failed = self.failed.len(), sink, %error, attempt = attempts,
                backoff = %humantime::format_duration(backoff),
                "sends failed; retrying them in order after a backoff"
            );
        }
        tokio::time::sleep(backoff).await;
        for (_, entry) in std::mem::take(&mut self.failed) {
            metrics::counter!("outbox_retries_total", "sink" => self.sink_names[entry.route.sink].clone()).increment(1);
            self.retries_in_flight += 1;
            self.dispatch(entry);
        }
        None
    }

    /// Exponential, capped, with jitter (half to full delay) so that many workers do not retry
    /// in lockstep.
    fn backoff(&self, attempts: u32) -> Duration {
        let exp = self
            .config
            .retry_initial
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
            .min(self.config.retry_max);
        exp.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// The caller stored an [`Undeliverable`] in the dead-letter table: it counts as handled.
    pub fn dead_lettered(&mut self, u: &Undeliverable) {
        metrics::counter!("outbox_messages_dead_lettered_total", "sink" => u.sink.clone(), "queue" => u.message.queue.clone()).increment(1);
        self.tracker.acked(u.tx);
        self.advance();
    }

    fn advance(&mut self) {
        metrics::gauge!("outbox_in_flight").set((self.in_flight.len() + self.failed.len()) as f64);
        if let Some(lsn) = self.tracker.confirmable() {
            self.confirmed = lsn;
            metrics::gauge!("outbox_confirmed_lsn").set(lsn as f64);
        }
    }

    /// After a lost replication connection, once settled: the open transaction will be streamed
    /// again from the last confirmed position.
    pub fn reset_stream(&mut self) {
        self.tracker.abandon_open();
    }

    pub async fn close(&self) {
        for sink in &self.sinks {
            sink.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_fully_acked_committed_prefixes() {
        let mut t = AckTracker::default();
        let a = t.begin();
        t.sent(a);
        t.sent(a);
        t.commit(a, 100);
        let b = t.begin();
        t.sent(b);
        t.commit(b, 200);
        let c = t.begin();
        t.sent(c);
        assert_eq!(t.confirmable(), None);
        t.acked(b);
        assert_eq!(t.confirmable(), None, "b is acked but a is not");
        t.acked(a);
        assert_eq!(t.confirmable(), None, "a still has one message pending");
        t.acked(a);
        assert_eq!(
            t.confirmable(),
            Some(200),
            "a and b both confirmable at once"
        );
        t.acked(c);
        assert_eq!(t.confirmable(), None, "c is not committed yet");
        t.commit(c, 300);
        assert_eq!(t.confirmable(), Some(300));
        assert!(t.is_empty());
    }

    #[test]
    fn an_empty_committed_transaction_is_confirmable() {
        let mut t = AckTracker::default();
        let a = t.begin();
        t.commit(a, 42);
        assert_eq!(t.confirmable(), Some(42));
    }

    #[test]
    fn an_abandoned_open_transaction_does_not_block() {
        let mut t = AckTracker::default();
        let a = t.begin();
        t.commit(a, 10);
        let b = t.begin();
        t.sent(b);
        t.abandon_open();
        assert_eq!(t.confirmable(), Some(10));
        assert!(t.is_empty());
        let c = t.begin();
        t.commit(c, 20);
        assert_eq!(t.confirmable(), Some(20));
    }
}
