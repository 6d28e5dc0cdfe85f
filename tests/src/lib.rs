//! Shared harness for the end-to-end tests: each test starts the real processes it needs.

pub mod debezium;
pub mod failover;
pub mod kafka;
pub mod kafka_broker;
pub mod otlp;
pub mod postgres;
pub mod publish;
pub mod rabbitmq;
pub mod worker;

pub use kafka_broker::{KafkaBroker, KafkaOptions};
pub use postgres::PgCluster;
pub use rabbitmq::RabbitMq;
pub use worker::Worker;

/// Runs an independent client that prints one JSON object per line; panics with its stderr if it
/// fails.
pub fn json_lines(what: &str, command: &mut std::process::Command) -> Vec<serde_json::Value> {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Polls `check` every 100 ms until it returns true; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Runs each `async fn name(install: Install)` of the calling file twice, as the tests
/// `name::extension` and `name::sql_install`: the same test code against both installs.
#[macro_export]
macro_rules! on_both_installs {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread")]
                async fn extension() {
                    super::$name($crate::postgres::Install::Extension).await;
                }
                #[tokio::test(flavor = "multi_thread")]
                async fn sql_install() {
                    super::$name($crate::postgres::Install::Sql).await;
                }
            }
        )*
    };
}
