//! A publication of its own for a slot with a set of queues: `pg_outbox_<slot>`, row-filtered on
//! the queue, so that the slot's walsender sends it only the table-form messages it may deliver
//! (one that decodes and then skips another slot's message costs the primary about 6 µs of CPU;
//! one that filters it, 0.5 µs). The catch-all slot streams `postgres.publication` unfiltered, and
//! wal-form messages reach every slot (no publication filters them): the claims decide there.
//!
//! The filter is made by `outbox.filter_slot_publication` (the worker's role cannot own a
//! publication of `outbox.messages`) and only ever keeps a superset of what the slot may deliver
//! from its confirmed position on: pgoutput decodes each change with the publication as it was at
//! that change's place in the WAL, so what a filter left out is never streamed to that slot.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_postgres::Client;

use crate::claims::Claims;
use crate::fatal::Fatal;
use crate::lsn::Lsn;

/// The publication of a slot with a set of queues.
pub fn name(slot: &str) -> String {
    format!("pg_outbox_{slot}")
}

/// Slot names that leave room for the `pg_outbox_` of their publication's name (63 bytes).
pub const MAX_SLOT_LEN: usize = 63 - "pg_outbox_".len();

/// Setup, before a slot records its set: makes its publication keep `queues` and every set the
/// slot may still deliver from its confirmed position. When the publication is new or now keeps
/// queues it did not, or a claim will be recorded (`claim_changes`: a setup stopped while it
/// waited left the publication changed, and the next one finds it unchanged), waits for the
/// transactions in progress (their earlier inserts were decoded with the filter before) and
/// returns the position after them: every message committed after it was decoded with the
/// filter now in place.
pub async fn prepare(
    writer: &Client,
    slot: &str,
    queues: &[String],
    claim_changes: bool,
) -> Result<Prepared> {
    let change: String = writer
        .query_one(
            "SELECT outbox.filter_slot_publication($1::text::name, $2)",
            &[&slot, &queues],
        )
        .await
        .with_context(|| format!("cannot make publication {:?}", name(slot)))?
        .get(0);
    tracing::info!(
        publication = name(slot),
        ?queues,
        change,
        "the slot's publication"
    );
    match change.as_str() {
        // Changed by hand, maybe narrowed while the slot streamed it: in place only from now.
        "created" | "remade" => Ok(Prepared::Created(wait_for_open_transactions(writer).await?)),
        "widened" => Ok(Prepared::Waited(wait_for_open_transactions(writer).await?)),
        _ if claim_changes => Ok(Prepared::Waited(wait_for_open_transactions(writer).await?)),
        _ => Ok(Prepared::Kept),
    }
}

/// What [`prepare`] did, and from where its filter holds (after the transactions it waited for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// Made (again): it holds only for messages committed after this position.
    Created(Lsn),
    /// In place before, maybe widened; the transactions open were waited for.
    Waited(Lsn),
    /// In place before, not widened, and no claim to record.
    Kept,
}

/// Waits until every transaction in progress now has ended (as CREATE INDEX CONCURRENTLY does),
/// saying which sessions it waits for every 10 s; returns the WAL insert position after them.
async fn wait_for_open_transactions(writer: &Client) -> Result<Lsn> {
    // A snapshot lists the transactions in progress below the newest one that ended: end one of
    // our own first, or one that took its id after the last to end is missed (a hostile review).
    writer
        .batch_execute("BEGIN; SELECT pg_catalog.pg_current_xact_id(); COMMIT")
        .await?;
    let xids: Vec<String> = writer
        .query_one(
            "SELECT coalesce(array_agg(x::text), '{}')
               FROM pg_catalog.pg_snapshot_xip(pg_catalog.pg_current_snapshot()) x",
            &[],
        )
        .await?
        .get(0);
    let mut told = Instant::now();
    loop {
        let open: Vec<i32> = writer
            .query_one(
                "SELECT coalesce(array_agg(coalesce(a.pid, 0)), '{}')
                   FROM unnest($1::text[]) x
                   LEFT JOIN pg_catalog.pg_stat_activity a ON a.backend_xid::text = x
                  WHERE pg_catalog.pg_xact_status(x::pg_catalog.xid8) = 'in progress'",
                &[&xids],
            )
            .await?
            .get(0);
        if open.is_empty() {
            break;
        }
        if told.elapsed() > Duration::from_secs(10) {
            tracing::warn!(pids = ?open, "waiting for transactions open before the slot's claim to end (pid 0: a prepared transaction, see pg_prepared_xacts): they may hold messages decoded with its publication's filter before; stopping this setup is safe, the next one waits for them too");
            told = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lsn: String = writer
        .query_one("SELECT pg_catalog.pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    lsn.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

/// The publication a run streams, and what it must keep while the run lasts.
#[derive(Debug, Clone)]
pub struct Streamed {
    pub publication: String,
    /// The slot's own publication: the slot, and the claims that say what it must keep.
    own: Option<(String, Claims)>,
}

impl Streamed {
    /// `pg_outbox_<slot>` once the slot has confirmed past where that publication has been in
    /// place and it keeps every set the slot may deliver; `shared` (`postgres.publication`)
    /// otherwise: for the catch-all, before the slot's first start after its publication was made
    /// (an older position would be decoded before it existed), and when it is not as setup made it.
    pub async fn choose(client: &Client, slot: &str, shared: &str, claims: &Claims) -> Streamed {
        let fallback = Streamed::shared(shared);
        let Some(claim) = claims.current(slot).filter(|c| !c.queues.is_empty()) else {
            return fallback;
        };
        let own = name(slot);
        let Some(from) = claim.filtered_from else {
            tracing::info!(
                publication = shared,
                "the slot's claim has no publication of its own yet: streaming the shared one"
            );
            return fallback;
        };
        let Ok(Some(confirmed)) = crate::claims::confirmed_position(client, slot).await else {
            return fallback;
        };
        if confirmed < from {
            tracing::info!(publication = shared, own, confirmed = %confirmed, from = %from, "streaming the shared publication until the slot has confirmed past where its own one holds; its own from the next start after that");
            return fallback;
        }
        let streamed = Streamed {
            publication: own.clone(),
            own: Some((slot.to_owned(), claims.clone())),
        };
        match streamed.check(client).await {
            Ok(()) => streamed,
            Err(fatal) => {
                tracing::warn!(
                    problem = fatal.problem,
                    publication = shared,
                    "streaming the shared publication instead of the slot's own"
                );
                fallback
            }
        }
    }

    pub fn shared(publication: &str) -> Streamed {
        Streamed {
            publication: publication.to_owned(),
            own: None,
        }
    }

    /// The shared publication streams exactly what the install made it stream; the slot's own
    /// still keeps every queue the slot may deliver from where it has confirmed now (another
    /// worker's setup for the slot, a standby of it, narrows to that: a hostile review).
    pub async fn check(&self, client: &Client) -> Result<(), Fatal> {
        let Some((slot, claims)) = &self.own else {
            return crate::setup::check_publication(client, &self.publication).await;
        };
        let confirmed = crate::claims::confirmed_position(client, slot)
            .await
            .ok()
            .flatten()
            .unwrap_or(Lsn(0));
        let needs = claims.globs_from(slot, confirmed);
        let kept: Option<Vec<String>> = client
            .query_one("SELECT outbox.slot_publication_queues($1::text::name)", &[slot])
            .await
            .map_err(|e| {
                Fatal::new(
                    format!("cannot read publication {:?}: {e}", self.publication),
                    "the worker's role needs EXECUTE on outbox.slot_publication_queues (role outbox_operator)",
                )
            })?
            .get(0);
        let missing: Vec<&String> = match &kept {
            Some(kept) => needs.iter().filter(|g| !kept.contains(g)).collect(),
            None => needs.iter().collect(),
        };
        if missing.is_empty() {
            return Ok(());
        }
        Err(Fatal::new(
            format!(
                "publication {:?} does not keep queues {missing:?} of slot {slot:?} (it keeps {})",
                self.publication,
                kept.map_or("nothing setup made".to_owned(), |k| format!("{k:?}"))
            ),
            format!(
                "run `outbox-worker setup` for slot {slot:?} (its worker stopped): \
                 outbox.filter_slot_publication makes it again"
            ),
        ))
    }
}
