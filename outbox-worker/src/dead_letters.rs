//! `outbox.dead_letters` from the worker's side: writing a message a broker refused for good, or
//! one that `outbox.publish` did not write (a quarantine).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use chrono::{DateTime, Utc};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::fatal::Fatal;
use crate::health::Health;
use crate::message::{Message, Payload, Quarantined};
use crate::pg;
use crate::triage;

/// A write taking longer than this makes the worker not ready.
const STALLED_AFTER: Duration = Duration::from_secs(5);
/// While draining after SIGTERM, how long one dead-letter write may take before the stop goes on.
const DRAIN_ATTEMPT: Duration = Duration::from_secs(1);

/// Why a dead letter was not written.
#[derive(Debug, thiserror::Error)]
pub enum NotWritten {
    /// Shutdown was requested while the database could not be reached: the message stays
    /// unconfirmed and comes back with the next run.
    #[error("shutdown requested before the dead letter could be written")]
    Shutdown,
    /// No retry can fix it (a right is missing): the worker stops.
    #[error(transparent)]
    Fatal(#[from] Fatal),
}

/// Writes dead letters over an ordinary connection, reconnecting as needed.
pub struct DeadLetters {
    url: String,
    /// `postgres.primary_url`: where they are written while `url` is a standby.
    primary_url: Option<String>,
    client: Option<Client>,
    /// With `primary_url`: a connection to `url`'s server, where the slot is. A dead letter
    /// written on the primary counts once it is there too (see [`DeadLetters::reached_the_slot`]).
    slot_server: Option<Client>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    /// The dead letters there were when the stream last started ([`DeadLetters::load_earlier`]).
    earlier: HashSet<(uuid::Uuid, DateTime<Utc>)>,
}

impl DeadLetters {
    pub fn new(
        url: &str,
        primary_url: Option<&str>,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> DeadLetters {
        DeadLetters {
            url: url.to_owned(),
            primary_url: primary_url.map(str::to_owned),
            client: None,
            slot_server: None,
            health,
            shutdown,
            earlier: HashSet::new(),
        }
    }

    /// Notes the dead letters already written, by message id and creation time, before the stream
    /// starts. A message a run dead-lettered comes back when the run ended before the slot moved
    /// past it; sent again once its cause was gone, it arrived after later messages of its key
    /// (and stayed a dead letter too: found by a hostile audit). A redriven copy has the same id
    /// but a new creation time: it is sent. Not loaded (the database cannot be reached): nothing
    /// is skipped, and the message may come twice, as before.
    pub async fn load_earlier(&mut self) {
        match self.try_load_earlier().await {
            Ok(earlier) => self.earlier = earlier,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the dead letters already written; a message dead-lettered just before the last stop may be sent again");
                self.earlier.clear();
            }
        }
    }

    async fn try_load_earlier(&mut self) -> Result<HashSet<(uuid::Uuid, DateTime<Utc>)>> {
        let rows = self
            .connection()
            .await?
            .query(
                "SELECT d.id, d.created_at FROM outbox.dead_letters d
                  WHERE d.destination OPERATOR(pg_catalog.<>) 'quarantine'",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The connection, opened again if it was closed.
    async fn connection(&mut self) -> Result<&Client> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(pg::connect_writer(&self.url, self.primary_url.as_deref()).await?);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    /// Whether an earlier run dead-lettered this very message ([`DeadLetters::load_earlier`]).
    pub fn written_earlier(&self, message: &Message) -> bool {
        self.earlier.contains(&(message.id, message.created_at))
    }

    /// Durable before it returns `Ok`: only then may the slot move past the message. A database
    /// that cannot be reached is waited for (with backoff, not ready meanwhile), never skipped,
    /// until shutdown. Already there (the worker died after writing it and before confirming):
    /// kept as it is, so INSERT is the only right needed (`outbox_relay` has it).
    pub async fn write(
        &mut self,
        message: &Message,
        destination: &str,
        error: &str,
        attempts: u32,
    ) -> Result<(), NotWritten> {
        let (health, shutdown) = (self.health.clone(), self.shutdown.clone());
        if shutdown.is_cancelled() {
            // Draining after SIGTERM: one attempt, briefly, and the stop goes on; the message
            // stays unconfirmed and is dead-lettered by the next run.
            let attempt = self.try_write(message, destination, error, attempts);
            return match tokio::time::timeout(DRAIN_ATTEMPT, attempt).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(failure)) => match triage::of_sql(&failure, triage::WORKER_RIGHT) {
                    Some(fatal) => Err(fatal.into()),
                    None => {
                        tracing::warn!(id = %message.id, error = %format!("{failure:#}"), "cannot write the dead letter while stopping; the next run will");
                        Err(NotWritten::Shutdown)
                    }
                },
                Err(_) => {
                    tracing::warn!(id = %message.id, "the dead letter could not be written in time while stopping; the next run will");
                    Err(NotWritten::Shutdown)
                }
            };
        }
        let mut delay = Duration::from_millis(200);
        loop {
            let result = {
                let attempt = self.try_write(message, destination, error, attempts);
                tokio::pin!(attempt);
                // An attempt that hangs (a locked table) stalls delivery as surely as a failure.
                let stall = tokio::time::sleep(STALLED_AFTER);
                tokio::pin!(stall);
                loop {
                    tokio::select! {
                        result = &mut attempt => break result,
                        () = &mut stall, if !health.is_stalled() => health.set_stalled(true),
                        // The INSERT may still complete on the server: harmless, the next
                        // run's write of the same id does nothing.
                        () = shutdown.cancelled() => return Err(NotWritten::Shutdown),
                    }
                }
            };
            let failure = match result {
                Ok(()) => {
                    health.set_stalled(false);
                    return Ok(());
                }
                Err(e) => e,
            };
            if let Some(fatal) = triage::of_sql(&failure, triage::WORKER_RIGHT) {
                return Err(fatal.into());
            }
            tracing::warn!(id = %message.id, error = %format!("{failure:#}"), "cannot write the dead letter; retrying");
            health.set_stalled(true);
            self.client = None;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return Err(NotWritten::Shutdown),
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// Keeps a quarantined message (destination `quarantine`, raw content in `payload_bytes`),
    /// durably, like [`DeadLetters::write`]. Its id comes from its place in the stream (commit LSN,
    /// position in the transaction), never from what it claims: two identical ones are two rows, a
    /// claimed id cannot collide with a real message's, and a re-streamed quarantine is written
    /// once. The reason names the id it claimed.
    pub async fn quarantine(&mut self, q: &Quarantined) -> Result<(), NotWritten> {
        let id = uuid::Uuid::from_u64_pair(q.commit_lsn.0, u64::from(q.position));
        let message = Message {
            id,
            queue: "(quarantine)".into(),
            key: None,
            headers: Default::default(),
            payload: Payload::Bytes(q.raw.clone()),
            created_at: Utc::now(),
            commit_lsn: q.commit_lsn,
            index: q.position,
            committed_at: Utc::now(),
        };
        self.write(&message, "quarantine", &q.reason, 1).await
    }

    async fn try_write(
        &mut self,
        message: &Message,
        destination: &str,
        error: &str,
        attempts: u32,
    ) -> Result<()> {
        self.connection().await?;
        let written = match self.insert(message, destination, error, attempts).await {
            // A data exception (a `\u0000` jsonb refuses, a character the database's encoding
            // lacks) would fail every retry and stall delivery for good: keep the payload as
            // bytes instead, without key and headers, and say so.
            Err(e) if pg::db_error_in(&e).is_some_and(|db| db.code().code().starts_with("22")) => {
                let kept = Message {
                    key: None,
                    headers: Default::default(),
                    payload: Payload::Bytes(message.payload.as_bytes().to_vec()),
                    ..message.clone()
                };
                let error = format!(
                    "{error} (kept as bytes without key and headers: the table refused them: {})",
                    pg::db_error_in(&e).map_or(String::new(), |db| db.message().to_owned())
                );
                self.insert(&kept, destination, &error, attempts).await
            }
            other => other,
        };
        written?;
        if self.primary_url.is_some() {
            self.reached_the_slot(message.id).await?;
        }
        Ok(())
    }

    /// A dead letter written on the primary while the slot is a standby's: the slot may move past
    /// the message only once the standby has the dead letter too. Else, with asynchronous
    /// replication, a failover to that standby (the slot's future) would lose the message: the
    /// slot past it, its dead letter only on the old primary (found by a hostile review). Should
    /// the standby be promoted meanwhile (a failover, or a split brain with the old primary still
    /// up), the write goes again to the promoted server.
    async fn reached_the_slot(&mut self, id: uuid::Uuid) -> Result<()> {
        let mut waited = Duration::ZERO;
        let mut warned = false;
        loop {
            if self.slot_server.as_ref().is_none_or(Client::is_closed) {
                self.slot_server = Some(pg::connect(&self.url).await?);
            }
            let slot_server = self.slot_server.as_ref().expect("connected above");
            let row = slot_server
                .query_one(
                    "SELECT EXISTS (SELECT FROM outbox.dead_letters d WHERE d.id OPERATOR(pg_catalog.=) $1),
                            pg_catalog.pg_is_in_recovery()",
                    &[&id],
                )
                .await?;
            let (there, in_recovery): (bool, bool) = (row.get(0), row.get(1));
            if there {
                return Ok(());
            }
            if !in_recovery {
                // Promoted: the next attempt connects to it and writes there.
                self.client = None;
                anyhow::bail!("postgres.url's server was promoted before the dead letter reached it; writing it there");
            }
            if waited >= Duration::from_secs(30) && !warned {
                warned = true;
                tracing::warn!(%id, "a dead letter written on postgres.primary_url has not reached the standby postgres.url names after 30 s: delivery waits for it (is primary_url the standby's primary, and does the standby replay?)");
            }
            let pause = Duration::from_millis(20)
                .max(waited / 10)
                .min(Duration::from_secs(1));
            tokio::time::sleep(pause).await;
            waited += pause;
        }
    }

    async fn insert(
        &self,
        message: &Message,
        destination: &str,
        error: &str,
        attempts: u32,
    ) -> Result<()> {
        // An error may quote what it refused, NUL included (the uuid crate prints it raw): text
        // columns cannot hold one.
        let error = error.replace('\0', "\\u0000");
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
