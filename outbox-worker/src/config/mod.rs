//! Configuration: defaults < TOML file < `OUTBOX_*` environment < command-line flags. This file
//! is the schema; `load.rs` merges the layers, `check.rs` validates, `kafka.rs` handles
//! librdkafka's properties.
//!
//! Environment variables name a key by its path with `__` between levels:
//! `OUTBOX_POSTGRES__URL`, `OUTBOX_DELIVERY__MAX_IN_FLIGHT`,
//! `OUTBOX_SINKS__KAFKA__PROPERTIES__SASL.PASSWORD`. Every error names the key and the bad value.

mod check;
mod kafka;
mod load;

use std::collections::BTreeMap;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use self::kafka::{Properties, PropertyValue, Scalar};
pub use self::load::Overrides;
use crate::secret::SecretUrl;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    /// figment names keys within its default profile: "default.postgres.url"; show "postgres.url".
    #[error("{}", .0.to_string().replace("key \"default.", "key \""))]
    Parse(#[from] Box<figment::Error>),
}

pub(crate) fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/database`; the user needs the REPLICATION attribute.
    pub url: Option<SecretUrl>,
    pub slot: String,
    pub publication: String,
    /// How often the confirmed position is reported to the server.
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// Create the publication and slot at start-up when missing.
    pub setup: bool,
    /// Create the slot so that it survives a failover to a standby (PostgreSQL 17+).
    pub failover_slot: FailoverSlot,
    /// The primary, when `url` is a physical standby whose slot the worker decodes (PostgreSQL
    /// 16+): the publication, `outbox.slots` and dead letters are written there. Once `url`'s
    /// server is promoted, the worker writes to it instead.
    pub primary_url: Option<SecretUrl>,
    /// The queues this slot delivers (globs: literal characters and `*`); empty: every queue no
    /// other slot claims. Recorded by setup in `outbox.queue_claims`.
    pub queues: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailoverSlot {
    /// A failover slot where the server has them (PostgreSQL 17 and later).
    #[default]
    Auto,
    /// Required: older servers are refused.
    On,
    Off,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: None,
            slot: "pg_outbox".into(),
            publication: "pg_outbox".into(),
            status_interval: Duration::from_millis(250),
            setup: true,
            failover_slot: FailoverSlot::Auto,
            primary_url: None,
            queues: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Messages sent and not yet acknowledged, at most. A crash can duplicate up to this many.
    pub max_in_flight: usize,
    /// Bytes of those messages (key, headers, payload), at most: bounds the worker's memory
    /// whatever the message size. One message larger than this still goes, alone.
    pub max_in_flight_bytes: ByteSize,
    /// First retry delay after a failed send; doubles up to `retry_max`, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Attempts for a message the broker rejects permanently (too large, invalid, forbidden)
    /// before the worker gives up on it. Transient errors (broker down) retry forever.
    pub max_attempts: u32,
    /// On SIGTERM, how long to wait for in-flight messages before exiting anyway (they are
    /// redelivered by the next run, never lost).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How a key's messages keep their order when a broker refuses some of them.
    pub ordering: KeyOrdering,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyOrdering {
    /// A sink whose client cannot keep a key's order through a partial refusal (RabbitMQ,
    /// stdout) gets one message per key at a time; later ones of that key wait. Kafka's
    /// idempotent producer keeps the order itself and stays pipelined.
    PerKey,
    /// Every sink pipelined: faster for few keys, and a refused message may arrive after later
    /// messages of its key.
    Pipelined,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_in_flight: 10_000,
            max_in_flight_bytes: ByteSize::mib(128),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            max_attempts: 5,
            shutdown_timeout: Duration::from_secs(30),
            ordering: KeyOrdering::PerKey,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `/metrics` (Prometheus) and `/health/live`, `/health/ready` on this address, e.g.
    /// `0.0.0.0:9090`. Off when unset.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OpenTelemetry traces over OTLP/HTTP to this base URL (`http://collector:4318`; the
    /// `/v1/traces` path is appended). Off when unset, unless `OTEL_EXPORTER_OTLP_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter: `info`, `outbox_worker=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    Kafka(KafkaSinkConfig),
    /// RabbitMQ (AMQP 0.9.1) with publisher confirms.
    Amqp(AmqpSinkConfig),
    /// JSON lines on standard output. (Struct variants, empty: a unit variant would take any
    /// other key silently, `records = "debezium"` on a stdout sink say.)
    Stdout {},
    /// Acknowledges without sending anything: for benchmarks of the worker itself.
    Discard {},
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Amqp(_) => "amqp",
            SinkConfig::Stdout {} => "stdout",
            SinkConfig::Discard {} => "discard",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// `bootstrap.servers`: `host:port[,host:port…]`.
    pub brokers: String,
    /// How records look: `outbox` (the default) or `debezium`, the Outbox Event Router's defaults
    /// for consumers written against Debezium ([`RecordShape`]). Text, checked by `check`, so
    /// that a bad value is named with its key.
    #[serde(default = "default_records")]
    pub records: String,
    /// Any librdkafka producer property (`compression.type`, `sasl.mechanism`, …). Nested tables
    /// join with dots, so `[sinks.kafka.properties.sasl] password = "…"` is `sasl.password`.
    #[serde(default)]
    pub properties: Properties,
    /// Kafka transactions with the stream position committed beside the messages, so that a
    /// crash, a restart or a takeover sends nothing twice to `read_committed` consumers (on by
    /// default; a broker without transactions stops the worker at start, naming this key).
    #[serde(default = "default_exactly_once")]
    pub exactly_once: bool,
    /// The compacted topic holding each stream's committed position (created if missing).
    #[serde(default = "default_progress_topic")]
    pub progress_topic: String,
}

fn default_records() -> String {
    "outbox".into()
}

fn default_exactly_once() -> bool {
    true
}

fn default_progress_topic() -> String {
    "pg_outbox-progress".into()
}

/// The shape of a Kafka record. Both carry the message's key as the record key, its payload
/// bytes as the value, and the outbox headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordShape {
    /// Topic = the queue name unless a route names one.
    Outbox,
    /// As Debezium's Outbox Event Router writes with its defaults: topic `outbox.event.{queue}`
    /// (the queue in the place of `aggregatetype`) unless a route names one, and the message id
    /// in the header `id`.
    Debezium,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSinkConfig {
    /// `amqp://user:password@host:5672/vhost`.
    pub url: SecretUrl,
    /// The default exchange of this sink's routes; `""` is the default exchange (routing key =
    /// queue name).
    #[serde(default)]
    pub exchange: String,
    /// Declare `exchange` at start-up with this kind (`direct`, `topic`, `fanout`, `headers`),
    /// durable. Unset: the exchange must exist.
    pub declare_exchange: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Glob pattern(s) over queue names: `orders.*`, `["billing", "invoices.*"]`, `*`.
    pub queues: Patterns,
    /// A name under `[sinks]`.
    pub sink: String,
    /// Kafka topic template; `{queue}` is replaced by the queue name. Default `{queue}`.
    pub topic: Option<String>,
    /// AMQP exchange template; default the sink's `exchange`.
    pub exchange: Option<String>,
    /// AMQP routing-key template; default `{queue}`.
    pub routing_key: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Patterns {
    One(String),
    Many(Vec<String>),
}

impl Patterns {
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        match self {
            Patterns::One(p) => std::slice::from_ref(p).iter().map(String::as_str),
            Patterns::Many(ps) => ps.iter().map(String::as_str),
        }
    }
}

/// The sink the quick `--kafka-brokers` flag defines, and the default sink without any.
pub const QUICK_KAFKA_SINK: &str = "kafka";
pub const QUICK_AMQP_SINK: &str = "amqp";
pub const DEFAULT_SINK: &str = "stdout";

impl Config {
    /// The PostgreSQL URL with its password, for connecting (validated: always set).
    pub fn url(&self) -> &str {
        self.postgres
            .url
            .as_ref()
            .map(SecretUrl::expose)
            .unwrap_or_default()
    }

    pub fn primary_url(&self) -> Option<&str> {
        self.postgres.primary_url.as_ref().map(SecretUrl::expose)
    }
}

/// A sink's place among `[sinks]` (sorted by name): the router and the sinks agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SinkId(pub(crate) usize);

impl SinkId {
    /// The id of `[sinks.NAME]`, if defined.
    pub fn of(config: &Config, name: &str) -> Option<SinkId> {
        config.sinks.keys().position(|n| n == name).map(SinkId)
    }
}
