//! Merging the layers: defaults < TOML file < `OUTBOX_*` environment < command-line flags.

use std::path::Path;

use figment::providers::{Env, Format, Toml};
use figment::Figment;

use super::{
    Config, ConfigError, LogFormat, Patterns, RouteConfig, SinkConfig, DEFAULT_SINK,
    QUICK_AMQP_SINK, QUICK_KAFKA_SINK,
};

/// What the command line adds on top of file and environment.
#[derive(Debug, Default)]
pub struct Overrides {
    pub postgres_url: Option<String>,
    pub slot: Option<String>,
    pub queues: Option<Vec<String>>,
    /// The quick path: route every queue to the Kafka topic of the same name.
    pub kafka_brokers: Option<String>,
    /// The quick path: route every queue to this AMQP exchange, routing key = queue.
    pub amqp_url: Option<String>,
    pub amqp_exchange: Option<String>,
    pub http_listen: Option<String>,
    pub log_format: Option<LogFormat>,
}

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
        if let Some(queues) = overrides.queues {
            figment = figment.merge(("postgres.queues", queues));
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
            self.sinks
                .insert(DEFAULT_SINK.into(), SinkConfig::Stdout {});
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
}
