//! Kafka through librdkafka: idempotent producer, `acks=all`, key → partition with Java's
//! murmur2 partitioner (same key, same partition as a Java producer would pick), outbox headers.

use std::collections::BTreeMap;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

use super::{Ack, Sink, SinkError};
use crate::config::KafkaSinkConfig;
use crate::message::Message;

pub struct KafkaSink {
    producer: FutureProducer,
}

/// Our defaults; any property in the config overrides them.
fn client_config(config: &KafkaSinkConfig, max_in_flight: usize) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "outbox-worker")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        // A send that has not succeeded after this long comes back as an error and the worker
        // retries it (in order, with backoff): the outage is visible in logs and metrics.
        .set("message.timeout.ms", "30000")
        .set(
            "queue.buffering.max.messages",
            (max_in_flight + 1000).max(100_000).to_string(),
        );
    for (key, value) in config.flat_properties() {
        client.set(key, value);
    }
    client
}

/// Validates brokers and properties without connecting; the error starts with the key.
pub fn check_config(config: &KafkaSinkConfig) -> Result<(), String> {
    if config.brokers.trim().is_empty() {
        return Err("brokers = \"\": list at least one host:port".into());
    }
    let properties = config.flat_properties();
    for (key, value) in &properties {
        let mut one = ClientConfig::new();
        one.set(key, value);
        one.create_native_config()
            .map_err(|e| format!("properties.{key} = {value:?}: {}", describe(&e)))?;
    }
    if properties.get("enable.idempotence").map(String::as_str) == Some("false") {
        tracing::warn!("enable.idempotence = false: retries may reorder and duplicate messages");
    }
    Ok(())
}

fn describe(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, message, _, _) => message.clone(),
        other => other.to_string(),
    }
}

impl KafkaSink {
    pub fn new(config: &KafkaSinkConfig, max_in_flight: usize) -> Result<KafkaSink, String> {
        check_config(config)?;
        let producer = client_config(config, max_in_flight)
            .create()
            .map_err(|e| describe(&e))?;
        Ok(KafkaSink { producer })
    }
}

fn headers(message: &Message) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 4);
    for (key, value) in &message.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let id = message.id.to_string();
    let created_at = message.created_at_rfc3339();
    let fixed: BTreeMap<&str, &str> = BTreeMap::from([
        ("outbox-id", id.as_str()),
        ("outbox-queue", message.queue.as_str()),
        ("outbox-created-at", created_at.as_str()),
        ("content-type", message.payload.content_type()),
    ]);
    for (key, value) in fixed {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    headers
}

/// Permanent: the broker (or librdkafka, before sending) refuses these bytes for good.
fn classify(error: KafkaError) -> SinkError {
    use RDKafkaErrorCode::*;
    match error.rdkafka_error_code() {
        Some(
            MessageSizeTooLarge
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

impl Sink for KafkaSink {
    fn send(&self, topic: &str, message: &Message) -> Ack {
        let mut record = FutureRecord::to(topic)
            .payload(message.payload.as_bytes())
            .headers(headers(message))
            .timestamp(message.created_at.timestamp_millis());
        if let Some(key) = &message.key {
            record = record.key(key.as_str());
        }
        match self.producer.send_result(record) {
            Ok(delivery) => Box::pin(async move {
                match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((error, _))) => Err(classify(error)),
                    Err(_) => Err(SinkError::Transient(
                        "kafka: the producer was closed".into(),
                    )),
                }
            }),
            Err((error, _)) => {
                let error = classify(error);
                Box::pin(async move { Err(error) })
            }
        }
    }

    fn close(&self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            let producer = self.producer.clone();
            let _ = tokio::task::spawn_blocking(move || {
                producer.flush(std::time::Duration::from_secs(10))
            })
            .await;
        })
    }
}
