//! Delivery: sends messages as they stream in, up to `max_in_flight` unacknowledged, and says up
//! to where the slot may be confirmed.
//!
//! The slot may be confirmed up to a transaction's commit end only when every message of that
//! transaction and of all transactions before it has been acknowledged ([`tracker`]). A failed
//! send of a pipelined sink (Kafka) pauses intake; once everything else in flight has settled, the
//! failed messages are sent again in their original order after a backoff ([`window`]), so a
//! broker outage neither drops nor reorders messages. A per-key sink (RabbitMQ) has one message
//! per key in flight: its failed send is retried after its own backoff while every other key and
//! destination goes on, and only its key's later messages wait for it.

mod keys;
mod metrics;
mod tracker;
mod window;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;

use self::keys::KeyQueues;
pub use self::metrics::dead_lettered as count_dead_letter;
use self::metrics::SinkMetrics;
pub use self::tracker::{AckTracker, TxId};
use self::window::{Entry, Event, Window};
use crate::config::{DeliveryConfig, KeyOrdering};
use crate::fatal::Fatal;
use crate::lsn::Lsn;
use crate::message::Message;
use crate::router::{Destination, Route};
use crate::sink::{BySink, Sink, SinkError, SinkId, Sinks};
use crate::{telemetry, traces};

/// A message the broker refused permanently `max_attempts` times. It stays unacknowledged until
/// the caller has dead-lettered it ([`Delivery::dead_lettered`]).
#[derive(Debug)]
pub struct Undeliverable {
    pub tx: TxId,
    pub message: Arc<Message>,
    pub sink_id: SinkId,
    pub sink: String,
    pub destination: Destination,
    pub attempts: u32,
    pub error: SinkError,
    /// When the worker took it in: its trace span's start.
    pub started: SystemTime,
}

/// A failed send as the retry round's warning names it.
struct LastError {
    sink: String,
    destination: String,
    queue: String,
    error: SinkError,
}

/// A sink with its name, metric handles and, when it sends one message per key at a time, the
/// messages waiting for their key.
struct Target {
    name: String,
    sink: Arc<dyn Sink>,
    metrics: SinkMetrics,
    keys: Option<KeyQueues>,
}

pub struct Delivery {
    targets: BySink<Target>,
    config: DeliveryConfig,
    tracker: AckTracker,
    window: Window,
    next_seq: u64,
    /// Bytes of the messages sent and not yet settled ([`Message::size`]).
    bytes_in_flight: usize,
    /// Messages acknowledged, and dead-lettered, since the start.
    acknowledged: u64,
    dead_lettered: u64,
    /// Highest commit end whose transaction and all before it are acknowledged.
    confirmed: Option<Lsn>,
    /// The latest failure, reported once per retry round.
    last_error: Option<LastError>,
    /// When the parked sends go again: fixed once per round, so a `progress` dropped during the
    /// backoff resumes the same wait instead of starting a new one.
    retry_at: Option<tokio::time::Instant>,
    /// The oldest parked send of the last round, and how many rounds in a row began with it:
    /// the round's backoff grows only while that message stays stuck. (A message refused for
    /// another's sake, as every message of an aborted Kafka transaction is, must not inherit a
    /// long backoff once the one at fault was dead-lettered.)
    stuck: Option<(u64, u32)>,
}

impl Delivery {
    pub fn new(sinks: &Sinks, config: DeliveryConfig) -> Self {
        Delivery {
            targets: sinks.map(|s| Target {
                name: s.name.clone(),
                sink: s.sink.clone(),
                metrics: SinkMetrics::new(&s.name),
                keys: (config.ordering == KeyOrdering::PerKey && !s.sink.keeps_key_order())
                    .then(KeyQueues::default),
            }),
            window: Window::new(config.max_in_flight),
            config,
            tracker: AckTracker::default(),
            next_seq: 0,
            bytes_in_flight: 0,
            acknowledged: 0,
            dead_lettered: 0,
            confirmed: None,
            last_error: None,
            retry_at: None,
            stuck: None,
        }
    }

    pub fn begin(&mut self) -> TxId {
        self.tracker.begin()
    }

    pub fn commit(&mut self, tx: TxId, end_lsn: Lsn) {
        self.tracker.commit(tx, end_lsn);
        self.advance();
    }

    /// Room for one more message (by count and by bytes; one message always fits), and no
    /// failed message waiting or being sent again.
    pub fn can_accept(&self) -> bool {
        self.window.can_accept(self.waiting())
            && (self.bytes_in_flight < self.config.max_in_flight_bytes.as_u64() as usize
                || self.in_flight() == 0)
    }

    /// Nothing in flight, nothing failed, no transaction open.
    pub fn is_idle(&self) -> bool {
        self.is_settled() && self.tracker.is_empty()
    }

    /// Nothing in flight, waiting or failed (an open transaction may remain).
    pub fn is_settled(&self) -> bool {
        self.window.is_settled() && self.waiting() == 0
    }

    /// Messages not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.window.len() + self.waiting()
    }

    /// Messages waiting for an earlier one of their key.
    fn waiting(&self) -> usize {
        self.targets
            .iter()
            .map(|(_, t)| t.keys.as_ref().map_or(0, KeyQueues::len))
            .sum()
    }

    /// Messages a broker acknowledged since the start.
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged
    }

    /// Messages given up on and dead-lettered since the start.
    pub fn dead_lettered_count(&self) -> u64 {
        self.dead_lettered
    }

    /// Every transaction before the open one is acknowledged (or dead-lettered).
    pub fn earlier_transactions_settled(&mut self) -> bool {
        self.advance();
        self.tracker.only_open_left()
    }

    /// The commit end up to which everything is acknowledged; `None` before the first one.
    pub fn confirmed(&self) -> Option<Lsn> {
        self.confirmed
    }

    /// The route's sink already has this message for good (an exactly-once sink, after a
    /// restart or a reconnect re-streamed it).
    pub fn already_delivered(&self, route: &Route, message: &Message) -> bool {
        self.targets[route.sink]
            .sink
            .delivered_through()
            .is_some_and(|through| message.position() <= through)
    }

    pub fn send(&mut self, tx: TxId, route: Route, message: Message) {
        self.tracker.sent(tx);
        self.bytes_in_flight += message.size();
        let entry = Entry {
            seq: self.next_seq,
            tx,
            pipelined: self.targets[route.sink].keys.is_none(),
            route,
            message: Arc::new(message),
            attempts: 0,
            permanent_failures: 0,
            started: SystemTime::now(),
        };
        self.next_seq += 1;
        let admitted = match self.targets[entry.route.sink].keys.as_mut() {
            Some(keys) => keys.admit(entry),
            None => Some(entry),
        };
        if let Some(entry) = admitted {
            self.dispatch(entry);
        }
    }

    /// A message of `key` settled on `sink`: the next one of that key may go.
    fn next_of_key(&mut self, sink: SinkId, key: Option<&str>) {
        let keys = self.targets[sink].keys.as_mut();
        if let Some(next) = keys.and_then(|keys| keys.settled(key)) {
            self.dispatch(next);
        }
    }

    fn dispatch(&mut self, entry: Entry) {
        let sink = self.targets[entry.route.sink].sink.clone();
        self.window.dispatch(entry, sink.as_ref());
    }

    /// Waits for the next acknowledgement or failure, or for the retry backoff to pass once the
    /// window has settled. Returns a message that failed permanently too often; the caller decides
    /// its fate (it stays unacknowledged, so the slot never moves past it).
    ///
    /// Pending forever when there is nothing to wait for: use in `select!` with other branches.
    /// Cancel-safe: nothing is lost when the future is dropped at its await points (a settled send
    /// is handled without awaiting; a backoff cut short resumes where it was).
    pub async fn progress(&mut self) -> Result<Option<Undeliverable>, Fatal> {
        // Parked pipelined sends go again once nothing else is in flight, after a backoff fixed
        // once per round.
        let round_at = match self.window.first_parked() {
            Some(first) if self.window.nothing_in_flight() => Some(self.retry_round_at(first)),
            _ => None,
        };
        let event = match round_at {
            Some(at) => tokio::select! {
                biased;
                Some(event) = self.window.next_event() => event,
                () = tokio::time::sleep_until(at) => {
                    self.retry_at = None;
                    for entry in self.window.take_parked().collect::<Vec<_>>() {
                        self.targets[entry.route.sink].metrics.retried();
                        self.dispatch(entry);
                    }
                    return Ok(None);
                }
            },
            None => match self.window.next_event().await {
                Some(event) => event,
                None => return std::future::pending().await,
            },
        };
        match event {
            Event::Settled(entry, Ok(receipt)) => {
                let target = &mut self.targets[entry.route.sink];
                target.metrics.published(&entry.message);
                traces::send(traces::Send {
                    system: target.sink.system(),
                    sink: Some(&target.name),
                    destination: &entry.route.destination,
                    message: &entry.message,
                    started: entry.started,
                    attempts: entry.attempts,
                    outcome: traces::Outcome::Delivered(receipt),
                });
                self.tracker.acked(entry.tx);
                self.acknowledged += 1;
                self.bytes_in_flight -= entry.message.size();
                self.next_of_key(entry.route.sink, entry.message.key.as_deref());
                self.advance();
                Ok(None)
            }
            Event::Settled(entry, Err(error)) => self.failed(entry, error),
            Event::RetryDue(entry) => {
                self.targets[entry.route.sink].metrics.retried();
                self.dispatch(entry);
                Ok(None)
            }
        }
    }

    /// When the parked pipelined sends go again: fixed at the first call of a round (logging the
    /// round once), so a `progress` dropped during the backoff resumes the same wait. The backoff
    /// counts the rounds that began with the same oldest message `first` (its sequence number).
    fn retry_round_at(&mut self, first: u64) -> tokio::time::Instant {
        if let Some(at) = self.retry_at {
            return at;
        }
        let attempts = match self.stuck {
            Some((seq, rounds)) if seq == first => rounds + 1,
            _ => 1,
        };
        self.stuck = Some((first, attempts));
        let backoff = self.backoff(attempts);
        if let Some(LastError {
            sink,
            destination,
            queue,
            error,
        }) = self.last_error.take()
        {
            tracing::warn!(
                failed = self.window.len(), sink, destination, queue, %error, attempt = attempts,
                backoff = %humantime::format_duration(backoff),
                "sends failed; retrying them in order after a backoff"
            );
        }
        *self.retry_at.insert(tokio::time::Instant::now() + backoff)
    }

    /// A failed send: parked for a retry, or given up on after `max_attempts` permanent refusals.
    /// A sink that can never deliver again stops the worker (the message stays unacknowledged).
    fn failed(
        &mut self,
        mut entry: Entry,
        error: SinkError,
    ) -> Result<Option<Undeliverable>, Fatal> {
        let target = &self.targets[entry.route.sink];
        let kind =
            match error {
                SinkError::Closed(_) => return Err(Fatal::new(
                    format!("sink {}: {error}", target.name),
                    "nothing can be delivered through it any more; unacknowledged messages are \
                     delivered again by the next run",
                )),
                SinkError::Permanent(_) => {
                    entry.permanent_failures += 1;
                    "permanent"
                }
                SinkError::Transient(_) => "transient",
            };
        target.metrics.failed(&entry.message, kind);
        tracing::debug!(
            id = %entry.message.id, queue = %entry.message.queue, sink = target.name,
            destination = %entry.route.destination, attempt = entry.attempts,
            %error, "send failed"
        );
        if entry.permanent_failures >= self.config.max_attempts {
            return Ok(Some(Undeliverable {
                tx: entry.tx,
                message: entry.message,
                sink_id: entry.route.sink,
                sink: target.name.clone(),
                destination: entry.route.destination,
                attempts: entry.attempts,
                error,
                started: entry.started,
            }));
        }
        if entry.pipelined {
            // The round's warning names a message refused for its own sake before the others
            // that failed with it (an aborted Kafka transaction fails every message in it).
            let own_fault = matches!(error, SinkError::Permanent(_));
            let have_own_fault = matches!(
                self.last_error,
                Some(LastError {
                    error: SinkError::Permanent(_),
                    ..
                })
            );
            if own_fault || !have_own_fault {
                self.last_error = Some(LastError {
                    sink: target.name.clone(),
                    destination: entry.route.destination.to_string(),
                    queue: entry.message.queue.clone(),
                    error,
                });
            }
            self.window.park(entry);
        } else {
            let backoff = self.backoff(entry.attempts);
            if entry.attempts == 1 {
                tracing::warn!(
                    id = %entry.message.id, queue = %entry.message.queue, sink = target.name,
                    destination = %entry.route.destination, %error,
                    "send failed; retrying this message alone (later ones of its key wait for it, \
                     everything else goes on)"
                );
            }
            self.window.back_off(entry, backoff);
        }
        Ok(None)
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
        metrics::dead_lettered(&u.sink, &u.message);
        let error = u.error.to_string();
        traces::send(traces::Send {
            system: self.targets[u.sink_id].sink.system(),
            sink: Some(&u.sink),
            destination: &u.destination,
            message: &u.message,
            started: u.started,
            attempts: u.attempts,
            outcome: traces::Outcome::DeadLettered(&error),
        });
        self.tracker.acked(u.tx);
        self.dead_lettered += 1;
        self.bytes_in_flight -= u.message.size();
        self.next_of_key(u.sink_id, u.message.key.as_deref());
        self.advance();
    }

    fn advance(&mut self) {
        ::metrics::gauge!(telemetry::IN_FLIGHT).set(self.in_flight() as f64);
        ::metrics::gauge!(telemetry::IN_FLIGHT_BYTES).set(self.bytes_in_flight as f64);
        if let Some(lsn) = self.tracker.confirmable() {
            self.confirmed = Some(lsn);
            ::metrics::gauge!(telemetry::CONFIRMED_LSN).set(lsn.0 as f64);
        }
    }

    /// After a lost replication connection, once settled: the open transaction will be streamed
    /// again from the last confirmed position.
    pub fn reset_stream(&mut self) {
        self.tracker.abandon_open();
    }

    pub async fn close(&self) {
        for (_, target) in self.targets.iter() {
            target.sink.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use uuid::Uuid;

    use super::*;
    use crate::message::Payload;
    use crate::sink::scripted::{ScriptedSink, Step};

    const END: Lsn = Lsn(0x100);

    fn message(n: u128) -> Message {
        keyed(n, "customer-1")
    }

    fn keyed(n: u128, key: &str) -> Message {
        Message {
            id: Uuid::from_u128(n),
            queue: "orders".into(),
            key: Some(key.into()),
            headers: BTreeMap::new(),
            payload: Payload::Json(format!("{{\"n\": {n}}}")),
            created_at: chrono::Utc::now(),
            commit_lsn: Lsn(0x10),
            index: n as u32,
            committed_at: chrono::Utc::now(),
        }
    }

    fn delivery(
        sink: &Arc<ScriptedSink>,
        max_in_flight: usize,
        max_attempts: u32,
    ) -> (Delivery, Route) {
        delivery_with(sink, max_in_flight, max_attempts, KeyOrdering::PerKey)
    }

    fn delivery_with(
        sink: &Arc<ScriptedSink>,
        max_in_flight: usize,
        max_attempts: u32,
        ordering: KeyOrdering,
    ) -> (Delivery, Route) {
        let sinks = Sinks::from_named(vec![("scripted".into(), sink.clone() as Arc<dyn Sink>)]);
        let route = Route {
            sink: sinks.iter().next().unwrap().0,
            destination: Destination::Topic("orders".into()),
        };
        let config = DeliveryConfig {
            max_in_flight,
            max_attempts,
            ordering,
            ..DeliveryConfig::default()
        };
        (Delivery::new(&sinks, config), route)
    }

    /// The run loop in miniature: one transaction of messages 1..=count, sent while the window
    /// accepts, acknowledgements handled otherwise; dead letters are "written" at once. Returns
    /// the dead-lettered ids.
    async fn deliver(delivery: &mut Delivery, route: &Route, count: u128) -> Vec<Uuid> {
        let tx = delivery.begin();
        let mut next = 1;
        let mut dead = Vec::new();
        loop {
            if next <= count && delivery.can_accept() {
                delivery.send(tx, route.clone(), message(next));
                next += 1;
                if next > count {
                    delivery.commit(tx, END);
                }
                continue;
            }
            if next > count && delivery.is_idle() {
                return dead;
            }
            if let Some(u) = delivery.progress().await.expect("no sink closed") {
                dead.push(u.message.id);
                delivery.dead_lettered(&u);
            }
        }
    }

    fn ids(sink: &ScriptedSink) -> Vec<u128> {
        sink.stored().iter().map(|s| s.id.as_u128()).collect()
    }

    fn transient() -> SinkError {
        SinkError::Transient("broker busy".into())
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_a_refused_message_is_never_overtaken_by_later_ones_of_its_key() {
        let sink = ScriptedSink::new();
        sink.on_id(Uuid::from_u128(6), Step::Reject(transient()), Some(2));
        sink.on_id(Uuid::from_u128(3), Step::Reject(transient()), Some(1));
        let (mut delivery, route) = delivery(&sink, 100, 5);
        let dead = deliver(&mut delivery, &route, 10).await;
        assert!(dead.is_empty());
        assert_eq!(ids(&sink), (1..=10).collect::<Vec<_>>());
        assert_eq!(delivery.confirmed(), Some(END));
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_other_keys_go_on_while_one_key_waits() {
        let sink = ScriptedSink::new();
        sink.on(|_, _| true, Step::Hold, None);
        let (mut delivery, route) = delivery(&sink, 100, 5);
        let tx = delivery.begin();
        for n in 0..9 {
            delivery.send(tx, route.clone(), keyed(n, &format!("k-{}", n % 3)));
        }
        delivery.commit(tx, END);
        assert_eq!(ids(&sink), [0, 1, 2], "one message per key on the wire");
        assert_eq!(delivery.in_flight(), 9);
        sink.release();
        while !delivery.is_settled() {
            delivery.progress().await.expect("no sink closed");
        }
        let mut by_key = std::collections::HashMap::<_, Vec<u128>>::new();
        for stored in sink.stored() {
            by_key
                .entry(stored.key.unwrap())
                .or_default()
                .push(stored.id.as_u128());
        }
        assert_eq!(by_key["k-0"], [0, 3, 6]);
        assert_eq!(by_key["k-1"], [1, 4, 7]);
        assert_eq!(delivery.confirmed(), Some(END));
    }

    /// 0.2.1 paused intake at any failed send until it was acknowledged: one message a broker
    /// kept refusing (a RabbitMQ queue at its length limit) held every other queue. Per key, only
    /// its own key waits.
    #[tokio::test(start_paused = true)]
    async fn per_key_a_refused_message_holds_only_its_own_key() {
        let sink = ScriptedSink::new();
        sink.on_id(Uuid::from_u128(0), Step::Reject(transient()), Some(3));
        // Room for key k-0's ten messages and one more: the other keys' go through that one.
        let (mut delivery, route) = delivery(&sink, 12, 5);
        let tx = delivery.begin();
        let mut next = 0;
        while next < 30 || !delivery.is_idle() {
            if next < 30 && delivery.can_accept() {
                delivery.send(tx, route.clone(), keyed(next, &format!("k-{}", next % 3)));
                next += 1;
                if next == 30 {
                    delivery.commit(tx, END);
                }
                continue;
            }
            assert!(delivery.progress().await.expect("no sink closed").is_none());
        }
        let stored = sink.stored();
        let first_of_k0 = stored.iter().position(|s| s.id.as_u128() == 0).unwrap();
        let others: Vec<u128> = stored[..first_of_k0]
            .iter()
            .map(|s| s.id.as_u128())
            .collect();
        assert_eq!(
            others.len(),
            20,
            "every message of the other keys went while message 0 was refused: {others:?}"
        );
        let k0: Vec<u128> = stored
            .iter()
            .map(|s| s.id.as_u128())
            .filter(|n| n % 3 == 0)
            .collect();
        assert_eq!(
            k0,
            (0..30).step_by(3).collect::<Vec<_>>(),
            "its key kept its order"
        );
        assert_eq!(sink.attempts(Uuid::from_u128(0)), 4);
        assert_eq!(delivery.confirmed(), Some(END));
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_budget_holds_intake_and_a_message_larger_than_it_still_goes() {
        let sink = ScriptedSink::new();
        sink.on(|_, _| true, Step::Hold, None);
        let (mut delivery, route) = delivery(&sink, 100, 5);
        delivery.config.max_in_flight_bytes = bytesize::ByteSize::mib(1);
        let sized = |n: u128, bytes: usize| Message {
            payload: Payload::Bytes(vec![0; bytes]),
            ..keyed(n, &format!("k-{n}"))
        };
        let tx = delivery.begin();
        delivery.send(tx, route.clone(), sized(1, 400_000));
        delivery.send(tx, route.clone(), sized(2, 400_000));
        assert!(delivery.can_accept(), "800 kB of 1 MiB");
        delivery.send(tx, route.clone(), sized(3, 400_000));
        assert!(!delivery.can_accept(), "1.2 MB: intake waits");
        sink.release();
        while !delivery.is_settled() {
            delivery.progress().await.expect("no sink closed");
        }
        assert!(delivery.can_accept());
        delivery.send(tx, route.clone(), sized(4, 3_000_000));
        assert!(!delivery.can_accept(), "a 3 MB message went alone");
        while !delivery.is_settled() {
            delivery.progress().await.expect("no sink closed");
        }
        delivery.commit(tx, END);
        assert_eq!(ids(&sink), [1, 2, 3, 4]);
        assert_eq!(delivery.confirmed(), Some(END));
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_sink_stops_delivery_and_confirms_nothing_past_it() {
        let sink = ScriptedSink::new();
        let closed = SinkError::Closed("cannot write to stdout: Broken pipe".into());
        sink.on_id(Uuid::from_u128(2), Step::Reject(closed), None);
        let (mut delivery, route) = delivery(&sink, 100, 5);
        let tx = delivery.begin();
        for n in 1..=3 {
            delivery.send(tx, route.clone(), keyed(n, &format!("k-{n}")));
        }
        delivery.commit(tx, END);
        let stopped = loop {
            if let Err(fatal) = delivery.progress().await {
                break fatal;
            }
        };
        assert!(stopped.problem.contains("Broken pipe"), "{stopped}");
        assert_eq!(delivery.confirmed(), None);
    }

    /// The trade-off of `ordering = "pipelined"`: refused messages are retried in their original
    /// order, but after later messages that were already accepted.
    #[tokio::test(start_paused = true)]
    async fn pipelined_failed_sends_go_again_in_order_after_later_ones() {
        let sink = ScriptedSink::new();
        sink.on_id(Uuid::from_u128(6), Step::Reject(transient()), Some(1));
        sink.on_id(Uuid::from_u128(3), Step::Reject(transient()), Some(1));
        let (mut delivery, route) = delivery_with(&sink, 100, 5, KeyOrdering::Pipelined);
        let dead = deliver(&mut delivery, &route, 10).await;
        assert!(dead.is_empty());
        assert_eq!(ids(&sink), [1, 2, 4, 5, 7, 8, 9, 10, 3, 6]);
        assert_eq!(delivery.confirmed(), Some(END));
    }

    /// An aborted Kafka transaction fails every message in it, so the messages behind a refused
    /// one fail with it, round after round, while the refused ones ahead are dead-lettered one by
    /// one. 0.2.2 backed off by the attempts of the oldest-sent: eight refused messages in a
    /// stream stalled it 2^8 first backoffs (the Kafka test with 150 of them: 30 s a round).
    #[tokio::test(start_paused = true)]
    async fn pipelined_rounds_back_off_longer_only_while_their_first_message_stays_stuck() {
        let sink = ScriptedSink::new();
        let refused = |n: u128| n.is_multiple_of(10);
        sink.on(
            move |m, _| refused(m.id.as_u128()),
            Step::Reject(SinkError::Permanent("no such topic".into())),
            None,
        );
        // Message n fails once for each refused message ahead of it (one abort each).
        sink.on(
            |m, attempt| u128::from(attempt) <= m.id.as_u128() / 10,
            Step::Reject(transient()),
            None,
        );
        let (mut delivery, route) = delivery_with(&sink, 100, 1, KeyOrdering::Pipelined);
        let started = tokio::time::Instant::now();
        let dead = deliver(&mut delivery, &route, 89).await;
        let rounds = 8;
        assert_eq!(dead.len(), rounds);
        let initial = DeliveryConfig::default().retry_initial;
        assert!(
            started.elapsed() <= initial * rounds as u32,
            "{:?} for {rounds} rounds that each made progress",
            started.elapsed()
        );
        let mut stored = ids(&sink);
        stored.sort_unstable();
        assert_eq!(
            stored,
            (1..=89).filter(|&n| !refused(n)).collect::<Vec<_>>()
        );
        assert_eq!(delivery.confirmed(), Some(END));
    }

    /// A broker that refuses the same first message round after round gets exponentially longer
    /// pauses.
    #[tokio::test(start_paused = true)]
    async fn pipelined_rounds_stuck_on_the_same_first_message_back_off_exponentially() {
        let sink = ScriptedSink::new();
        sink.on_id(Uuid::from_u128(1), Step::Reject(transient()), Some(5));
        let (mut delivery, route) = delivery_with(&sink, 100, 5, KeyOrdering::Pipelined);
        let started = tokio::time::Instant::now();
        deliver(&mut delivery, &route, 3).await;
        let initial = DeliveryConfig::default().retry_initial;
        // Jitter: half to all of 1, 2, 4, 8 and 16 first backoffs.
        assert!(
            started.elapsed() >= initial * 31 / 2,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(sink.attempts(Uuid::from_u128(1)), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_refused_max_attempts_times_is_handed_back_once_then_confirmed_past() {
        let sink = ScriptedSink::new();
        let refused = Uuid::from_u128(2);
        sink.on_id(
            refused,
            Step::Reject(SinkError::Permanent("too large".into())),
            None,
        );
        let (mut delivery, route) = delivery(&sink, 100, 3);
        let dead = deliver(&mut delivery, &route, 4).await;
        assert_eq!(dead, [refused]);
        assert_eq!(
            sink.attempts(refused),
            3,
            "max_attempts sends, then given up"
        );
        assert_eq!(ids(&sink), [1, 3, 4]);
        assert_eq!(delivery.confirmed(), Some(END));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_never_count_towards_max_attempts() {
        let sink = ScriptedSink::new();
        sink.on_id(Uuid::from_u128(1), Step::Reject(transient()), Some(7));
        let (mut delivery, route) = delivery(&sink, 100, 1);
        let dead = deliver(&mut delivery, &route, 2).await;
        assert!(dead.is_empty());
        assert_eq!(sink.attempts(Uuid::from_u128(1)), 8);
        assert_eq!(delivery.confirmed(), Some(END));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_confirmed_while_a_refused_message_waits_for_its_dead_letter() {
        let sink = ScriptedSink::new();
        sink.on_id(
            Uuid::from_u128(1),
            Step::Reject(SinkError::Permanent("no".into())),
            None,
        );
        let (mut delivery, route) = delivery(&sink, 100, 1);
        let tx = delivery.begin();
        delivery.send(tx, route.clone(), message(1));
        delivery.send(tx, route, message(2));
        delivery.commit(tx, END);
        let undeliverable = loop {
            if let Some(u) = delivery.progress().await.expect("no sink closed") {
                break u;
            }
        };
        assert_eq!(
            delivery.confirmed(),
            None,
            "the slot must not pass an unwritten dead letter"
        );
        assert!(
            ids(&sink).is_empty(),
            "message 2 waits for its key's dead letter"
        );
        delivery.dead_lettered(&undeliverable);
        while !delivery.is_settled() {
            delivery.progress().await.expect("no sink closed");
        }
        assert_eq!(ids(&sink), [2]);
        assert_eq!(delivery.confirmed(), Some(END));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_that_fails_again_is_not_overtaken_by_later_messages() {
        let sink = ScriptedSink::new();
        // The first send and the first retry of message 1 fail.
        sink.on_id(Uuid::from_u128(1), Step::Reject(transient()), Some(2));
        let (mut delivery, route) = delivery_with(&sink, 3, 5, KeyOrdering::Pipelined);
        let dead = deliver(&mut delivery, &route, 6).await;
        assert!(dead.is_empty());
        assert_eq!(sink.attempts(Uuid::from_u128(1)), 3);
        assert_eq!(
            ids(&sink),
            [2, 3, 1, 4, 5, 6],
            "4..6 wait until the retried 1 is acknowledged"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_acknowledgement_is_a_duplicate_not_a_loss() {
        let sink = ScriptedSink::new();
        sink.on_id(
            Uuid::from_u128(2),
            Step::StoreThenFail(transient()),
            Some(1),
        );
        let (mut delivery, route) = delivery(&sink, 100, 5);
        deliver(&mut delivery, &route, 3).await;
        assert_eq!(
            ids(&sink),
            [1, 2, 2, 3],
            "3 waits for its key: the duplicate comes first"
        );
        assert_eq!(delivery.confirmed(), Some(END));
    }

    #[tokio::test(start_paused = true)]
    async fn held_acknowledgements_hold_the_confirmed_position() {
        let sink = ScriptedSink::new();
        sink.on_id(Uuid::from_u128(1), Step::Hold, None);
        let (mut delivery, route) = delivery(&sink, 100, 5);
        let tx = delivery.begin();
        for n in 1..=3 {
            delivery.send(tx, route.clone(), message(n));
        }
        delivery.commit(tx, END);
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                delivery.progress().await.expect("no sink closed");
            }
        })
        .await;
        assert!(waited.is_err());
        assert_eq!(
            delivery.in_flight(),
            3,
            "1 held by the broker, 2 and 3 waiting for it"
        );
        assert_eq!(delivery.confirmed(), None);
        sink.release();
        while !delivery.is_settled() {
            delivery.progress().await.expect("no sink closed");
        }
        assert_eq!(delivery.confirmed(), Some(END));
    }

    /// The run loop races `progress` against the stream and shutdown, so it is dropped at any of
    /// its await points: in the window, or in the retry backoff. Nothing may be lost or counted
    /// twice.
    #[tokio::test(start_paused = true)]
    async fn progress_is_cancel_safe() {
        let sink = ScriptedSink::new();
        // The first matching rule wins: faults first, then every other send answers slowly.
        sink.on_id(Uuid::from_u128(5), Step::Reject(transient()), Some(2));
        sink.on_id(
            Uuid::from_u128(9),
            Step::Reject(SinkError::Permanent("no".into())),
            None,
        );
        sink.on(|_, _| true, Step::Slow(Duration::from_millis(7)), None);
        let (mut delivery, route) = delivery(&sink, 4, 2);
        let tx = delivery.begin();
        let mut next = 1;
        let mut dead = Vec::new();
        let mut cancelled = 0;
        while next <= 20 || !delivery.is_idle() {
            if next <= 20 && delivery.can_accept() {
                delivery.send(tx, route.clone(), message(next));
                next += 1;
                if next > 20 {
                    delivery.commit(tx, END);
                }
                continue;
            }
            // Cut every wait short after 1 ms: most calls are dropped mid-await.
            match tokio::time::timeout(Duration::from_millis(1), delivery.progress()).await {
                Ok(Ok(Some(u))) => {
                    dead.push(u.message.id.as_u128());
                    delivery.dead_lettered(&u);
                }
                Ok(Ok(None)) => {}
                Ok(Err(fatal)) => panic!("{fatal}"),
                Err(_) => cancelled += 1,
            }
        }
        assert!(
            cancelled > 20,
            "the test must actually cancel ({cancelled})"
        );
        assert_eq!(dead, [9]);
        let mut stored = ids(&sink);
        stored.sort_unstable();
        let expected: Vec<u128> = (1..=20).filter(|&n| n != 9).collect();
        assert_eq!(stored, expected, "every message stored exactly once");
        assert_eq!(delivery.confirmed(), Some(END));
    }
}
