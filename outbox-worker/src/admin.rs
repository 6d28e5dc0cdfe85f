//! The operator's commands: `setup`, `check-config`, `status`, `dlq list`, `dlq redrive`.

use anyhow::Result;

use crate::config::Config;
use crate::pg;
use crate::setup::{self, SlotSetup};
use crate::source::SlotSettings;

/// `setup`: the publication and the slot, created on first setup; `SlotSetup::Replace`
/// (`--new-slot`) replaces a slot that was lost.
pub async fn setup(config: &Config, mode: SlotSetup, stopped_elsewhere: Vec<String>) -> Result<()> {
    let client = pg::connect(config.url()).await?;
    let settings = SlotSettings {
        stopped_elsewhere,
        ..SlotSettings::of(config)
    };
    setup::ensure_slot(&client, &settings, mode).await?;
    println!(
        "publication {:?} and slot {:?} are ready",
        config.postgres.publication, config.postgres.slot
    );
    Ok(())
}

/// `check-config`: the configuration with defaults filled in, secrets redacted.
pub fn show_config(config: &Config) -> String {
    toml::to_string_pretty(config).expect("the configuration serializes")
}

/// `outbox-worker dlq …`.
pub enum DlqCommand {
    List {
        queue: Option<String>,
        limit: i64,
    },
    Redrive {
        id: Option<uuid::Uuid>,
        queue: Option<String>,
    },
}

/// On the primary: `postgres.primary_url` while `url` is a standby (redrive writes).
pub async fn dlq(url: &str, primary_url: Option<&str>, command: DlqCommand) -> Result<()> {
    let client = pg::connect_writer(url, primary_url).await?;
    match command {
        DlqCommand::List { queue, limit } => {
            // written_by: the login role that wrote the row (the worker's, or an operator's who
            // wrote it by hand); '-' for rows written before pg_outbox 0.2.1, which has no such
            // column (read through to_jsonb, so an older install lists too).
            let rows = client
                .query(
                    "SELECT d.id, d.queue, coalesce(d.key, ''), d.destination, d.attempts, d.failed_at::text,
                            coalesce(pg_catalog.to_jsonb(d) ->> 'written_by', '-'), d.error
                       FROM outbox.dead_letters d WHERE $1::text IS NULL OR d.queue = $1
                      ORDER BY d.failed_at, d.id LIMIT $2",
                    &[&queue, &limit],
                )
                .await?;
            println!("id\tqueue\tkey\tdestination\tattempts\tfailed_at\twritten_by\terror");
            for row in &rows {
                let id: uuid::Uuid = row.get(0);
                let attempts: i32 = row.get(4);
                let text = |i: usize| row.get::<_, String>(i);
                println!(
                    "{id}\t{}\t{}\t{}\t{attempts}\t{}\t{}\t{}",
                    text(1),
                    text(2),
                    text(3),
                    text(5),
                    text(6),
                    text(7)
                );
            }
            eprintln!("{} dead letter(s)", rows.len());
        }
        DlqCommand::Redrive { id: Some(id), .. } => {
            client
                .query_one("SELECT outbox.redrive($1::uuid)", &[&id])
                .await?;
            println!("redriven: {id}");
        }
        DlqCommand::Redrive { queue, .. } => {
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

/// `status`: one line per slot, and up to when the worker delivered everything
/// (`outbox.slots.delivered_before`: what a lost slot's error would name).
pub async fn status(url: &str) -> Result<()> {
    let client = pg::connect(url).await?;
    let claims = crate::claims::exists(&client).await?;
    // Each slot's latest claim (Operations, "Several slots"); none or empty: the catch-all.
    let queues = if claims {
        "coalesce((SELECT nullif(array_to_string(c.queues, ','), '') FROM outbox.queue_claims c
                    WHERE c.slot_name = s.slot_name ORDER BY c.seq DESC LIMIT 1), '(catch-all)')"
    } else {
        "'(catch-all)'"
    };
    let rows = client
        .query(
            &format!(
                "SELECT slot_name::text, active, coalesce(active_pid::text, '-'), coalesce(confirmed_flush_lsn::text, '-'),
                    coalesce(lag_bytes::text, '-'), coalesce(retained_wal_bytes::text, '-'),
                    coalesce(wal_status, '-'), dead_letters, failover,
                    coalesce((SELECT to_char(t.delivered_before AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
                                FROM outbox.slots t WHERE t.slot_name = s.slot_name), '-'),
                    {queues}
               FROM outbox.status() s"
            ),
            &[],
        )
        .await?;
    println!(
        "slot\tactive\tpid\tconfirmed_lsn\tlag_bytes\tretained_wal_bytes\twal_status\tdead_letters\tfailover\tdelivered_before\tqueues"
    );
    for row in &rows {
        let active: bool = row.get(1);
        let dead: i64 = row.get(7);
        let failover: bool = row.get(8);
        let text = |i: usize| row.get::<_, String>(i);
        println!(
            "{}\t{active}\t{}\t{}\t{}\t{}\t{}\t{dead}\t{failover}\t{}\t{}",
            text(0),
            text(2),
            text(3),
            text(4),
            text(5),
            text(6),
            text(9),
            text(10)
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
