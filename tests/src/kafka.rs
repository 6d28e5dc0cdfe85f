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
