//! Publish an event in the same transaction as the business write.
//!
//!     DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo run -p outbox-client --example publish

use outbox_client::{Event, Headers, Outbox};
use serde::Serialize;

#[derive(Serialize)]
struct OrderPlaced {
    order_id: i64,
    customer: String,
    total_cents: i64,
}

impl Event for OrderPlaced {
    const QUEUE: &'static str = "orders";
    fn key(&self) -> Option<String> {
        Some(self.customer.clone())
    }
    fn headers(&self) -> Headers {
        Headers::new().with("event-type", "OrderPlaced")
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS orders (id bigint PRIMARY KEY, customer text, total_cents bigint)")
        .await?;

    let order = OrderPlaced {
        order_id: 42,
        customer: "c-7".into(),
        total_cents: 1299,
    };
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO orders VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        &[&order.order_id, &order.customer, &order.total_cents],
    )
    .await?;
    let id = Outbox::new().publish_event(&tx, &order).await?;
    tx.commit().await?;
    println!("order 42 and its event {id} committed together");
    Ok(())
}
