//! Configuration: defaults < TOML file < `OUTBOX_*` environment < command-line flags.
//!
//! Environment variables name a key by its path with `__` between levels:
//! `OUTBOX_POSTGRES__URL`, `OUTBOX_DELIVERY__MAX_IN_FLIGHT`,
//! `OUTBOX_SINKS__KAFKA__PROPERTIES__SASL.PASSWORD`. Every error names the key and the bad value.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::rules::{self, Template};
use crate::secret::{self, Secret, SecretUrl};

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

fn invalid(message: impl Into<String>) -> ConfigError {
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
    /// JSON lines on standard output.
    Stdout,
    /// Acknowledges without sending anything: for benchmarks of the worker itself.
    Discard,
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Amqp(_) => "amqp",
            SinkConfig::Stdout => "stdout",
            SinkConfig::Discard => "discard",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// `bootstrap.servers`: `host:port[,host:port…]`.
    pub brokers: String,
    /// Any librdkafka producer property (`compression.type`, `sasl.mechanism`, …). Nested tables
    /// join with dots, so `[sinks.kafka.properties.sasl] password = "…"` is `sasl.password`.
    #[serde(default)]
    pub properties: Properties,
}

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

/// What the command line adds on top of file and environment.
#[derive(Debug, Default)]
pub struct Overrides {
    pub postgres_url: Option<String>,
    pub slot: Option<String>,
    /// The quick path: route every queue to the Kafka topic of the same name.
    pub kafka_brokers: Option<String>,
    /// The quick path: route every queue to this AMQP exchange, routing key = queue.
    pub amqp_url: Option<String>,
    pub amqp_exchange: Option<String>,
    pub http_listen: Option<String>,
    pub log_format: Option<LogFormat>,
}

/// The sink the quick `--kafka-brokers` flag defines, and the default sink without any.
pub const QUICK_KAFKA_SINK: &str = "kafka";
pub const QUICK_AMQP_SINK: &str = "amqp";
pub const DEFAULT_SINK: &str = "stdout";

impl Config {
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            // Toml::file ignores a missing file; a file named on the command line must exist.
            std::fs::File::open(path).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed("OUTBOX_").split("__"));
        if let Some(url) = overrides.postgres_url {
            figment = figment.merge(("postgres.url", url));
        }
        if let Some(slot) = overrides.slot {
            figment = figment.merge(("postgres.slot", slot));
        }
        if let Some(format) = overrides.log_format {
            figment = figment.merge(("log.format", format));
        }
        if let Some(brokers) = overrides.kafka_brokers {
            figment = figment
                .merge((format!("sinks.{QUICK_KAFKA_SINK}.type"), "kafka"))
                .merge((format!("sinks.{QUICK_KAFKA_SINK}.brokers"), brokers));
        }
        if let Some(url) = overrides.amqp_url {
            figment = figment
                .merge((format!("sinks.{QUICK_AMQP_SINK}.type"), "amqp"))
                .merge((format!("sinks.{QUICK_AMQP_SINK}.url"), url));
        }
        if let Some(exchange) = overrides.amqp_exchange {
            figment = figment.merge((format!("sinks.{QUICK_AMQP_SINK}.exchange"), exchange));
        }
        if let Some(listen) = overrides.http_listen {
            figment = figment.merge(("http.listen", listen));
        }
        let mut config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.fill_defaults();
        config.validate()?;
        Ok(config)
    }

    /// No sink at all: print to stdout. One sink and no routes: everything goes to it.
    fn fill_defaults(&mut self) {
        if self.sinks.is_empty() {
            self.sinks.insert(DEFAULT_SINK.into(), SinkConfig::Stdout);
        }
        if self.routes.is_empty() && self.sinks.len() == 1 {
            let sink = self.sinks.keys().next().unwrap().clone();
            self.routes.push(RouteConfig {
                queues: Patterns::One("*".into()),
                sink,
                topic: None,
                exchange: None,
                routing_key: None,
            });
        }
    }

    /// The PostgreSQL URL with its password, for connecting (validated: always set).
    pub fn url(&self) -> &str {
        self.postgres
            .url
            .as_ref()
            .map(SecretUrl::expose)
            .unwrap_or_default()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.postgres.url.as_ref().ok_or_else(|| {
            invalid(
                "postgres.url is not set: pass --postgres-url postgres://user@host/db, set \
                 OUTBOX_POSTGRES__URL, or set url under [postgres] in the config file",
            )
        })?;
        url.expose()
            .parse::<tokio_postgres::Config>()
            .map_err(|e| {
                invalid(format!(
                    "postgres.url = \"{url}\" is not a PostgreSQL connection string: {e}"
                ))
            })?;
        for (key, value) in [
            ("postgres.slot", &self.postgres.slot),
            ("postgres.publication", &self.postgres.publication),
        ] {
            rules::check_identifier(value)
                .map_err(|e| invalid(format!("{key} = {value:?}: {e}")))?;
        }
        if self.postgres.status_interval.is_zero() {
            return Err(invalid(
                "postgres.status_interval = \"0s\": it must be positive",
            ));
        }
        if self.delivery.max_in_flight == 0 {
            return Err(invalid(
                "delivery.max_in_flight = 0: at least 1 message must be in flight",
            ));
        }
        if self.delivery.max_in_flight_bytes.as_u64() < 1024 * 1024 {
            return Err(invalid(format!(
                "delivery.max_in_flight_bytes = \"{}\": at least 1 MiB",
                self.delivery.max_in_flight_bytes
            )));
        }
        if self.delivery.max_attempts == 0 {
            return Err(invalid(
                "delivery.max_attempts = 0: at least 1 attempt is needed",
            ));
        }
        if self.delivery.retry_initial.is_zero()
            || self.delivery.retry_initial > self.delivery.retry_max
        {
            return Err(invalid(format!(
                "delivery.retry_initial = {:?}: it must be positive and at most delivery.retry_max ({:?})",
                humantime::format_duration(self.delivery.retry_initial).to_string(),
                humantime::format_duration(self.delivery.retry_max).to_string(),
            )));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid(format!("log.level = {:?}: {e}", self.log.level)))?;
        for (name, sink) in &self.sinks {
            match sink {
                SinkConfig::Kafka(kafka) => kafka
                    .check()
                    .map_err(|e| invalid(format!("sinks.{name}.{e}")))?,
                SinkConfig::Amqp(amqp) => amqp
                    .check()
                    .map_err(|e| invalid(format!("sinks.{name}.{e}")))?,
                _ => {}
            }
        }
        for (index, route) in self.routes.iter().enumerate() {
            let key = format!("routes[{index}]");
            let sink = self.sinks.get(&route.sink).ok_or_else(|| {
                invalid(format!(
                    "{key}.sink = {:?}: no sink has that name (defined: {})",
                    route.sink,
                    self.sinks.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            let fields = [
                (
                    "topic",
                    &route.topic,
                    Template::KafkaTopic,
                    matches!(sink, SinkConfig::Kafka(_)),
                ),
                (
                    "exchange",
                    &route.exchange,
                    Template::AmqpExchange,
                    matches!(sink, SinkConfig::Amqp(_)),
                ),
                (
                    "routing_key",
                    &route.routing_key,
                    Template::AmqpRoutingKey,
                    matches!(sink, SinkConfig::Amqp(_)),
                ),
            ];
            for (field, value, kind, applies) in fields {
                let Some(value) = value else { continue };
                if !applies {
                    return Err(invalid(format!(
                        "{key}.{field} = {value:?}: sink {:?} is of type {}, which has no {field}",
                        route.sink,
                        sink.kind()
                    )));
                }
                rules::check_template(value, kind)
                    .map_err(|e| invalid(format!("{key}.{field} = {value:?}: {e}")))?;
            }
            for pattern in route.queues.iter() {
                globset::Glob::new(pattern).map_err(|e| {
                    invalid(format!("{key}.queues: {pattern:?} is not a glob: {e}"))
                })?;
            }
        }
        if self.routes.is_empty() {
            return Err(invalid(format!(
                "routes: there are {} sinks and no routes: add [[routes]] with queues = \"*\" and \
                 sink = one of {}",
                self.sinks.len(),
                self.sinks.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(())
    }
}

impl KafkaSinkConfig {
    /// Brokers and every property, checked by librdkafka without connecting; the error starts
    /// with the key.
    pub fn check(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("brokers = \"\": list at least one host:port".into());
        }
        for (key, value) in self.flat_properties() {
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
        }
        Ok(())
    }
}

impl AmqpSinkConfig {
    pub fn check(&self) -> Result<(), String> {
        rules::check_amqp_url(self.url.expose())
            .map_err(|e| format!("url = \"{}\": {e}", self.url))?;
        rules::check_template(&self.exchange, Template::AmqpExchange)
            .map_err(|e| format!("exchange = {:?}: {e}", self.exchange))?;
        if let Some(kind) = &self.declare_exchange {
            if !rules::EXCHANGE_KINDS.contains(&kind.as_str()) {
                return Err(format!(
                    "declare_exchange = {kind:?}: use one of {}",
                    rules::EXCHANGE_KINDS.join(", ")
                ));
            }
            if self.exchange.is_empty() {
                return Err("declare_exchange is set but exchange is empty (the default exchange cannot be declared)".into());
            }
        }
        Ok(())
    }
}
