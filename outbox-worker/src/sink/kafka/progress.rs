//! The progress topic: one compacted record per stream (key: its `transactional.id`) saying up to
//! which stream position its messages are in Kafka. Written in the same Kafka transaction as the
//! messages, read back (`read_committed`) once per run after the old writer was fenced.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::{Config, SinkConfig};
use crate::lsn::{Lsn, Position};

/// Every progress record goes to this partition, whatever the topic has: one place to read.
pub const PARTITION: i32 = 0;

#[derive(Serialize, Deserialize)]
struct Record {
    commit_lsn: String,
    index: u32,
    /// Which routes sent messages to this sink ([`routes_fingerprint`]): with other routes, a
    /// message at or before the position may never have been this sink's.
    #[serde(default)]
    routes: String,
    /// When it was committed, for a human reading the topic.
    written_at: String,
}

/// A stream's committed progress: its position, and the routes it was committed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub position: Position,
    pub routes: String,
}

/// What decides which messages reach the sink `name`: every route (the first match wins) and
/// the sink's record shape (its topics), hashed.
pub fn routes_fingerprint(config: &Config, name: &str) -> String {
    use sha2::Digest;
    let records = match &config.sinks.get(name) {
        Some(SinkConfig::Kafka(kafka)) => kafka.records.as_str(),
        _ => "",
    };
    let text = serde_json::to_string(&(&config.routes, name, records)).expect("routes serialize");
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The record's value for `position`.
pub fn encode(position: Position, routes: &str) -> Vec<u8> {
    serde_json::to_vec(&Record {
        commit_lsn: position.commit_lsn.to_string(),
        index: position.index,
        routes: routes.to_owned(),
        written_at: chrono::Utc::now().to_rfc3339(),
    })
    .expect("a record serializes")
}

fn decode(value: &[u8]) -> Result<Committed, String> {
    let record: Record = serde_json::from_slice(value).map_err(|e| e.to_string())?;
    Ok(Committed {
        position: Position {
            commit_lsn: record.commit_lsn.parse::<Lsn>()?,
            index: record.index,
        },
        routes: record.routes,
    })
}

/// Creates the topic, compacted, if the cluster does not have it: `Ok(true)` when it was created
/// now (so no stream can have progress in it yet).
pub fn ensure_topic(client: &ClientConfig, topic: &str, timeout: Duration) -> Result<bool, String> {
    let admin: AdminClient<DefaultClientContext> =
        client.create().map_err(|e| format!("kafka: {e}"))?;
    // -1: the cluster's default replication factor.
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact")
        .set("segment.ms", "3600000");
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    let results = futures::executor::block_on(admin.create_topics([&new], &options))
        .map_err(|e| format!("kafka: cannot create the progress topic {topic:?}: {e}"))?;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(true),
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
        Some(Err((_, code))) => Err(format!(
            "kafka: cannot create the progress topic {topic:?}: {code}"
        )),
        None => Ok(false),
    }
}

/// rdkafka logs every client error, the end of a partition included: here it is the goal.
struct EndIsNoError;

impl ClientContext for EndIsNoError {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(%error, reason, "kafka: reading the progress topic");
        }
    }
}

impl ConsumerContext for EndIsNoError {}

/// Why the progress could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// Its end was not reached in time: another stream's transaction left open on the topic (a
    /// crashed worker's, until its next run or `transaction.timeout.ms`) holds `read_committed`
    /// readers back, or the brokers are slow. Worth another try.
    NotYet(String),
    /// The topic cannot be read, or holds what pg_outbox did not write.
    Broken(String),
}

/// The last committed position of `key`, reading the topic's progress partition to its end with
/// `read_committed`. `None`: the stream has none (first run, or the topic lost it).
pub fn read(
    client: &ClientConfig,
    topic: &str,
    key: &str,
    timeout: Duration,
) -> Result<Option<Committed>, ReadError> {
    let broken = |e: KafkaError| ReadError::Broken(format!("kafka: {e}"));
    let consumer: BaseConsumer<EndIsNoError> = client
        .clone()
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // The end is reached sooner than with the default 500 ms of waiting per fetch.
        .set("fetch.wait.max.ms", "10")
        .set("group.id", "pg_outbox-progress-reader")
        .create_with_context(EndIsNoError)
        .map_err(broken)?;
    let mut partitions = TopicPartitionList::new();
    partitions
        .add_partition_offset(topic, PARTITION, Offset::Beginning)
        .map_err(broken)?;
    consumer.assign(&partitions).map_err(broken)?;
    // `read_committed` ends a partition at its last stable offset: a transaction of another
    // stream left open on it (a crashed worker's, until its next run or its
    // `transaction.timeout.ms`) would end the read before this stream's own later records, the
    // end looking like any other. So the read waits until nothing is open below the end.
    let (_, stable) = consumer
        .fetch_watermarks(topic, PARTITION, timeout)
        .map_err(broken)?;
    let everything: BaseConsumer<EndIsNoError> = client
        .clone()
        .set("isolation.level", "read_uncommitted")
        .create_with_context(EndIsNoError)
        .map_err(broken)?;
    let (_, end) = everything
        .fetch_watermarks(topic, PARTITION, timeout)
        .map_err(broken)?;
    if stable < end {
        return Err(ReadError::NotYet(format!(
            "kafka: a transaction of another stream is open on the progress topic {topic:?} \
             (offsets {stable} to {end}): waiting for it to end (a crashed worker's ends with its \
             next run, or after its transaction.timeout.ms)"
        )));
    }
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::NotYet(format!(
                "kafka: reading the progress topic {topic:?} did not reach its end within {}s \
                 (another stream's transaction may be open on it: a crashed worker's, until its \
                 next run or its transaction.timeout.ms)",
                timeout.as_secs()
            )));
        }
        match consumer.poll(left.min(Duration::from_millis(500))) {
            Some(Ok(record)) if record.key() == Some(key.as_bytes()) => {
                tracing::debug!(offset = record.offset(), "a progress record of this stream");
                last = match record.payload() {
                    Some(value) => Some(decode(value).map_err(|e| {
                        ReadError::Broken(format!(
                            "kafka: the progress record of {key:?} at offset {} of {topic:?} is \
                             not pg_outbox's ({e})",
                            record.offset()
                        ))
                    })?),
                    // A tombstone: someone deleted the stream's progress.
                    None => None,
                };
            }
            Some(Ok(_)) => {}
            Some(Err(KafkaError::PartitionEOF(_))) => {
                tracing::debug!(?last, "the end of the progress topic");
                return Ok(last);
            }
            Some(Err(e)) => tracing::debug!(error = %e, "reading the progress topic"),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_survives_the_record() {
        let position = Position {
            commit_lsn: Lsn(0x16_B374_D848),
            index: 41,
        };
        let committed = decode(&encode(position, "abc")).unwrap();
        assert_eq!(
            committed,
            Committed {
                position,
                routes: "abc".into()
            }
        );
        assert!(decode(b"{\"commit_lsn\": \"x\", \"index\": 1, \"written_at\": \"\"}").is_err());
    }
}
