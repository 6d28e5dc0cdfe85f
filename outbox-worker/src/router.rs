//! Queue → (sink, destination), by the first route whose glob matches the queue name.

use std::collections::HashMap;
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::config::{Config, SinkConfig};

/// Where one message goes: the index of a sink (in [`Router::sink_names`] order) and the
/// destination within it (a Kafka topic; empty for sinks without destinations).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub sink: usize,
    pub destination: Arc<str>,
}

struct Rule {
    queues: GlobSet,
    sink: usize,
    template: Option<String>,
}

pub struct Router {
    rules: Vec<Rule>,
    sink_names: Vec<String>,
    /// Queue names repeat: match each glob set once per queue.
    cache: HashMap<String, Option<Route>>,
}

const PLACEHOLDER: &str = "{queue}";

/// What a template names; each has its own allowed characters.
#[derive(Debug, Clone, Copy)]
pub enum Template {
    KafkaTopic,
    AmqpExchange,
    AmqpRoutingKey,
}

/// `{queue}` is the only placeholder; the literal text must be valid for what the template names.
pub fn check_template(template: &str, kind: Template) -> Result<(), String> {
    let literal = template.replace(PLACEHOLDER, "");
    if literal.contains('{') || literal.contains('}') {
        return Err("the only placeholder is {queue}".into());
    }
    let (allowed, what, max): (fn(char) -> bool, &str, usize) = match kind {
        Template::KafkaTopic => (
            |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
            "a Kafka topic name (use letters, digits, '.', '_', '-')",
            200,
        ),
        Template::AmqpExchange => (
            |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'),
            "an AMQP exchange name (use letters, digits, '.', '_', '-', ':')",
            100,
        ),
        Template::AmqpRoutingKey => (|c| !c.is_control(), "an AMQP routing key", 200),
    };
    if let Some(bad) = literal.chars().find(|&c| !allowed(c)) {
        return Err(format!("{bad:?} is not allowed in {what}"));
    }
    if template.is_empty() && !matches!(kind, Template::AmqpExchange) {
        return Err("it cannot be empty".into());
    }
    if literal.len() > max {
        return Err(format!(
            "too long: at most {max} characters besides {{queue}}"
        ));
    }
    Ok(())
}

impl Router {
    /// From a validated config.
    pub fn new(config: &Config) -> Router {
        let sink_names: Vec<String> = config.sinks.keys().cloned().collect();
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
                    sink: sink_names
                        .iter()
                        .position(|n| n == &route.sink)
                        .expect("validated sink"),
                    template,
                }
            })
            .collect();
        Router {
            rules,
            sink_names,
            cache: HashMap::new(),
        }
    }

    pub fn sink_names(&self) -> &[String] {
        &self.sink_names
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
        config.postgres.url = Some("postgres://localhost/db".into());
        config
    }

    #[test]
    fn the_first_matching_rule_wins() {
        let mut router = Router::new(&config(
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
        ));
        let kafka = router
            .sink_names()
            .iter()
            .position(|n| n == "kafka")
            .unwrap();
        let out = router.sink_names().iter().position(|n| n == "out").unwrap();
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
    fn templates_are_checked() {
        use Template::*;
        assert!(check_template("outbox.{queue}", KafkaTopic).is_ok());
        assert!(check_template("fixed-topic", KafkaTopic).is_ok());
        assert_eq!(
            check_template("{tenant}.{queue}", KafkaTopic).unwrap_err(),
            "the only placeholder is {queue}"
        );
        assert!(check_template("a topic", KafkaTopic)
            .unwrap_err()
            .contains("' ' is not allowed"));
        assert!(check_template("", KafkaTopic).is_err());
        assert!(
            check_template("", AmqpExchange).is_ok(),
            "the default exchange"
        );
        assert!(check_template("events/x", AmqpExchange).is_err());
        assert!(check_template("orders/{queue} #", AmqpRoutingKey).is_ok());
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
