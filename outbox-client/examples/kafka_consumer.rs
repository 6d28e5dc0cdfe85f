//! Consume from Kafka with exactly-once effects: the outbox id of each message is marked in the
//! same transaction as the handler's writes, so a redelivered message is skipped.
//!
//!     DATABASE_URL=postgres://... KAFKA_BROKERS=127.0.0.1:9092 \
//!       cargo run -p outbox-client --features kafka --example kafka_consumer

use outbox_client::received::from_kafka;
use outbox_client::{Inbox, Processed};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS revenue (order_id bigint, total_cents bigint)")
        .await?;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "billing")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&["orders"])?;
    let inbox = Inbox::new("billing.orders");

    loop {
        let message = consumer.recv().await?;
        let received = from_kafka(&message)?;
        let order: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or(b"null"))?;
        let outcome = inbox
            .process_once(
                &mut client,
                &received.id.to_string(),
                async |tx: &tokio_postgres::Transaction<'_>| {
                    tx.execute(
                        "INSERT INTO revenue VALUES ($1, $2)",
                        &[&order["order_id"].as_i64(), &order["total_cents"].as_i64()],
                    )
                    .await
                },
            )
            .await?;
        if outcome == Processed::Duplicate {
            println!("{} seen before, skipped", received.id);
        }
        // Commit the offset only after the effect committed: a crash in between redelivers,
        // and the inbox turns the redelivery into a no-op.
        consumer.commit_message(&message, CommitMode::Async)?;
    }
}
