//! librdkafka properties: nested TOML tables flattened to dotted names, secrets printed
//! redacted, every property checked by librdkafka itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{KafkaSinkConfig, RecordShape};
use crate::rules;
use crate::secret::{self, Secret};

/// librdkafka properties as written in the file; passwords and keys print redacted.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Properties(pub BTreeMap<String, PropertyValue>);

impl Properties {
    /// Dotted names with their values; secret-bearing ones wrapped in [`Secret`].
    fn shown(&self) -> BTreeMap<String, ShownValue> {
        flatten(&self.0)
            .into_iter()
            .map(|(key, value)| {
                let shown = if secret::is_secret_property(&key) {
                    ShownValue::Hidden(Secret::new(value))
                } else {
                    ShownValue::Plain(value)
                };
                (key, shown)
            })
            .collect()
    }
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ShownValue {
    Plain(String),
    Hidden(Secret),
}

impl Serialize for Properties {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.shown().serialize(serializer)
    }
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shown().fmt(f)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Scalar(Scalar),
    Table(BTreeMap<String, PropertyValue>),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl KafkaSinkConfig {
    /// `records` as a shape; `None` for a value `check` refuses.
    pub fn record_shape(&self) -> Option<RecordShape> {
        match self.records.as_str() {
            "outbox" => Some(RecordShape::Outbox),
            "debezium" => Some(RecordShape::Debezium),
            _ => None,
        }
    }

    /// The properties as librdkafka takes them: dotted names, text values (secrets included).
    pub fn flat_properties(&self) -> BTreeMap<String, String> {
        flatten(&self.properties.0)
    }
}

fn flatten(table: &BTreeMap<String, PropertyValue>) -> BTreeMap<String, String> {
    fn walk(
        prefix: &str,
        table: &BTreeMap<String, PropertyValue>,
        out: &mut BTreeMap<String, String>,
    ) {
        for (name, value) in table {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match value {
                PropertyValue::Table(inner) => walk(&key, inner, out),
                PropertyValue::Scalar(scalar) => {
                    let text = match scalar {
                        Scalar::Text(s) => s.clone(),
                        Scalar::Integer(i) => i.to_string(),
                        Scalar::Float(f) => f.to_string(),
                        Scalar::Bool(b) => b.to_string(),
                    };
                    out.insert(key, text);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", table, &mut out);
    out
}

impl KafkaSinkConfig {
    /// Brokers and every property, checked by librdkafka without connecting; the error starts
    /// with the key.
    pub fn check(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("brokers = \"\": list at least one host:port".into());
        }
        if self.record_shape().is_none() {
            return Err(format!(
                "records = {:?}: expected \"outbox\" (the default) or \"debezium\"",
                self.records
            ));
        }
        if !rules::is_valid_queue(&self.progress_topic) {
            return Err(format!(
                "progress_topic = {:?}: not a Kafka topic name (1 to 249 of letters, digits, \
                 '.', '_', '-')",
                self.progress_topic
            ));
        }
        for (key, value) in self.flat_properties() {
            if self.exactly_once {
                conflicts_with_exactly_once(&key, &value)
                    .map_err(|e| format!("properties.{key} = {value:?}: {e}"))?;
            }
            let shown = if secret::is_secret_property(&key) {
                secret::HIDDEN.to_owned()
            } else {
                format!("{value:?}")
            };
            rules::check_kafka_property(&key, &value)
                .map_err(|e| format!("properties.{key} = {shown}: {e}"))?;
            if key == "enable.idempotence" && value == "false" {
                tracing::warn!(
                    "enable.idempotence = false: retries may reorder and duplicate messages"
                );
            }
            unsafe_for_the_outbox(&key, &value)
                .map_err(|e| format!("properties.{key} = {shown}: {e}"))?;
        }
        Ok(())
    }
}

/// Properties that `exactly_once = true` sets or needs.
fn conflicts_with_exactly_once(key: &str, value: &str) -> Result<(), String> {
    match key {
        "transactional.id" => Err(
            "the worker derives it from the stream (PostgreSQL system, database, slot, sink) so \
             that a new run or a standby fences the old one; remove it"
                .into(),
        ),
        "enable.idempotence"
            if matches!(value.trim().to_ascii_lowercase().as_str(), "false" | "f" | "0") =>
        {
            Err(
            "Kafka transactions need the idempotent producer; set exactly_once = false to turn \
             it off"
                .into(),
            )
        }
        _ => Ok(()),
    }
}

/// Properties librdkafka accepts that would break what the worker promises.
fn unsafe_for_the_outbox(key: &str, value: &str) -> Result<(), String> {
    let value = value.trim().to_ascii_lowercase();
    match key {
        // The slot is confirmed once Kafka acknowledged: an acknowledgement from the leader alone
        // (1) can still be lost with it, and 0 acknowledges what was never sent.
        "acks" | "request.required.acks" if value != "all" && value != "-1" => Err(
            "the worker confirms the slot for what Kafka acknowledged, so an acknowledgement must \
             mean written to every in-sync replica: only acks = \"all\" (the default) is allowed"
                .into(),
        ),
        // Not by key: one key's messages would spread over partitions and lose their order.
        "partitioner" if value == "random" => Err(
            "messages of one key would spread over partitions and lose their order; use a \
             partitioner that hashes the key (murmur2_random, the default, as Java's producer)"
                .into(),
        ),
        _ => Ok(()),
    }
}
