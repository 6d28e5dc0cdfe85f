//! Queue → (sink, destination), by the first route whose glob matches the queue name.

use std::collections::HashMap;
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::config::SinkId;
use crate::config::{Config, RecordShape, SinkConfig};
use crate::rules::PLACEHOLDER;

/// Where one message goes: a sink and the destination within it.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub sink: SinkId,
    pub destination: Destination,
}

/// Where within a sink a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Sinks without destinations (stdout).
    None,
    /// A Kafka topic.
    Topic(Arc<str>),
    /// An AMQP exchange (`""`: the default exchange) and routing key.
    Exchange {
        exchange: Arc<str>,
        routing_key: Arc<str>,
    },
}

/// As the dead letters record it: the topic, `exchange/routing-key`, or nothing.
impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::None => Ok(()),
            Destination::Topic(topic) => f.write_str(topic),
            Destination::Exchange {
                exchange,
                routing_key,
            } => write!(f, "{exchange}/{routing_key}"),
        }
    }
}

/// A destination with `{queue}` still to fill in.
enum Template {
    None,
    Topic(String),
    Exchange {
        exchange: String,
        routing_key: String,
    },
}

impl Template {
    fn fill(&self, queue: &str) -> Destination {
        let fill = |t: &str| -> Arc<str> { t.replace(PLACEHOLDER, queue).into() };
        match self {
            Template::None => Destination::None,
            Template::Topic(topic) => Destination::Topic(fill(topic)),
            Template::Exchange {
                exchange,
                routing_key,
            } => Destination::Exchange {
                exchange: fill(exchange),
                routing_key: fill(routing_key),
            },
        }
    }
}

/// The topic of a route that names none.
fn default_topic(records: Option<RecordShape>) -> &'static str {
    match records {
        // (None: refused by the config's validation before any route is made.)
        Some(RecordShape::Outbox) | None => PLACEHOLDER,
        // Debezium's `route.topic.replacement` default, `outbox.event.${routedByValue}`.
        Some(RecordShape::Debezium) => "outbox.event.{queue}",
    }
}

struct Rule {
    queues: GlobSet,
    sink: SinkId,
    template: Template,
}

pub struct Router {
    rules: Vec<Rule>,
    /// Queue names repeat: match each glob set once per queue.
    cache: HashMap<String, Option<Route>>,
}

impl Router {
    /// From a validated config.
    pub fn new(config: &Config) -> Router {
        let rules = config
            .routes
            .iter()
            .map(|route| {
                let mut queues = GlobSetBuilder::new();
                for pattern in route.queues.iter() {
                    queues.add(Glob::new(pattern).expect("validated glob"));
                }
                let template = match &config.sinks[&route.sink] {
                    SinkConfig::Kafka(kafka) => Template::Topic(
                        route
                            .topic
                            .clone()
                            .unwrap_or_else(|| default_topic(kafka.record_shape()).into()),
                    ),
                    SinkConfig::Amqp(amqp) => Template::Exchange {
                        exchange: route.exchange.clone().unwrap_or(amqp.exchange.clone()),
                        routing_key: route.routing_key.clone().unwrap_or(PLACEHOLDER.into()),
                    },
                    _ => Template::None,
                };
                Rule {
                    queues: queues.build().expect("validated globs"),
                    sink: SinkId::of(config, &route.sink).expect("validated sink"),
                    template,
                }
            })
            .collect();
        Router {
            rules,
            cache: HashMap::new(),
        }
    }

    /// `None` when no route matches the queue.
    pub fn route(&mut self, queue: &str) -> Option<Route> {
        if let Some(route) = self.cache.get(queue) {
            return route.clone();
        }
        let route = self
            .rules
            .iter()
            .find(|rule| rule.queues.is_match(queue))
            .map(|rule| Route {
                sink: rule.sink,
                destination: rule.template.fill(queue),
            });
        self.cache.insert(queue.to_owned(), route.clone());
        route
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        let mut config: Config = toml::from_str(toml).unwrap();
        config.postgres.url = Some(crate::secret::SecretUrl::new("postgres://localhost/db"));
        config
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let config = config(
            r#"
            [sinks.kafka]
            type = "kafka"
            brokers = "localhost:9092"
            [sinks.out]
            type = "stdout"
            [[routes]]
            queues = ["orders.*", "billing"]
            sink = "kafka"
            topic = "outbox.{queue}"
            [[routes]]
            queues = "*"
            sink = "out"
            "#,
        );
        let mut router = Router::new(&config);
        let kafka = SinkId::of(&config, "kafka").unwrap();
        let out = SinkId::of(&config, "out").unwrap();
        assert_eq!(
            router.route("orders.created"),
            Some(Route {
                sink: kafka,
                destination: Destination::Topic("outbox.orders.created".into())
            })
        );
        assert_eq!(
            router.route("billing").unwrap().destination.to_string(),
            "outbox.billing"
        );
        assert_eq!(
            router.route("audit"),
            Some(Route {
                sink: out,
                destination: Destination::None
            })
        );
        assert_eq!(
            router.route("audit").unwrap().sink,
            out,
            "cached answer is the same"
        );
    }

    #[test]
    fn an_unmatched_queue_has_no_route() {
        let mut router = Router::new(&config(
            r#"
            [sinks.out]
            type = "stdout"
            [[routes]]
            queues = "orders"
            sink = "out"
            "#,
        ));
        assert_eq!(router.route("orders.created"), None);
    }

    #[test]
    fn amqp_destinations_join_exchange_and_routing_key() {
        let mut router = Router::new(&config(
            r#"
            [sinks.rabbit]
            type = "amqp"
            url = "amqp://localhost"
            exchange = "events"
            [[routes]]
            queues = "audit.*"
            sink = "rabbit"
            exchange = "audit"
            routing_key = "all"
            [[routes]]
            queues = "*"
            sink = "rabbit"
            "#,
        ));
        assert_eq!(
            router.route("orders").unwrap().destination.to_string(),
            "events/orders"
        );
        assert_eq!(
            router.route("audit.login").unwrap().destination.to_string(),
            "audit/all"
        );
    }

    #[test]
    fn debezium_records_default_to_the_outbox_event_routers_topic() {
        let mut router = Router::new(&config(
            r#"
            [sinks.k]
            type = "kafka"
            brokers = "localhost:9092"
            records = "debezium"
            [[routes]]
            queues = "audit"
            sink = "k"
            topic = "audit-log"
            [[routes]]
            queues = "*"
            sink = "k"
            "#,
        ));
        assert_eq!(
            router.route("orders").unwrap().destination.to_string(),
            "outbox.event.orders"
        );
        assert_eq!(
            router.route("audit").unwrap().destination.to_string(),
            "audit-log",
            "a route's topic wins"
        );
    }
}
