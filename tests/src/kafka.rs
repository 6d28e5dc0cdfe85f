//! Reading back what reached a Kafka-protocol broker, with librdkafka (the worker's own client
//! library; the kafka-python test proves the wire with an independent one).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::publish::Seen;

#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    /// Every header in wire order, repeats included.
    pub header_list: Vec<(String, String)>,
}

impl Record {
    pub fn seen(&self) -> Seen {
        Seen {
            id: self.headers.get("outbox-id").cloned().unwrap_or_default(),
            key: self.key.clone(),
            payload: serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// [`read_until`] on one topic, from async code (on a blocking thread).
pub async fn read(brokers: &str, topic: &str, distinct: usize, timeout: Duration) -> Vec<Record> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_until(&brokers, &[&topic], distinct, timeout))
        .await
        .expect("the Kafka reader panicked")
}

/// Reads every partition of `topics` from the beginning until `distinct` different `outbox-id`s
/// arrived and nothing more comes for a moment, or `timeout` passes. Blocking: call it from
/// `spawn_blocking`.
pub fn read_until(
    brokers: &str,
    topics: &[&str],
    distinct: usize,
    timeout: Duration,
) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-tests")
        .set("enable.auto.commit", "false")
        // librdkafka's default too: aborted transactions of an exactly-once sink are not seen.
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        for partition in metadata.topics()[0].partitions() {
            assignment
                .add_partition_offset(topic, partition.id(), Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&assignment).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut records = Vec::new();
    let mut ids = HashSet::new();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let header_list: Vec<(String, String)> = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let record = Record {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers: header_list.iter().cloned().collect(),
                    header_list,
                };
                ids.insert(record.headers.get("outbox-id").cloned().unwrap_or_default());
                records.push(record);
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            // Idle and complete: done (a little more may still be duplicates; they are not needed).
            None if ids.len() >= distinct => break,
            None => {}
        }
    }
    records
}

/// Which records a reader sees: every one written, or only those of committed transactions.
#[derive(Debug, Clone, Copy)]
pub enum Isolation {
    ReadUncommitted,
    ReadCommitted,
}

/// Reads `topic` from the beginning with kafka-python (a client nobody here wrote) until
/// `expected` distinct outbox ids arrived or `timeout` passed: one JSON object per record
/// (partition, key, headers, payload).
pub fn kafka_python(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    isolation: Isolation,
) -> Vec<serde_json::Value> {
    let isolation = match isolation {
        Isolation::ReadUncommitted => "read_uncommitted",
        Isolation::ReadCommitted => "read_committed",
    };
    crate::json_lines(
        "kafka-python",
        std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/python/kafka_consume.py"
            ))
            .args([brokers, topic, &expected.to_string()])
            .arg(timeout.as_secs().to_string())
            .arg(isolation),
    )
}

/// A kafka-python record as the delivery checks take it.
pub fn python_seen(record: &serde_json::Value) -> Seen {
    Seen {
        id: record["headers"]["outbox-id"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        key: record["key"].as_str().map(str::to_owned),
        payload: record["payload"].clone(),
    }
}

/// Reads `topic` from the beginning with Kafka's own console consumer (a JVM client nobody here
/// wrote) until `max` records arrived or `timeout` passed without one: (headers, key, payload).
pub fn console_consume(
    broker: &crate::KafkaBroker,
    topic: &str,
    max: usize,
    timeout: Duration,
) -> Vec<Seen> {
    let out = broker
        .tool("org.apache.kafka.tools.consumer.ConsoleConsumer")
        .args(["--bootstrap-server", &broker.brokers(), "--topic", topic])
        .args(["--from-beginning", "--max-messages", &max.to_string()])
        .args(["--timeout-ms", &timeout.as_millis().to_string()])
        .args(["--formatter-property", "print.headers=true"])
        .args(["--formatter-property", "print.key=true"])
        .output()
        .expect("java");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        !stdout.is_empty(),
        "kafka-console-consumer printed nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each line: `name:value,name:value<TAB>key<TAB>payload` (values here hold no comma).
    stdout
        .lines()
        .map(|line| {
            let mut columns = line.splitn(3, '\t');
            let (headers, key, payload) = (
                columns.next().unwrap(),
                columns.next().expect("a key column"),
                columns.next().expect("a payload column"),
            );
            let id = headers
                .split(',')
                .find_map(|h| h.strip_prefix("outbox-id:"))
                .expect("an outbox-id header");
            Seen {
                id: id.to_owned(),
                key: (key != "null").then(|| key.to_owned()),
                payload: serde_json::from_str(payload).expect("a JSON payload"),
            }
        })
        .collect()
}
