//! `outbox.dead_letters` from the worker's side: writing a message a broker refused for good, and
//! the operator's commands (`status`, `dlq list`, `dlq redrive`) over the SQL functions.

use std::time::Duration;

use anyhow::Result;
use tokio_postgres::Client;

use crate::message::{Message, Payload};
use crate::source::{setup, Quarantined};

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
            uuid::Uuid::from_u64_pair(q.commit_lsn, hasher.finish())
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
            self.client = Some(setup::connect(&self.url).await?);
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

pub enum Command {
    List {
        queue: Option<String>,
        limit: i64,
    },
    Redrive {
        id: Option<uuid::Uuid>,
        queue: Option<String>,
    },
}

pub async fn run_command(url: &str, command: Command) -> Result<()> {
    let client = setup::connect(url).await?;
    match command {
        Command::List { queue, limit } => {
            let rows = client
                .query(
                    "SELECT id, queue, coalesce(key, ''), destination, attempts, failed_at::text, error
                       FROM outbox.dead_letters WHERE $1::text IS NULL OR queue = $1
                      ORDER BY failed_at, id LIMIT $2",
                    &[&queue, &limit],
                )
                .await?;
            println!("id\tqueue\tkey\tdestination\tattempts\tfailed_at\terror");
            for row in &rows {
                let id: uuid::Uuid = row.get(0);
                let attempts: i32 = row.get(4);
                let (queue, key, destination, failed_at, error): (
                    String,
                    String,
                    String,
                    String,
                    String,
                ) = (row.get(1), row.get(2), row.get(3), row.get(5), row.get(6));
                println!("{id}\t{queue}\t{key}\t{destination}\t{attempts}\t{failed_at}\t{error}");
            }
            eprintln!("{} dead letter(s)", rows.len());
        }
        Command::Redrive { id: Some(id), .. } => {
            client
                .query_one("SELECT outbox.redrive($1::uuid)", &[&id])
                .await?;
            println!("redriven: {id}");
        }
        Command::Redrive { queue, .. } => {
            let count: i64 = client
                .query_one(
                    "SELECT outbox.redrive($1::text)",
                    &[&queue.unwrap_or_default()],
                )
                .await?
                .get(0);
            println!("redriven: {count} message(s)");
        }
    }
    Ok(())
}

pub async fn status(url: &str) -> Result<()> {
    let client = setup::connect(url).await?;
    let rows = client
        .query(
            "SELECT slot_name::text, active, coalesce(active_pid::text, '-'), coalesce(confirmed_flush_lsn::text, '-'),
                    coalesce(lag_bytes::text, '-'), coalesce(retained_wal_bytes::text, '-'),
                    coalesce(wal_status, '-'), dead_letters
               FROM outbox.status()",
            &[],
        )
        .await?;
    println!(
        "slot\tactive\tpid\tconfirmed_lsn\tlag_bytes\tretained_wal_bytes\twal_status\tdead_letters"
    );
    for row in &rows {
        let active: bool = row.get(1);
        let dead: i64 = row.get(7);
        let text = |i: usize| row.get::<_, String>(i);
        println!(
            "{}\t{active}\t{}\t{}\t{}\t{}\t{}\t{dead}",
            text(0),
            text(2),
            text(3),
            text(4),
            text(5),
            text(6)
        );
    }
    if rows.is_empty() {
        let dead: i64 = client
            .query_one("SELECT count(*) FROM outbox.dead_letters", &[])
            .await?
            .get(0);
        println!("(no pgoutput slot in this database)\t\t\t\t\t\t\t{dead}");
    }
    Ok(())
}
