//! What a valid name or setting is, for each thing the configuration names: templates, Kafka
//! properties, AMQP URLs and exchange kinds, PostgreSQL identifiers. A leaf: the configuration
//! checks with it, the router and the sinks build with it, and it imports nothing of ours.

use std::str::FromStr;

use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;

/// A queue name as `outbox.publish` accepts it: 1 to 249 characters of `[A-Za-z0-9._-]`, not `.`
/// or `..` (so that it is a valid Kafka topic as it is). The same rule is written in the extension
/// (`pg_outbox/src/publish.rs`) and the SQL install (`pg_outbox/sql/sql-install/publish.sql`):
/// `tests/tests/publish_rules.rs` proves all three agree on one table of cases.
pub fn is_valid_queue(queue: &str) -> bool {
    (1..=249).contains(&queue.len())
        && queue
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        && queue != "."
        && queue != ".."
}

/// The one placeholder of a destination template.
pub const PLACEHOLDER: &str = "{queue}";

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

/// A replication slot or publication name the worker may create without quoting surprises.
pub fn check_identifier(value: &str) -> Result<(), String> {
    let valid = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err("use 1 to 63 lowercase letters, digits and underscores".into())
    }
}

/// One librdkafka producer property, checked by librdkafka itself without connecting.
pub fn check_kafka_property(key: &str, value: &str) -> Result<(), String> {
    let mut one = ClientConfig::new();
    one.set(key, value);
    one.create_native_config()
        .map(drop)
        .map_err(|e| describe_kafka_error(&e))
}

/// librdkafka's own sentence for a configuration error, without the error-kind prefix.
pub fn describe_kafka_error(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, message, _, _) => message.clone(),
        other => other.to_string(),
    }
}

pub fn check_amqp_url(url: &str) -> Result<(), String> {
    lapin::uri::AMQPUri::from_str(url).map(drop)
}

/// The exchange kinds `declare_exchange` accepts.
pub const EXCHANGE_KINDS: [&str; 4] = ["direct", "topic", "fanout", "headers"];

#[cfg(test)]
mod tests {
    use super::*;

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
}
