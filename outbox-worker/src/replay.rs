//! `outbox-worker replay`: sends table-form messages again from `outbox.messages`, with their
//! original ids, through the configured routes and sinks. For what a lost slot (or a failover on
//! PostgreSQL 15/16) did not deliver; consumers drop what had already arrived by `outbox-id`.
//!
//! Order: by id. Ids are UUIDv7 taken when `outbox.publish` runs, so a key's messages come in the
//! order they were published; for writers that serialize on the key (a row lock on the business
//! row), that is their commit order.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use globset::{Glob, GlobMatcher};
use outbox_client::contract::HEADER_REPLAYED_AT;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dead_letters::DeadLetters;
use crate::delivery::Delivery;
use crate::health::Health;
use crate::lsn::Lsn;
use crate::outcome::{shutdown_requested, Parts, Routed};
use crate::pg;
use crate::router::Router;
use crate::sink::{Purpose, Sinks};
use crate::source::decode;

/// Which messages to send again.
pub struct ReplayRange {
    /// `created_at` at or after this.
    pub since: DateTime<Utc>,
    /// `created_at` before this, if given.
    pub until: Option<DateTime<Utc>>,
    /// Only queues matching this glob.
    pub queue: Option<String>,
}

/// What a replay did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Acknowledged by a broker.
    pub sent: u64,
    /// Refused for good (or without a route): written to `outbox.dead_letters`.
    pub dead_lettered: u64,
    /// Rows that break the rules `outbox.publish` keeps (not written by it): not sent.
    pub skipped: u64,
    /// Filtered out by `--queue`, or delivered by another slot (`postgres.queues`).
    pub other_queues: u64,
}

/// Rows fetched per round trip.
const PAGE: i32 = 1_000;

pub async fn replay(
    config: &Config,
    range: ReplayRange,
    shutdown: CancellationToken,
) -> Result<ReplaySummary> {
    let queue = range
        .queue
        .as_deref()
        .map(|glob| Glob::new(glob).map(|g| g.compile_matcher()))
        .transpose()
        .context("--queue")?;
    let mut client = pg::connect(config.url()).await?;
    // One snapshot for the count and the cursor, so the summary adds up to what was read.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let total: i64 = tx
        .query_one(
            "SELECT count(*) FROM outbox.messages
              WHERE created_at >= $1 AND ($2::timestamptz IS NULL OR created_at < $2)",
            &[&range.since, &range.until],
        )
        .await
        .context("cannot read outbox.messages (the worker's role needs outbox_relay)")?
        .get(0);
    eprintln!(
        "replaying up to {total} message(s) created from {}{}",
        range.since.to_rfc3339(),
        range
            .until
            .map(|u| format!(" until {}", u.to_rfc3339()))
            .unwrap_or_default()
    );

    let replayed_at = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut router = Router::new(config);
    let sinks = Sinks::build(config, Purpose::Replay)?;
    let health = Health::new(Vec::new());
    let mut delivery = Delivery::new(&sinks, config.delivery.clone());
    let mut dead_letters =
        DeadLetters::new(config.url(), config.primary_url(), health, shutdown.clone());
    // The queues the slot delivers now (the table keeps no commit position to decide by).
    let claims = crate::claims::load_for(config.url(), config.primary_url()).await?;
    let mut ownership = crate::claims::Ownership::now(claims, &config.postgres.slot);
    let mut parts = Parts {
        router: &mut router,
        delivery: &mut delivery,
        dead_letters: &mut dead_letters,
        ownership: &mut ownership,
    };
    let mut summary = ReplaySummary::default();
    let mut report = Instant::now();

    // One cursor over the range in id order: one sort, rows streamed a page at a time.
    let statement = tx
        .prepare(
            "SELECT id, queue, key, payload::text, payload_bytes, headers::text, created_at
               FROM outbox.messages
              WHERE created_at >= $1 AND ($2::timestamptz IS NULL OR created_at < $2)
              ORDER BY id",
        )
        .await?;
    let portal = tx.bind(&statement, &[&range.since, &range.until]).await?;
    let mut page_number = 0u64;
    loop {
        let rows = tx.query_portal(&portal, PAGE).await?;
        if rows.is_empty() {
            break;
        }
        page_number += 1;
        let page = parts.delivery.begin();
        for row in &rows {
            let mut message = match decode::message_of_row(row) {
                Ok(message) => message,
                Err(problem) => {
                    tracing::warn!(%problem, "not sent again");
                    summary.skipped += 1;
                    continue;
                }
            };
            if queue
                .as_ref()
                .is_some_and(|q: &GlobMatcher| !q.is_match(&message.queue))
            {
                summary.other_queues += 1;
                continue;
            }
            message
                .headers
                .insert(HEADER_REPLAYED_AT.to_owned(), replayed_at.clone());
            while !parts.delivery.can_accept() {
                settle(&mut parts, &shutdown).await?;
            }
            match parts.route(page, message).await {
                Ok(Routed::Sent | Routed::AlreadyDelivered) => {}
                Ok(Routed::OtherSlot) => summary.other_queues += 1,
                Ok(Routed::AfterMove { .. }) => {
                    unreachable!("a replay decides by the claims now, never waits for a move")
                }
                Ok(Routed::DeadLettered) => summary.dead_lettered += 1,
                Err(not_written) => interrupted(shutdown_requested::<()>(Err(not_written))?)?,
            }
        }
        // A stand-in commit position: replay confirms no slot, it only waits for the acks.
        parts.delivery.commit(page, Lsn(page_number));
        if report.elapsed() > Duration::from_secs(5) {
            eprintln!("... {} of {total} sent", parts.delivery.acknowledged());
            report = Instant::now();
        }
    }
    tx.commit().await?;
    while !parts.delivery.is_idle() {
        settle(&mut parts, &shutdown).await?;
    }
    delivery.close().await;
    summary.sent = delivery.acknowledged();
    summary.dead_lettered += delivery.dead_lettered_count();
    eprintln!(
        "replayed {} message(s): {} sent, {} dead-lettered, {} skipped (not written by outbox.publish), {} of other queues",
        total, summary.sent, summary.dead_lettered, summary.skipped, summary.other_queues
    );
    Ok(summary)
}

/// Waits for the next acknowledgement or refusal; a message refused for good is dead-lettered.
async fn settle(parts: &mut Parts<'_>, shutdown: &CancellationToken) -> Result<()> {
    let settled = tokio::select! {
        settled = parts.delivery.progress() => settled,
        () = shutdown.cancelled() => return interrupted(true),
    };
    interrupted(shutdown_requested(parts.settle_one(settled).await)?)
}

fn interrupted(yes: bool) -> Result<()> {
    if yes {
        anyhow::bail!(
            "replay interrupted: run it again with the same range (consumers drop duplicates)"
        );
    }
    Ok(())
}
