use crate::trace::Creation;
use crate::{Error, Event, Headers};
use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// Publishes messages through the `outbox.publish*` SQL functions, in whatever transaction the
/// given client is in: they are delivered only if that transaction commits.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outbox {
    _private: (),
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes a JSON message; returns its id (UUIDv7), which consumers see as `outbox-id`.
    pub async fn publish<C: GenericClient>(
        &self,
        client: &C,
        queue: &str,
        payload: &impl Serialize,
        headers: &Headers,
        key: Option<&str>,
    ) -> Result<Uuid, Error> {
        let payload = serde_json::to_value(payload)?;
        let creation = Creation::new(headers, queue, 1);
        let headers = creation.headers().to_json();
        let row = creation
            .publish(
                client.query_one(
                    "SELECT outbox.publish($1, $2, $3, $4)",
                    &[&queue, &payload, &headers, &key],
                ),
                |row| vec![row.get(0)],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Publishes one message per payload, in order; `keys`, if given, has one key per payload.
    pub async fn publish_batch<C: GenericClient, P: Serialize>(
        &self,
        client: &C,
        queue: &str,
        payloads: &[P],
        headers: &Headers,
        keys: Option<&[Option<&str>]>,
    ) -> Result<Vec<Uuid>, Error> {
        let payloads = payloads
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()?;
        let creation = Creation::new(headers, queue, payloads.len());
        let headers = creation.headers().to_json();
        let rows = creation
            .publish(
                client.query(
                    "SELECT outbox.publish_batch($1, $2, $3, $4)",
                    &[&queue, &payloads, &headers, &keys],
                ),
                |rows| rows.iter().map(|row| row.get(0)).collect(),
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Publishes an opaque binary payload (Avro, Protobuf, ...); say what it is with
    /// [`Headers::with_content_type`].
    pub async fn publish_bytes<C: GenericClient>(
        &self,
        client: &C,
        queue: &str,
        payload: &[u8],
        headers: &Headers,
        key: Option<&str>,
    ) -> Result<Uuid, Error> {
        let creation = Creation::new(headers, queue, 1);
        let headers = creation.headers().to_json();
        let row = creation
            .publish(
                client.query_one(
                    "SELECT outbox.publish_bytes($1, $2, $3, $4)",
                    &[&queue, &payload, &headers, &key],
                ),
                |row| vec![row.get(0)],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Publishes a typed event to its queue, with its key and headers.
    pub async fn publish_event<C: GenericClient, E: Event>(
        &self,
        client: &C,
        event: &E,
    ) -> Result<Uuid, Error> {
        self.publish(
            client,
            E::QUEUE,
            event,
            &event.headers(),
            event.key().as_deref(),
        )
        .await
    }
}
