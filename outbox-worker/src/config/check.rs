//! Validation: every error names the key and the bad value.

use super::{invalid, AmqpSinkConfig, Config, ConfigError, SinkConfig};
use crate::rules::{self, Template};

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
        if let Some(primary) = &self.postgres.primary_url {
            // The replication connection goes to the host of several that is not in recovery,
            // while the slot of a standby is on the standby.
            let hosts = url
                .expose()
                .parse::<tokio_postgres::Config>()
                .map_or(1, |c| c.get_hosts().len());
            if hosts > 1 {
                return Err(invalid(format!(
                    "postgres.url = \"{url}\" names {hosts} hosts, and postgres.primary_url is set: \
                     a slot decoded on a standby needs postgres.url to name that standby alone"
                )));
            }
            primary
                .expose()
                .parse::<tokio_postgres::Config>()
                .map_err(|e| {
                    invalid(format!(
                        "postgres.primary_url = \"{primary}\" is not a PostgreSQL connection \
                         string: {e}"
                    ))
                })?;
        }
        for (key, value) in [
            ("postgres.slot", &self.postgres.slot),
            ("postgres.publication", &self.postgres.publication),
        ] {
            rules::check_identifier(value)
                .map_err(|e| invalid(format!("{key} = {value:?}: {e}")))?;
        }
        if self.postgres.publication.starts_with("pg_outbox_") {
            return Err(invalid(format!(
                "postgres.publication = {:?}: names starting with pg_outbox_ are the publications \
                 setup makes for slots with postgres.queues",
                self.postgres.publication
            )));
        }
        if !self.postgres.queues.is_empty()
            && self.postgres.slot.len() > crate::slot_publication::MAX_SLOT_LEN
        {
            return Err(invalid(format!(
                "postgres.slot = {:?}: with postgres.queues, at most {} characters (its \
                 publication is pg_outbox_<slot>, and a name holds 63)",
                self.postgres.slot,
                crate::slot_publication::MAX_SLOT_LEN
            )));
        }
        for glob in &self.postgres.queues {
            crate::claims::check_glob(glob)
                .map_err(|e| invalid(format!("postgres.queues: {glob:?}: {e}")))?;
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
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            let uri = endpoint.parse::<axum::http::Uri>().ok();
            let plain = uri.as_ref().is_some_and(|u| {
                u.scheme_str() == Some("http") && u.host().is_some_and(|h| !h.is_empty())
            });
            if !plain {
                return Err(invalid(format!(
                    "telemetry.otlp_endpoint = {endpoint:?}: an http:// base URL is expected \
                     (OTLP/HTTP, e.g. http://localhost:4318); for TLS, send to a local \
                     OpenTelemetry Collector that forwards over TLS"
                )));
            }
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
            if let (SinkConfig::Kafka(kafka), Some(topic)) = (sink, &route.topic) {
                if kafka.exactly_once && *topic == kafka.progress_topic {
                    return Err(invalid(format!(
                        "{key}.topic = {topic:?}: it is sink {:?}'s progress_topic, which holds \
                         the worker's progress records, not messages; route elsewhere or name \
                         another progress_topic",
                        route.sink
                    )));
                }
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
