//! Queue → (sink, destination), by the first route whose glob matches the queue name.

use std::collections::HashMap;
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::config::SinkId;
use crate::config::{Config, SinkConfig};
use crate::rules::PLACEHOLDER;

/// Where one message goes: a sink and the destination within it (a Kafka topic, an AMQP
/// "exchange/routing-key"; empty for sinks without destinations).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub sink: SinkId,
    pub destination: Arc<str>,
}

struct Rule {
    queues: GlobSet,
    sink: SinkId,
    template: Option<String>,
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
                // AMQP destinations are "exchange/routing-key" (exchange names cannot hold '/').
                let template = match &config.sinks[&route.sink] {
                    SinkConfig::Kafka(_) => Some(route.topic.clone().unwrap_or(PLACEHOLDER.into())),
                    SinkConfig::Amqp(amqp) => Some(format!(
                        "{}/{}",
                        route.exchange.as_deref().unwrap_or(&amqp.exchange),
                        route.routing_key.as_deref().unwrap_or(PLACEHOLDER)
                    )),
                    _ => None,
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
                destination: rule
                    .template
                    .as_deref()
                    .map(|t| t.replace(PLACEHOLDER, queue))
                    .unwrap_or_default()
                    .into(),
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
                destination: "outbox.orders.created".into()
            })
        );
        assert_eq!(
            router.route("billing").unwrap().destination.as_ref(),
            "outbox.billing"
        );
        assert_eq!(
            router.route("audit"),
            Some(Route {
                sink: out,
                destination: "".into()
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
            router.route("orders").unwrap().destination.as_ref(),
            "events/orders"
        );
        assert_eq!(
            router.route("audit.login").unwrap().destination.as_ref(),
            "audit/all"
        );
    }
}
