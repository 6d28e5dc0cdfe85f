//! Kafka through librdkafka: idempotent producer, `acks=all`, key → partition with Java's
//! murmur2 partitioner (same key, same partition as a Java producer would pick), outbox headers.
//! With `exactly_once` (the default for `run`), sends go through Kafka transactions
//! ([`transactions`]) with the stream's progress beside them ([`progress`]).

pub mod progress;
mod transactions;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use outbox_client::contract::{HEADER_CREATED_AT, HEADER_ID, HEADER_QUEUE};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::ClientConfig;

use self::transactions::Transactions;
use super::{Ack, Receipt, Sink, SinkError, StreamId};
use crate::config::{KafkaSinkConfig, RecordShape};
use crate::fatal::Fatal;
use crate::lsn::Position;
use crate::message::{is_content_type, Message};
use crate::router::Destination;
use crate::rules::describe_kafka_error;

pub struct KafkaSink {
    client_config: ClientConfig,
    producer: Arc<RwLock<FutureProducer>>,
    /// Set when the producer hit a fatal error (for example fenced after an epoch bump that the
    /// broker refused): the next send replaces it. The caller re-sends everything that failed, in
    /// order, only after all in-flight sends settled, so nothing is left on the old one.
    broken: Arc<AtomicBool>,
    /// The last send succeeded (or none failed yet): one half of `/health/ready`.
    healthy: Arc<AtomicBool>,
    /// The brokers answered the last metadata request ([`probe_brokers`]): the other half.
    brokers_answer: Arc<AtomicBool>,
    /// The producer keeps each partition's order through failures by itself ([`keeps_order`]).
    keeps_order: bool,
    records: RecordShape,
    /// Exactly once: sends go through Kafka transactions instead of `producer`.
    transactions: Option<Transactions>,
}

/// Our defaults; any property in the config overrides them. Public for the bench's bare producer
/// (worker-bench), which must use the same properties.
pub fn client_config(config: &KafkaSinkConfig, max_in_flight: usize) -> ClientConfig {
    let mut client = common_config(config, max_in_flight);
    client
        // A batch the broker refuses for good must not leave a gap that later messages of the
        // same partition jump: librdkafka turns it into a fatal error instead, the failed
        // messages come back in order, and the sink replaces the producer and sends them again.
        .set("enable.gapless.guarantee", "true")
        // No local time-out: librdkafka retries a message until the broker takes it. A time-out
        // fails the older messages of a partition while younger ones, queued later, still get
        // through once the broker answers again: the worker's re-send of the older ones would
        // land behind them. An outage shows as not ready (the broker probe) and in the lag.
        .set("message.timeout.ms", "0");
    with_properties(client, config)
}

/// The transactional producer's properties (its `transactional.id` is set at start). A failure
/// aborts the whole transaction, so the order holds without the gapless guarantee, and a local
/// time-out (librdkafka's default: `transaction.timeout.ms`) only aborts it too.
fn transactional_config(config: &KafkaSinkConfig, max_in_flight: usize) -> ClientConfig {
    let mut client = common_config(config, max_in_flight);
    // The first produce of a transaction that follows a commit at once is answered
    // CONCURRENT_TRANSACTIONS while the broker writes the last one's markers; the default backoff
    // (100 ms) then held every transaction 100 ms. (Java's producer retries that one after 20 ms.)
    client.set("retry.backoff.ms", "5");
    with_properties(client, config)
}

/// For the progress topic's reader and admin client: the brokers and the sink's own properties
/// (security), none of our producer defaults.
fn reader_config(config: &KafkaSinkConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (key, value) in config.flat_properties() {
        client.set(key, value);
    }
    client
}

fn common_config(config: &KafkaSinkConfig, max_in_flight: usize) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "outbox-worker")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set(
            "queue.buffering.max.messages",
            (max_in_flight + 1000).max(100_000).to_string(),
        );
    client
}

/// The sink's own properties over ours.
fn with_properties(mut client: ClientConfig, config: &KafkaSinkConfig) -> ClientConfig {
    let properties = config.flat_properties();
    for (key, value) in &properties {
        client.set(key, value);
    }
    // The gapless guarantee needs idempotence: turning idempotence off turns it off too.
    if is_off(client.get("enable.idempotence"))
        && !properties.contains_key("enable.gapless.guarantee")
    {
        client.set("enable.gapless.guarantee", "false");
    }
    client
}

/// A librdkafka boolean set to false.
fn is_off(value: Option<&str>) -> bool {
    matches!(
        value.map(str::to_ascii_lowercase).as_deref(),
        Some("false" | "f" | "0")
    )
}

impl KafkaSink {
    /// `exactly_once`: the sink's setting, unless the caller sends again on purpose (replay).
    /// `routes`: this run's [`progress::routes_fingerprint`].
    pub fn new(
        name: &str,
        config: &KafkaSinkConfig,
        max_in_flight: usize,
        exactly_once: bool,
        routes: String,
    ) -> Result<KafkaSink, String> {
        config.check()?;
        let client_config = client_config(config, max_in_flight);
        let records = config.record_shape().unwrap_or(RecordShape::Outbox);
        let transactions = exactly_once
            .then(|| {
                Transactions::new(
                    name,
                    transactional_config(config, max_in_flight),
                    reader_config(config),
                    records,
                    config.progress_topic.clone(),
                    routes,
                )
            })
            .transpose()?;
        let keeps_order = transactions.is_some() || keeps_order(&client_config);
        if !keeps_order {
            tracing::warn!(
                "kafka: with these properties a failed send can be overtaken by later messages of \
                 its partition, so each key has one message in flight at a time (slower); keep \
                 enable.idempotence and enable.gapless.guarantee on and message.timeout.ms = 0 \
                 to pipeline"
            );
        }
        let producer = client_config
            .create()
            .map_err(|e| describe_kafka_error(&e))?;
        let producer = Arc::new(RwLock::new(producer));
        let brokers_answer = Arc::new(AtomicBool::new(false));
        let (weak, answer) = (Arc::downgrade(&producer), brokers_answer.clone());
        std::thread::Builder::new()
            .name("kafka-probe".into())
            .spawn(move || probe_brokers(&weak, &answer))
            .map_err(|e| format!("cannot start the broker probe: {e}"))?;
        Ok(KafkaSink {
            client_config,
            producer,
            broken: Arc::new(AtomicBool::new(false)),
            healthy: Arc::new(AtomicBool::new(true)),
            brokers_answer,
            keeps_order,
            records,
            transactions,
        })
    }

    /// The producer to send with, replaced first if the last one broke.
    fn producer(&self) -> Result<FutureProducer, SinkError> {
        if self.broken.swap(false, Ordering::AcqRel) {
            let fresh: FutureProducer = self.client_config.create().map_err(|e| {
                SinkError::Transient(format!("kafka: cannot recreate the producer: {e}"))
            })?;
            tracing::warn!("kafka producer hit a fatal error; replaced it with a new one");
            *self.producer.write().unwrap() = fresh;
        }
        Ok(self.producer.read().unwrap().clone())
    }
}

/// Whether a failed send always takes every later message of its partition down with it, so that
/// the worker's in-order re-send cannot land behind them: the idempotent producer with the gapless
/// guarantee, and no local time-out (a time-out fails the older messages of a partition and lets
/// the younger ones through). Otherwise delivery sends one message per key at a time.
fn keeps_order(config: &ClientConfig) -> bool {
    let on = |key: &str| !is_off(config.get(key));
    // `delivery.timeout.ms` is librdkafka's alias of `message.timeout.ms`.
    let no_timeout = ["message.timeout.ms", "delivery.timeout.ms"]
        .iter()
        .all(|key| config.get(key).is_none_or(|v| v.trim() == "0"));
    on("enable.idempotence") && on("enable.gapless.guarantee") && no_timeout
}

/// Every few seconds, for as long as the sink lives: do the brokers answer a metadata request?
/// Only then is the sink ready, so an unreachable cluster reads not-ready even with no traffic.
fn probe_brokers(producer: &Weak<RwLock<FutureProducer>>, answer: &AtomicBool) {
    const EVERY: Duration = Duration::from_secs(5);
    while let Some(producer) = producer.upgrade() {
        let client = producer.read().unwrap().clone();
        drop(producer);
        let answered = brokers_answer(&client, EVERY);
        match (answer.swap(answered, Ordering::AcqRel), answered) {
            (false, true) => tracing::info!("kafka brokers answer"),
            (true, false) => tracing::warn!("kafka brokers do not answer metadata requests"),
            _ => {}
        }
        std::thread::sleep(if answered {
            EVERY
        } else {
            Duration::from_millis(500)
        });
    }
}

/// A metadata request for the brokers and the topics the producer already knows (not every topic
/// of the cluster, which rdkafka's `fetch_metadata(None)` asks for).
fn brokers_answer(producer: &FutureProducer, timeout: Duration) -> bool {
    use rdkafka::bindings::{rd_kafka_metadata, rd_kafka_metadata_destroy, rd_kafka_metadata_t};
    let mut metadata: *const rd_kafka_metadata_t = std::ptr::null();
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the client pointer is valid while `producer` is borrowed; all_topics = 0 with no
    // topic handle is librdkafka's "known topics" request; on success the result is ours to
    // destroy, once.
    unsafe {
        let error = rd_kafka_metadata(
            producer.client().native_ptr(),
            0,
            std::ptr::null_mut(),
            &mut metadata,
            timeout_ms,
        );
        if error != rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            return false;
        }
        rd_kafka_metadata_destroy(metadata);
    }
    true
}

fn is_fatal(error: &KafkaError, producer: &FutureProducer) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::Fatal | RDKafkaErrorCode::ProducerFenced)
    ) || producer.client().fatal_error().is_some()
}

fn headers(message: &Message, records: RecordShape) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 5);
    // The publisher's content-type wins and is sent once, among the fixed headers.
    for (key, value) in message.headers.iter().filter(|(k, _)| !is_content_type(k)) {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let id = message.id.to_string();
    let created_at = message.created_at_rfc3339();
    let fixed = [
        (HEADER_ID, id.as_str()),
        (HEADER_QUEUE, message.queue.as_str()),
        (HEADER_CREATED_AT, created_at.as_str()),
        ("content-type", message.content_type()),
    ];
    for (key, value) in fixed {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    if records == RecordShape::Debezium {
        // Last, so that a publisher's own `id` header (kept, before it) is not the one that
        // Debezium consumers read with `lastHeader("id")`.
        headers = headers.insert(Header {
            key: DEBEZIUM_ID_HEADER,
            value: Some(id.as_str()),
        });
    }
    headers
}

/// The longest topic name Kafka accepts.
const MAX_TOPIC_LEN: usize = 249;

/// The header in which Debezium's Outbox Event Router puts the event id.
const DEBEZIUM_ID_HEADER: &str = "id";

/// Permanent: the broker (or librdkafka, before sending) refuses these bytes for good. A topic
/// the cluster does not have (auto-creation off) is the route's fault: librdkafka gives up on it
/// after `topic.metadata.propagation.max.ms` (30 s by default).
fn classify(error: KafkaError) -> SinkError {
    use RDKafkaErrorCode::*;
    match error.rdkafka_error_code() {
        Some(
            MessageSizeTooLarge
            | UnknownTopic
            | InvalidTopic
            | TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | InvalidRecord
            | InvalidMessage
            | MessageBatchTooLarge,
        ) => SinkError::Permanent(format!("kafka: {error}")),
        _ => SinkError::Transient(format!("kafka: {error}")),
    }
}

/// The record of `message` for `topic`, or why it cannot be sent.
fn record_to<'a>(
    topic: &'a str,
    message: &'a Message,
    records: RecordShape,
) -> Result<FutureRecord<'a, str, [u8]>, SinkError> {
    // librdkafka would only say "Unknown topic", as if it were to be created.
    if topic.len() > MAX_TOPIC_LEN {
        return Err(SinkError::Permanent(format!(
            "kafka: the topic name is {} characters, over Kafka's limit of {MAX_TOPIC_LEN}; \
             shorten the queue name or route it to a shorter topic",
            topic.len()
        )));
    }
    let mut record = FutureRecord::to(topic)
        .payload(message.payload.as_bytes())
        .headers(headers(message, records))
        .timestamp(message.created_at.timestamp_millis());
    if let Some(key) = &message.key {
        record = record.key(key.as_str());
    }
    Ok(record)
}

impl Sink for KafkaSink {
    fn send(&self, destination: &Destination, message: &Arc<Message>) -> Ack {
        let Destination::Topic(topic) = destination else {
            let error = SinkError::Permanent(format!("kafka: {destination:?} is not a topic"));
            return Box::pin(async move { Err(error) });
        };
        if let Some(transactions) = &self.transactions {
            return transactions.send(topic, message);
        }
        let record = match record_to(topic, message, self.records) {
            Ok(record) => record,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        let producer = match self.producer() {
            Ok(producer) => producer,
            Err(error) => return Box::pin(async move { Err(error) }),
        };
        let broken = self.broken.clone();
        let healthy = self.healthy.clone();
        let fail = move |error: KafkaError, producer: &FutureProducer| {
            if is_fatal(&error, producer) {
                broken.store(true, Ordering::Release);
            }
            let error = classify(error);
            if matches!(error, SinkError::Transient(_)) {
                healthy.store(false, Ordering::Release);
            }
            error
        };
        let healthy = self.healthy.clone();
        match producer.send_result(record) {
            Ok(delivery) => Box::pin(async move {
                match delivery.await {
                    Ok(Ok(delivered)) => {
                        healthy.store(true, Ordering::Release);
                        Ok(Receipt::kafka(delivered.partition, delivered.offset))
                    }
                    Ok(Err((error, _))) => Err(fail(error, &producer)),
                    Err(_) => Err(SinkError::Transient(
                        "kafka: the producer was closed".into(),
                    )),
                }
            }),
            Err((error, _)) => {
                let error = fail(error, &producer);
                Box::pin(async move { Err(error) })
            }
        }
    }

    fn resume<'a>(&'a self, stream: &'a StreamId) -> BoxFuture<'a, Result<(), Fatal>> {
        Box::pin(async move {
            match &self.transactions {
                Some(transactions) => transactions.start(stream).await,
                None => Ok(()),
            }
        })
    }

    fn delivered_through(&self) -> Option<Position> {
        self.transactions.as_ref().and_then(Transactions::committed)
    }

    fn is_ready(&self) -> bool {
        let healthy = match &self.transactions {
            Some(transactions) => transactions.is_healthy(),
            None => self.healthy.load(Ordering::Acquire),
        };
        self.brokers_answer.load(Ordering::Acquire) && healthy
    }

    fn keeps_key_order(&self) -> bool {
        self.keeps_order
    }

    fn system(&self) -> &'static str {
        "kafka"
    }

    /// Whatever is still unacknowledged here stays unconfirmed and is sent again by the next run,
    /// so nothing is waited for: a broker that is down must not hold the stop.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(transactions) = &self.transactions {
                transactions.close().await;
            }
            let producer = self.producer.read().unwrap().clone();
            let _ = tokio::task::spawn_blocking(move || {
                producer.purge(PurgeConfig::default().queue().inflight());
                producer.flush(Duration::from_millis(200))
            })
            .await;
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{Properties, PropertyValue, Scalar};

    /// An at-least-once sink with these properties.
    fn sink_with(properties: &[(&str, &str)]) -> KafkaSinkConfig {
        let properties = properties
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    PropertyValue::Scalar(Scalar::Text(v.to_string())),
                )
            })
            .collect::<BTreeMap<_, _>>();
        KafkaSinkConfig {
            brokers: "127.0.0.1:9".into(),
            records: "outbox".into(),
            properties: Properties(properties),
            exactly_once: false,
            progress_topic: "p".into(),
        }
    }

    fn keeps_order_with(properties: &[(&str, &str)]) -> bool {
        keeps_order(&client_config(&sink_with(properties), 1000))
    }

    #[test]
    fn the_defaults_keep_partition_order_so_sends_are_pipelined() {
        assert!(keeps_order_with(&[]));
        assert!(keeps_order_with(&[("message.timeout.ms", "0")]));
        assert!(keeps_order_with(&[("compression.type", "lz4")]));
    }

    #[test]
    fn idempotence_off_alone_is_a_producer_librdkafka_accepts() {
        let client = client_config(&sink_with(&[("enable.idempotence", "false")]), 1000);
        assert_eq!(client.get("enable.gapless.guarantee"), Some("false"));
        assert!(!keeps_order(&client));
        let producer: FutureProducer = client.create().expect("librdkafka accepts idempotence off");
        drop(producer);
    }

    #[test]
    fn a_local_timeout_or_no_gapless_idempotence_sends_one_message_per_key_at_a_time() {
        assert!(!keeps_order_with(&[("message.timeout.ms", "30000")]));
        assert!(!keeps_order_with(&[("delivery.timeout.ms", "120000")]));
        assert!(!keeps_order_with(&[("enable.idempotence", "false")]));
        assert!(!keeps_order_with(&[("enable.gapless.guarantee", "False")]));
    }
}
