//! `outbox.dead_letters` from the worker's side: writing a message a broker refused for good, or
//! one that `outbox.publish` did not write (a quarantine).

use std::time::Duration;

use anyhow::Result;
use tokio_postgres::Client;

use crate::message::{Message, Payload, Quarantined};
use crate::pg;

/// Writes dead letters over an ordinary connection, reconnecting as needed.
pub struct DeadLetters {
    url: String,
    client: Option<Client>,
}

impl DeadLetters {
    pub fn new(url: &str) -> DeadLetters {
        DeadLetters {
            url: url.to_owned(),
            client: None,
        }
    }

    /// Durable before it returns: only then may the slot move past the message. A database that
    /// cannot be reached is waited for (with backoff), never skipped. Already there (the worker
    /// died after writing it and before confirming): kept as it is, so INSERT is the only right
    /// needed (`outbox_operator` has it).
    pub async fn write(
        &mut self,
        message: &Message,
        destination: &str,
        error: &str,
        attempts: u32,
    ) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.try_write(message, destination, error, attempts).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(id = %message.id, error = %format!("{e:#}"), "cannot write the dead letter; retrying");
                    self.client = None;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Keeps a quarantined message (destination `quarantine`, raw content in `payload_bytes`),
    /// durably, like [`DeadLetters::write`]. Its id is the one it claimed, or one derived from
    /// its position and content, so a re-streamed quarantine is written once.
    pub async fn quarantine(&mut self, q: &Quarantined) {
        let id = q.id.unwrap_or_else(|| {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            q.raw.hash(&mut hasher);
            uuid::Uuid::from_u64_pair(q.commit_lsn.0, hasher.finish())
        });
        let message = Message {
            id,
            queue: "(quarantine)".into(),
            key: None,
            headers: Default::default(),
            payload: Payload::Bytes(q.raw.clone()),
            created_at: chrono::Utc::now(),
            commit_lsn: q.commit_lsn,
            committed_at: chrono::Utc::now(),
        };
        self.write(&message, "quarantine", &q.reason, 1).await;
    }

    async fn try_write(
        &mut self,
        message: &Message,
        destination: &str,
        error: &str,
        attempts: u32,
    ) -> Result<()> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(pg::connect(&self.url).await?);
        }
        let client = self.client.as_ref().expect("connected");
        let (payload, payload_bytes) = match &message.payload {
            Payload::Json(text) => (Some(text.as_str()), None),
            Payload::Bytes(bytes) => (None, Some(bytes.as_slice())),
        };
        client
            .execute(
                "INSERT INTO outbox.dead_letters
                    (id, queue, key, payload, payload_bytes, headers, created_at, destination, error, attempts)
                 VALUES ($1, $2, $3, $4::text::jsonb, $5, $6::text::jsonb, $7, $8, $9, $10)
                 ON CONFLICT (id) DO NOTHING",
                &[
                    &message.id,
                    &message.queue,
                    &message.key,
                    &payload,
                    &payload_bytes,
                    &serde_json::to_string(&message.headers)?,
                    &message.created_at,
                    &destination,
                    &error,
                    &(attempts as i32),
                ],
            )
            .await?;
        Ok(())
    }
}
