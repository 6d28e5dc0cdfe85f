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

/// A topic template: `{queue}` and the characters Kafka allows in topic names.
pub fn check_template(template: &str) -> Result<(), String> {
    let literal = template.replace(PLACEHOLDER, "");
    if let Some(bad) = literal
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(if bad == '{' || bad == '}' {
            "the only placeholder is {queue}".into()
        } else {
            format!(
                "{bad:?} is not allowed in a Kafka topic name (use letters, digits, '.', '_', '-')"
            )
        });
    }
    if template.is_empty() {
        return Err("a topic template cannot be empty".into());
    }
    if literal.len() > 200 {
        return Err("too long: topic names have at most 249 characters".into());
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
                let template = match &config.sinks[&route.sink] {
                    SinkConfig::Kafka(_) => Some(route.topic.clone().unwrap_or(PLACEHOLDER.into())),
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
        assert!(check_template("outbox.{queue}").is_ok());
        assert!(check_template("fixed-topic").is_ok());
        assert_eq!(
            check_template("{tenant}.{queue}").unwrap_err(),
            "the only placeholder is {queue}"
        );
        assert!(check_template("a topic")
            .unwrap_err()
            .contains("' ' is not allowed"));
        assert!(check_template("").is_err());
    }
}
