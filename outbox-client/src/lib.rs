//! Publish to the pg_outbox transactional outbox from Rust, inside your own transaction, and
//! consume with exactly-once effects. pg_outbox is the PostgreSQL extension (or, on managed
//! PostgreSQL, the SQL install `sql/pg_outbox.sql`) plus `outbox-worker`, which delivers the
//! messages to Kafka, RabbitMQ or stdout; the README.md at the root of its repository has the rest.
//!
//! Works on anything that implements [`tokio_postgres::GenericClient`]: a `Client`, a
//! `Transaction`, or a pooled client (`&**deadpool_object`).
//!
//! # Publish in the same transaction as the business write
//! ```no_run
//! use outbox_client::{Event, Headers, Outbox};
//! use serde::Serialize;
//!
//! #[derive(Serialize)]
//! struct OrderPlaced { order_id: i64, customer: String, total_cents: i64 }
//!
//! impl Event for OrderPlaced {
//!     const QUEUE: &'static str = "orders";
//!     fn key(&self) -> Option<String> { Some(self.customer.clone()) } // per-customer order
//! }
//!
//! # async fn example(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let tx = client.transaction().await?;
//! tx.execute("INSERT INTO orders (id, customer, total_cents) VALUES ($1, $2, $3)",
//!            &[&42i64, &"c-7", &1299i64]).await?;
//! let id = Outbox::new()
//!     .publish_event(&tx, &OrderPlaced { order_id: 42, customer: "c-7".into(), total_cents: 1299 })
//!     .await?;
//! tx.commit().await?; // the order and its event commit together, or neither does
//! # let _ = id; Ok(()) }
//! ```
//!
//! # Consume exactly once
//! ```no_run
//! use outbox_client::{Inbox, Processed};
//!
//! # async fn example(client: &mut tokio_postgres::Client, message_id: &str) -> Result<(), Box<dyn std::error::Error>> {
//! // message_id comes from the outbox-id header (see the `kafka` and `amqp` features).
//! let outcome = Inbox::new("billing").process_once(client, message_id, async |tx| {
//!     tx.execute("UPDATE accounts SET balance = balance - 1299 WHERE id = 7", &[]).await?;
//!     Ok::<_, tokio_postgres::Error>(())
//! }).await?;
//! if let Processed::Duplicate = outcome { /* seen before: the handler did not run */ }
//! # Ok(()) }
//! ```

pub mod contract;
mod error;
mod event;
mod headers;
mod inbox;
mod publish;
mod trace;

#[cfg(any(feature = "kafka", feature = "amqp"))]
pub mod received;

pub use error::{Error, ServerError};
pub use event::Event;
pub use headers::Headers;
pub use inbox::{Inbox, ProcessError, Processed};
pub use publish::Outbox;
pub use trace::InboxMessage;
pub use uuid::Uuid;
