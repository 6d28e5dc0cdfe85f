//! Exactly once into Kafka: messages go out in Kafka transactions, each ending with a progress
//! record (the stream position of its last message) in the same transaction, so that what Kafka
//! has and up to where it has it commit together. The producer's `transactional.id` is the
//! stream's: a new run or a standby fences the old writer at start, aborting what it left open,
//! then reads the committed progress and skips what is already in Kafka.
//!
//! One thread owns the producer (its transaction calls block). A send is acknowledged only once
//! its transaction committed. Any failure aborts the transaction and fails every message in it;
//! the delivery layer sends them again in order once everything in flight settled. Sends made
//! between the abort and the moment the delivery layer sees a failure of it are refused too
//! (epochs), so that nothing overtakes the aborted ones.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use tokio::sync::oneshot;

use super::progress::{self, ReadError};
use super::{classify, record_to, RecordShape};
use crate::fatal::Fatal;
use crate::lsn::Position;
use crate::message::Message;
use crate::sink::{Receipt, SinkError, StreamId};
use crate::telemetry;

/// A transaction commits once nothing more came for `QUIET` (a slow stream waits no longer for
/// company), once its first message is `LINGER` old (a steady one is not held longer), or at
/// `MAX_MESSAGES` (half the default in-flight window: the other half fills meanwhile).
const QUIET: Duration = Duration::from_millis(2);
const LINGER: Duration = Duration::from_millis(20);
const MAX_MESSAGES: usize = 5_000;
/// How long a commit, an abort or the fencing at start may take before it is tried again.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What the sink's `send` and `close` share with the transaction thread.
pub struct Transactions {
    progress_topic: String,
    commands: Mutex<mpsc::Sender<Command>>,
    shared: Arc<Shared>,
}

struct Shared {
    /// Bumped by every abort: a send stamped with an older epoch is refused.
    epoch: AtomicU64,
    /// The epoch sends are stamped with. It catches up with `epoch` when the delivery layer
    /// receives a failure of the aborted transaction: from then on it sends nothing new until
    /// the failed messages went again, in order.
    accepting: AtomicU64,
    /// Up to where this stream's messages are committed in Kafka.
    committed: Mutex<Option<Position>>,
    /// The last transaction committed (or none failed yet).
    healthy: AtomicBool,
}

type Reply = oneshot::Sender<Result<Receipt, (SinkError, u64)>>;

enum Command {
    Start {
        stream: StreamId,
        reply: oneshot::Sender<Result<(), Fatal>>,
    },
    Produce {
        topic: String,
        message: Arc<Message>,
        epoch: u64,
        reply: Reply,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

impl Transactions {
    pub fn new(
        sink: &str,
        client: ClientConfig,
        reader: ClientConfig,
        records: RecordShape,
        progress_topic: String,
        routes: String,
    ) -> Result<Transactions, String> {
        let (commands, receiver) = mpsc::channel();
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            accepting: AtomicU64::new(0),
            committed: Mutex::new(None),
            healthy: AtomicBool::new(true),
        });
        let writer = Writer {
            sink: sink.to_owned(),
            client,
            reader,
            records,
            progress_topic: progress_topic.clone(),
            routes,
            shared: shared.clone(),
            producer: None,
            key: String::new(),
            open: Vec::new(),
            opened_at: None,
            known_topics: HashSet::new(),
            size_suspects: HashSet::new(),
            closed: None,
        };
        std::thread::Builder::new()
            .name("kafka-transactions".into())
            .spawn(move || writer.run(&receiver))
            .map_err(|e| format!("cannot start the transaction thread: {e}"))?;
        Ok(Transactions {
            progress_topic,
            commands: Mutex::new(commands),
            shared,
        })
    }

    fn command(&self, command: Command) {
        // A send error means the thread is gone: the dropped reply says so to the waiter.
        let _ = self.commands.lock().unwrap().send(command);
    }

    /// Fences earlier writers of `stream`, then reads up to where Kafka has its messages.
    pub async fn start(&self, stream: &StreamId) -> Result<(), Fatal> {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Start {
            stream: stream.clone(),
            reply,
        });
        answer.await.unwrap_or_else(|_| {
            Err(Fatal::new(
                "kafka: the transaction thread stopped",
                "see the log above",
            ))
        })
    }

    pub fn send(&self, topic: &str, message: &Arc<Message>) -> super::Ack {
        if topic == self.progress_topic {
            let error = SinkError::Permanent(format!(
                "kafka: {topic:?} is this sink's progress topic, not a destination; route the \
                 queue elsewhere or name another progress_topic"
            ));
            return Box::pin(async move { Err(error) });
        }
        let (reply, answer) = oneshot::channel();
        self.command(Command::Produce {
            topic: topic.to_owned(),
            message: message.clone(),
            epoch: self.shared.accepting.load(Ordering::Acquire),
            reply,
        });
        let shared = self.shared.clone();
        Box::pin(async move {
            match answer.await {
                Ok(Ok(receipt)) => Ok(receipt),
                Ok(Err((error, epoch))) => {
                    // The delivery layer now knows of the abort: new sends are accepted again.
                    shared.accepting.fetch_max(epoch, Ordering::AcqRel);
                    Err(error)
                }
                Err(_) => Err(SinkError::Closed(
                    "kafka: the transaction thread stopped".into(),
                )),
            }
        })
    }

    pub fn committed(&self) -> Option<Position> {
        *self.shared.committed.lock().unwrap()
    }

    pub fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// Aborts the open transaction (its messages are sent again by the next run, and skipped by
    /// no one: they were never committed).
    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        self.command(Command::Close { reply });
        let _ = answer.await;
    }
}

/// A message in the open transaction.
struct Pending {
    id: uuid::Uuid,
    position: Position,
    reply: Reply,
    delivery: DeliveryFuture,
    /// Its partition and offset, once its delivery report came.
    receipt: Receipt,
}

/// The transaction thread's state.
struct Writer {
    sink: String,
    client: ClientConfig,
    /// For the progress topic's admin client and reader.
    reader: ClientConfig,
    records: RecordShape,
    progress_topic: String,
    /// This run's [`progress::routes_fingerprint`].
    routes: String,
    shared: Arc<Shared>,
    producer: Option<FutureProducer>,
    /// The stream's `transactional.id`, also the key of its progress record.
    key: String,
    open: Vec<Pending>,
    opened_at: Option<Instant>,
    /// Topics the cluster has and lets the worker see ([`Writer::check_topic`]).
    known_topics: HashSet<String>,
    /// Messages refused for size together with others: each is sent again alone.
    size_suspects: HashSet<uuid::Uuid>,
    /// Why nothing can be sent any more (fenced, or a fatal producer error).
    closed: Option<String>,
}

impl Writer {
    fn run(mut self, commands: &mpsc::Receiver<Command>) {
        loop {
            let next = match self.opened_at {
                None => commands.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => commands.recv_timeout(
                    QUIET.min((at + LINGER).saturating_duration_since(Instant::now())),
                ),
            };
            let quiet = matches!(next, Err(RecvTimeoutError::Timeout));
            match next {
                Ok(Command::Start { stream, reply }) => {
                    let _ = reply.send(self.start(&stream));
                }
                Ok(Command::Produce {
                    topic,
                    message,
                    epoch,
                    reply,
                }) => self.produce(&topic, message, epoch, reply),
                Ok(Command::Close { reply }) => {
                    self.abort("the worker is stopping");
                    let _ = reply.send(());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.abort("the sink was dropped");
                    return;
                }
            }
            let due = self.opened_at.is_some_and(|at| {
                quiet || at.elapsed() >= LINGER || self.open.len() >= MAX_MESSAGES
            });
            if due {
                self.commit();
            }
        }
    }

    fn start(&mut self, stream: &StreamId) -> Result<(), Fatal> {
        if let Some(why) = &self.closed {
            return Err(Fatal::new(why.clone(), "start the worker again"));
        }
        // A stream that starts again (a lost replication connection) begins with nothing open.
        if self.opened_at.is_some() {
            self.abort("the stream starts again");
        }
        self.key = format!(
            "pg_outbox-{}-{}-{}-{}",
            stream.system, stream.database, stream.slot, self.sink
        );
        let mut client = self.client.clone();
        client.set("transactional.id", &self.key);
        let producer: FutureProducer = client.create().map_err(|e| {
            Fatal::new(
                format!("sinks.{}: {e}", self.sink),
                "check the sink's properties",
            )
        })?;
        let mut attempt = 0u32;
        let started = Instant::now();
        while let Err(e) = producer.init_transactions(CALL_TIMEOUT) {
            let unsupported = matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::UnsupportedFeature | RDKafkaErrorCode::UnsupportedVersion)
            );
            if let Some(problem) = self
                .fatal(&e, &producer)
                .or_else(|| unsupported.then(|| format!("kafka: {e}")))
            {
                return Err(unsupported_or(problem, &self.sink));
            }
            attempt += 1;
            tracing::warn!(sink = self.sink, error = %e, attempt,
                "kafka: cannot start transactions yet (fencing earlier writers); retrying");
            std::thread::sleep(Duration::from_millis(500));
        }
        self.producer = Some(producer);
        let fenced = started.elapsed();
        let created = progress::ensure_topic(&self.reader, &self.progress_topic, CALL_TIMEOUT)
            .map_err(|e| {
                Fatal::new(
                    format!("sinks.{}: {e}", self.sink),
                    format!(
                        "create the compacted topic {:?} (cleanup.policy=compact) or grant the \
                         worker's Kafka user the right to, or name another with progress_topic",
                        self.progress_topic
                    ),
                )
            })?;
        let mut waits = 0u32;
        let committed = loop {
            match progress::read(&self.reader, &self.progress_topic, &self.key, CALL_TIMEOUT) {
                Ok(committed) => break committed,
                Err(ReadError::NotYet(e)) => {
                    if waits.is_multiple_of(20) {
                        tracing::warn!(
                            sink = self.sink,
                            error = e,
                            "kafka: reading the progress again"
                        );
                    }
                    waits += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(ReadError::Broken(e)) => {
                    return Err(Fatal::new(
                        format!("sinks.{}: {e}", self.sink),
                        format!(
                            "progress_topic {:?} must be pg_outbox's alone; name another one",
                            self.progress_topic
                        ),
                    ))
                }
            }
        };
        tracing::debug!(?fenced, took = ?started.elapsed(), "kafka: fenced and read the progress");
        let (topic, key) = (&self.progress_topic, &self.key);
        let resume_after = match committed {
            Some(committed) if committed.routes == self.routes => {
                tracing::info!(sink = self.sink, transactional_id = key, topic,
                    position = %committed.position,
                    "kafka: exactly once; resuming after the last committed position");
                Some(committed.position)
            }
            Some(committed) => {
                tracing::warn!(sink = self.sink, transactional_id = key, topic,
                    position = %committed.position,
                    "kafka: exactly once, but the routes changed since the last committed \
                     position: messages up to it that the slot sends again are sent again this \
                     once (some may be duplicates)");
                None
            }
            None if created => {
                tracing::info!(
                    sink = self.sink,
                    transactional_id = key,
                    topic,
                    "kafka: exactly once; created the progress topic, nothing committed yet (if \
                     it existed before and was deleted, messages Kafka already has may be sent \
                     again this once)"
                );
                None
            }
            None => {
                tracing::warn!(
                    sink = self.sink,
                    transactional_id = key,
                    topic,
                    "kafka: exactly once, but the progress topic has no position for this \
                     stream: a first start, or the topic lost it (deleted, or the PostgreSQL \
                     system changed): messages Kafka already has from before, if any, are sent \
                     again this once"
                );
                None
            }
        };
        *self.shared.committed.lock().unwrap() = resume_after;
        Ok(())
    }

    fn produce(&mut self, topic: &str, message: Arc<Message>, epoch: u64, reply: Reply) {
        if let Some(why) = &self.closed {
            let _ = reply.send(Err((SinkError::Closed(why.clone()), epoch)));
            return;
        }
        // A message refused for size with others goes in a transaction of its own: only then is
        // a size refusal its own fault. (The open one commits first; if that fails, this message
        // was sent behind it and is refused below, as the others queued behind an abort.)
        let alone = self.size_suspects.contains(&message.id);
        if alone && self.opened_at.is_some() {
            self.commit();
        }
        let current = self.shared.epoch.load(Ordering::Acquire);
        if epoch < current {
            let _ = reply.send(Err((
                SinkError::Transient(
                    "kafka: an earlier transaction was aborted; sent again after its messages"
                        .into(),
                ),
                current,
            )));
            return;
        }
        let Some(producer) = self.producer.clone() else {
            let _ = reply.send(Err((
                SinkError::Closed("kafka: a send before the sink started".into()),
                current,
            )));
            return;
        };
        if self.opened_at.is_none() {
            if let Err(e) = producer.begin_transaction() {
                let error = self.failure(&e, &producer);
                let _ = reply.send(Err((error, current)));
                return;
            }
            self.opened_at = Some(Instant::now());
        }
        let enqueued = record_to(topic, &message, self.records).and_then(|record| {
            self.check_topic(&producer, topic)?;
            producer
                .send_result(record)
                // Refused at once: too large for `message.max.bytes`, or a fatal state.
                .map_err(|(e, _)| {
                    self.close_if_fatal(&e, &producer)
                        .unwrap_or_else(|| classify(e.clone()))
                })
        });
        match enqueued {
            Ok(delivery) => {
                self.open.push(Pending {
                    id: message.id,
                    position: message.position(),
                    reply,
                    delivery,
                    receipt: Receipt::default(),
                });
                if alone {
                    self.commit();
                }
            }
            // Refused before it entered the transaction. What came before it commits: it is not
            // at fault, and aborting it would fail it again with each refused message ahead.
            // (An abort this soon after a commit could also fail for good: librdkafka 2.12's
            // issue #4849.) Nothing may commit a position past this message while it waits for
            // its retry or its dead letter: the sends queued behind it are refused, as behind
            // an abort.
            Err(error) => {
                if self.opened_at.is_some() {
                    self.commit();
                }
                self.abort(&error.to_string());
                let epoch = self.shared.epoch.load(Ordering::Acquire);
                let _ = reply.send(Err((error, epoch)));
            }
        }
    }

    /// A topic the cluster does not have, or that the worker may not write, is refused at once:
    /// inside a transaction librdkafka would wait `topic.metadata.propagation.max.ms` (30 s)
    /// for it while holding every other message of the transaction. Topics found are remembered.
    fn check_topic(&mut self, producer: &FutureProducer, topic: &str) -> Result<(), SinkError> {
        if self.known_topics.contains(topic) {
            return Ok(());
        }
        let metadata = producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| SinkError::Transient(format!("kafka: metadata of {topic:?}: {e}")))?;
        let error = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .and_then(|t| t.error());
        match error.map(RDKafkaErrorCode::from) {
            None => {
                self.known_topics.insert(topic.to_owned());
                Ok(())
            }
            Some(
                code @ (RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::InvalidTopic),
            ) => Err(SinkError::Permanent(format!(
                "kafka: topic {topic:?}: {code}"
            ))),
            Some(code) => Err(SinkError::Transient(format!(
                "kafka: topic {topic:?}: {code}"
            ))),
        }
    }

    /// Writes the progress record and commits; on failure aborts, failing every message.
    fn commit(&mut self) {
        let producer = self.producer.clone().expect("a transaction is open");
        let position = self.open.iter().map(|p| p.position).max();
        let previous = *self.shared.committed.lock().unwrap();
        let through = position.max(previous);
        let progress = match through {
            Some(through) => {
                let value = progress::encode(through, &self.routes);
                let record = FutureRecord::to(&self.progress_topic)
                    .partition(progress::PARTITION)
                    .key(&self.key)
                    .payload(&value);
                producer.send_result(record).map(Some).map_err(|(e, _)| e)
            }
            None => Ok(None),
        };
        let mut open = std::mem::take(&mut self.open);
        let (open_for, committing) = (self.opened_at.map(|at| at.elapsed()), Instant::now());
        let (outcome, own) = delivered(&mut open, progress);
        let own = self.own_refusals(&open, own);
        let reports = committing.elapsed();
        let outcome = outcome.and_then(|()| loop {
            match commit_transaction(&producer, CALL_TIMEOUT) {
                Err(Retry(e)) => {
                    tracing::warn!(
                        sink = self.sink,
                        error = e,
                        "kafka: commit not confirmed yet; retrying"
                    );
                }
                Err(Failed(e)) => break Err(e),
                Ok(()) => break Ok(()),
            }
        });
        self.opened_at = None;
        tracing::debug!(messages = open.len(), ?open_for, ?reports, commit = ?committing.elapsed(),
            ok = outcome.is_ok(), "kafka: transaction ended");
        match outcome {
            Ok(()) => {
                *self.shared.committed.lock().unwrap() = through;
                self.shared.healthy.store(true, Ordering::Release);
                metrics::counter!(telemetry::KAFKA_TRANSACTIONS, "sink" => self.sink.clone(), "outcome" => "committed")
                    .increment(1);
                for pending in open {
                    self.size_suspects.remove(&pending.id);
                    let _ = pending.reply.send(Ok(pending.receipt));
                }
            }
            Err(e) => {
                let error = self.failure(&e, &producer);
                self.shared.epoch.fetch_add(1, Ordering::AcqRel);
                self.shared.healthy.store(false, Ordering::Release);
                if self.closed.is_none() {
                    self.abort_transaction(&producer, &e.to_string());
                }
                let epoch = self.shared.epoch.load(Ordering::Acquire);
                for (pending, own) in open.into_iter().zip(own) {
                    let error = match (&error, own) {
                        (SinkError::Closed(_), _) => error.clone(),
                        (_, Some(own)) => own,
                        (_, None) => error.clone(),
                    };
                    let _ = pending.reply.send(Err((error, epoch)));
                }
            }
        }
    }

    /// Each message's own refusal for good, from its delivery error (the others of an aborted
    /// transaction fail as transient). The broker refuses a whole batch for size when one message
    /// of it is too large, so a size refusal counts against a message only when it was alone in
    /// its transaction; otherwise it is transient and the message is sent again alone.
    fn own_refusals(
        &mut self,
        open: &[Pending],
        own: Vec<Option<KafkaError>>,
    ) -> Vec<Option<SinkError>> {
        use RDKafkaErrorCode::{MessageBatchTooLarge, MessageSizeTooLarge};
        let alone = open.len() == 1;
        open.iter()
            .zip(own)
            .map(|(pending, own)| {
                let error = own?;
                let size = matches!(
                    error.rdkafka_error_code(),
                    Some(MessageSizeTooLarge | MessageBatchTooLarge)
                );
                if size && !alone {
                    if self.size_suspects.len() > 100_000 {
                        self.size_suspects.clear();
                    }
                    self.size_suspects.insert(pending.id);
                    return Some(SinkError::Transient(format!(
                        "kafka: {error} (refused with others in one batch; sent again alone)"
                    )));
                }
                match classify(error) {
                    permanent @ SinkError::Permanent(_) => Some(permanent),
                    _ => None,
                }
            })
            .collect()
    }

    /// Aborts the open transaction, if any, failing its messages, and refuses every send queued
    /// behind them until the delivery layer has seen one of these failures.
    fn abort(&mut self, why: &str) {
        self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        self.shared.healthy.store(false, Ordering::Release);
        if let (Some(producer), Some(_)) = (self.producer.clone(), self.opened_at.take()) {
            if self.closed.is_none() {
                self.abort_transaction(&producer, why);
            }
        }
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        for pending in std::mem::take(&mut self.open) {
            let error = SinkError::Transient(format!("kafka: transaction aborted: {why}"));
            let _ = pending.reply.send(Err((error, epoch)));
        }
    }

    fn abort_transaction(&mut self, producer: &FutureProducer, why: &str) {
        metrics::counter!(telemetry::KAFKA_TRANSACTIONS, "sink" => self.sink.clone(), "outcome" => "aborted")
            .increment(1);
        tracing::warn!(
            sink = self.sink,
            reason = why,
            "kafka: transaction aborted; its messages are sent again in order"
        );
        loop {
            match producer.abort_transaction(CALL_TIMEOUT) {
                Ok(()) => return,
                Err(e) => {
                    if self.close_if_fatal(&e, producer).is_some() {
                        return;
                    }
                    tracing::warn!(sink = self.sink, error = %e, "kafka: abort not confirmed yet; retrying");
                }
            }
        }
    }

    /// What a failed transaction call means for the messages in it; a fatal error closes the sink.
    fn failure(&mut self, error: &KafkaError, producer: &FutureProducer) -> SinkError {
        self.close_if_fatal(error, producer)
            .unwrap_or_else(|| SinkError::Transient(format!("kafka: transaction aborted: {error}")))
    }

    /// A fatal `error` closes the sink for good: the error every message gets from then on.
    fn close_if_fatal(
        &mut self,
        error: &KafkaError,
        producer: &FutureProducer,
    ) -> Option<SinkError> {
        let why = self.fatal(error, producer)?;
        self.closed = Some(why.clone());
        Some(SinkError::Closed(why))
    }

    /// The message that stops this sink for good, if `error` is fatal: fenced by a newer writer
    /// of the stream, or another fatal producer error. Either way a new run resumes from the
    /// committed progress.
    fn fatal(&self, error: &KafkaError, producer: &FutureProducer) -> Option<String> {
        let fatal = producer.client().fatal_error();
        let code = fatal
            .as_ref()
            .map(|(code, _)| *code)
            .or(error.rdkafka_error_code());
        let is_fatal =
            fatal.is_some() || matches!(error, KafkaError::Transaction(e) if e.is_fatal());
        if !is_fatal {
            return None;
        }
        use RDKafkaErrorCode::*;
        Some(match code {
            Some(ProducerFenced | Fenced | InvalidProducerEpoch | TransactionCoordinatorFenced) => {
                format!(
                    "kafka: fenced: another worker took over this stream's transactional.id {:?} \
                     (a standby, or a newer run of this one), or this worker's transaction \
                     outlived transaction.timeout.ms (the process paused, or cut off from Kafka) \
                     and the coordinator aborted it; this one stops, and what it had not \
                     committed is sent by the next run (or the new writer)",
                    self.key
                )
            }
            _ => format!(
                "kafka: the transactional producer failed for good ({}); a new run resumes from \
                 the committed progress",
                fatal.map_or_else(|| error.to_string(), |(_, text)| text)
            ),
        })
    }
}

/// Waits for the delivery report of every message of the transaction and of its progress record
/// (rdkafka's `commit_transaction` flushes by polling a queue that the producer's own thread
/// serves, 100 ms at a time: that cost every transaction 100 ms). Returns the first failure, and
/// each message's own delivery error.
fn delivered(
    open: &mut [Pending],
    progress: Result<Option<DeliveryFuture>, KafkaError>,
) -> (Result<(), KafkaError>, Vec<Option<KafkaError>>) {
    let mut first: Option<KafkaError> = None;
    let mut report = |delivery: &mut DeliveryFuture| -> Result<Receipt, KafkaError> {
        let error = match futures::executor::block_on(delivery) {
            Ok(Ok(delivered)) => return Ok(Receipt::kafka(delivered.partition, delivered.offset)),
            Ok(Err((error, _))) => error,
            Err(_) => KafkaError::Canceled,
        };
        first.get_or_insert_with(|| error.clone());
        Err(error)
    };
    let own = open
        .iter_mut()
        .map(|pending| {
            report(&mut pending.delivery)
                .map(|receipt| pending.receipt = receipt)
                .err()
        })
        .collect();
    match progress {
        Ok(Some(mut delivery)) => {
            let _ = report(&mut delivery);
        }
        Ok(None) => {}
        Err(error) => {
            first.get_or_insert(error);
        }
    }
    (first.map_or(Ok(()), Err), own)
}

/// Why a commit did not succeed.
enum CommitError {
    /// Not confirmed yet; calling again is allowed.
    Retry(String),
    /// The transaction must be aborted, or the producer failed for good.
    Failed(KafkaError),
}
use CommitError::{Failed, Retry};

/// librdkafka's own commit. rdkafka's wrapper first flushes by polling a queue that the
/// producer's own thread serves, 100 ms at a time, which held a commit 100 ms whenever a report
/// was still on that queue; librdkafka's flush waits for it instead.
fn commit_transaction(producer: &FutureProducer, timeout: Duration) -> Result<(), CommitError> {
    use rdkafka::bindings as rd;
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the client pointer is valid while `producer` is borrowed. A non-null result is an
    // error object that is ours: it is read, then destroyed once, and its string is copied
    // before that.
    unsafe {
        let error = rd::rd_kafka_commit_transaction(producer.client().native_ptr(), timeout_ms);
        if error.is_null() {
            return Ok(());
        }
        let code = RDKafkaErrorCode::from(rd::rd_kafka_error_code(error));
        let text = std::ffi::CStr::from_ptr(rd::rd_kafka_error_string(error))
            .to_string_lossy()
            .into_owned();
        let retry = rd::rd_kafka_error_is_retriable(error) != 0
            && rd::rd_kafka_error_txn_requires_abort(error) == 0
            && rd::rd_kafka_error_is_fatal(error) == 0;
        rd::rd_kafka_error_destroy(error);
        if retry {
            Err(Retry(text))
        } else {
            // A fatal error is also the client's `fatal_error()`, which `fatal` reads.
            Err(Failed(KafkaError::Global(code)))
        }
    }
}

/// A broker without transactions gets a hint that names the setting.
fn unsupported_or(problem: String, sink: &str) -> Fatal {
    Fatal::new(
        format!("sinks.{sink}: {problem}"),
        format!(
            "the brokers must support Kafka transactions (Apache Kafka 0.11 or later, with the \
             transaction state log's replication satisfiable); or set sinks.{sink}.exactly_once = \
             false for at-least-once delivery"
        ),
    )
}
