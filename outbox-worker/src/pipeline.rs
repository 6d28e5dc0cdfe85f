//! `outbox-worker run`: source → router → sinks → delivery → confirm, with reconnects and a
//! graceful stop.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio_util::sync::CancellationToken;

use crate::claims;
use crate::config::Config;
use crate::dead_letters::DeadLetters;
use crate::delivery::Delivery;
use crate::fatal::Fatal;
use crate::health::Health;
use crate::http;
use crate::lsn::Lsn;
use crate::outcome::{shutdown_requested, Parts, Routed};
use crate::pg;
use crate::router::Router;
use crate::setup::{self, SlotSetup};
use crate::sink::{Purpose, Sinks, StreamId};
use crate::slot_publication::Streamed;
use crate::source::{ReplicationSource, SlotSettings, SourceError, SourceEvent};
use crate::telemetry;
use crate::triage::{self, Remedy};

/// Why a stream ended.
pub(crate) enum Stop {
    /// Shutdown was requested and in-flight messages have drained (or the drain timed out).
    Requested,
    /// The replication connection was lost or refused: reconnect.
    Lost(SourceError),
}

/// A stream that lasted this long was healthy: the reconnect backoff starts over.
const HEALTHY_STREAM: Duration = Duration::from_secs(30);

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    // A busy port is a configuration error (exit 2), found before anything starts.
    let listener = match config.http.listen {
        Some(listen) => Some(http::bind(listen).await?),
        None => None,
    };
    // Health answers from the start: live while PostgreSQL is unreachable or the first slot is
    // being created, ready only once streaming.
    let sinks = Sinks::build(&config, Purpose::Stream)?;
    let health = Health::new(sinks.iter().map(|(_, s)| s.sink.clone()).collect());
    if let Some(listener) = listener {
        let metrics = http::install_metrics()?;
        tokio::spawn(http::serve(
            listener,
            metrics,
            health.clone(),
            shutdown.clone(),
        ));
    }
    let Some(client) = connect_at_start(config.url(), &shutdown).await? else {
        return Ok(());
    };
    setup::check_rights(&client, true).await?;
    let stream_id = stream_id(&client, &config.postgres.slot).await?;
    let mut settings = SlotSettings::of(&config);
    if !config.postgres.setup {
        // ensure_slot checks it otherwise.
        setup::check_publication(&client, &settings.publication).await?;
    }
    settings.wal_form = setup::installed(&client).await? != Some(setup::Install::Sql);
    // A standby's slot: what decoding there needs, and a primary to write to, checked now rather
    // than at the first dead letter.
    if let Some(primary_url) = setup::check_standby(&client, &settings).await? {
        match pg::connect_writer(config.url(), Some(primary_url)).await {
            // It only writes (the slot streams from the standby): no REPLICATION needed.
            Ok(writer) => setup::check_rights(&writer, false).await?,
            Err(e) if e.downcast_ref::<Fatal>().is_some() => return Err(e),
            // The primary down (a failover under way): the slot streams from the standby, and
            // dead letters wait for a primary.
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot reach postgres.primary_url; streaming from the standby meanwhile");
            }
        }
    }
    if config.postgres.setup {
        tokio::select! {
            made = setup::ensure_slot(&client, &settings, SlotSetup::Keep) => made?,
            () = setup::report_blockers(config.primary_url().unwrap_or(config.url())) => unreachable!("reports until dropped"),
            () = shutdown.cancelled() => return Ok(()),
        }
    }
    // The slot's own row-filtered publication, once it holds for the slot.
    let streamed = match claims::load_for(config.url(), config.primary_url()).await {
        Ok(claims) => {
            Streamed::choose(&client, &settings.slot, &settings.publication, &claims).await
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot read the queue claims yet: streaming the shared publication");
            Streamed::shared(&settings.publication)
        }
    };
    settings.publication = streamed.publication.clone();
    drop(client);
    let mut router = Router::new(&config);
    tokio::spawn(watch_slot(
        settings.clone(),
        config.postgres.slot.clone(),
        shutdown.clone(),
    ));
    let (publication_problems, mut publication_changed) = tokio::sync::mpsc::channel(1);
    tokio::spawn(watch_publication(
        config.url().to_owned(),
        streamed,
        publication_problems,
        shutdown.clone(),
    ));
    let mut delivery = Delivery::new(&sinks, config.delivery.clone());
    let mut dead_letters = DeadLetters::new(
        config.url(),
        config.primary_url(),
        health.clone(),
        shutdown.clone(),
    );
    tracing::info!(
        slot = settings.slot, publication = settings.publication,
        sinks = ?sinks.names(), max_in_flight = config.delivery.max_in_flight,
        "outbox-worker starting"
    );

    // Failed connections and short-lived streams since the last healthy stream.
    let mut reconnects = 0u32;
    let mut waiting_for_slot = false;
    let mut closed = false;
    let result = loop {
        // None = the slot's confirmed position; after a lost connection, what this run confirmed.
        let start = delivery.confirmed();
        let mut source = tokio::select! {
            connected = ReplicationSource::connect(&settings, start) => match connected {
                Ok(source) => source,
                Err(e) => {
                    let delay = match triage::of_stream(&e) {
                        // A standby polls a held slot every second, so it takes over quickly.
                        Remedy::WaitForSlot => {
                            if !waiting_for_slot {
                                tracing::info!(slot = settings.slot, "slot is active in another process; waiting for it");
                                waiting_for_slot = true;
                            }
                            Duration::from_secs(1)
                        }
                        Remedy::Reconnect => {
                            reconnects += 1;
                            tracing::warn!(error = %e, "cannot start replication; retrying");
                            reconnect_delay(reconnects)
                        }
                        Remedy::SlotGone(what) => break Err(slot_gone(&settings, &what).await),
                        Remedy::Stop(fatal) => break Err(fatal.into()),
                    };
                    if wait_or_shutdown(delay, &shutdown).await {
                        break Ok(());
                    }
                    continue;
                }
            },
            _ = shutdown.cancelled() => break Ok(()),
        };
        waiting_for_slot = false;
        // Only the run that holds the slot may fence the earlier writers of its stream (a
        // standby waiting for the slot must not stop the worker it stands by for).
        if resume(&sinks, &stream_id, &shutdown).await? {
            break Ok(());
        }
        dead_letters.load_earlier().await;
        // Read once the slot is ours: a setup that moves queues waits for this read, or sees the
        // slot active and refuses.
        let claims = match claims::load_for(config.url(), config.primary_url()).await {
            Ok(claims) => claims,
            Err(e) => {
                break Err(
                    triage::of_sql(&e, "outbox_relay (to read outbox.queue_claims)")
                        .map_or(e, Into::into),
                )
            }
        };
        let claimed = claims.current(&settings.slot);
        if claimed.map_or(&[][..], |c| &c.queues[..]) != settings.queues {
            break Err(Fatal::new(
                format!(
                    "postgres.queues = {:?}, but slot {:?} claims {:?} in outbox.queue_claims",
                    settings.queues,
                    settings.slot,
                    claimed.map(|c| &c.queues)
                ),
                "run outbox-worker setup with these postgres.queues (postgres.setup = true does \
                 it at start): it records the change at the current position",
            )
            .into());
        }
        let others = claims.catch_alls_besides(&settings.slot);
        if !claims.is_empty() && settings.queues.is_empty() && !others.is_empty() {
            break Err(Fatal::new(
                format!(
                    "slot {:?} and {others:?} each take every queue no set claims: both would \
                     deliver those",
                    settings.slot
                ),
                "queue sets need exactly one catch-all slot: give this worker postgres.queues \
                 (and run setup), or retire the other (pg_drop_replication_slot and its row of \
                 outbox.slots)",
            )
            .into());
        }
        if let Some(mine) = claimed.filter(|c| !c.queues.is_empty()) {
            tracing::info!(slot = settings.slot, queues = ?mine.queues, from = %mine.from,
                "delivering the queues this slot claims (outbox.queue_claims)");
        }
        let connected_at = tokio::time::Instant::now();
        health.set_streaming(true);
        match start {
            Some(lsn) => tracing::info!(slot = settings.slot, start = %lsn, "streaming"),
            None => tracing::info!(
                slot = settings.slot,
                "streaming from the slot's confirmed position"
            ),
        }
        let mut ownership = claims::Ownership::new(claims, &settings.slot);
        let mut parts = Parts {
            router: &mut router,
            delivery: &mut delivery,
            dead_letters: &mut dead_letters,
            ownership: &mut ownership,
        };
        let stopped = stream(
            &mut source,
            &mut parts,
            &config,
            &mut publication_changed,
            &shutdown,
        )
        .await;
        health.set_streaming(false);
        match stopped {
            Ok(Stop::Requested) => {
                if let Some(lsn) = delivery.confirmed() {
                    source.confirm(lsn);
                }
                within_stop_grace(async { tokio::join!(source.close(), delivery.close()) }).await;
                closed = true;
                break Ok(());
            }
            Ok(Stop::Lost(e)) => {
                tracing::warn!(error = %e, "replication connection lost; reconnecting");
                if let Err(e) = settle(&mut parts, &shutdown).await {
                    break Err(e);
                }
                delivery.reset_stream();
                if connected_at.elapsed() >= HEALTHY_STREAM {
                    reconnects = 0;
                }
                reconnects += 1;
                if wait_or_shutdown(reconnect_delay(reconnects), &shutdown).await {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    if !closed {
        within_stop_grace(delivery.close()).await;
    }
    match delivery.confirmed() {
        Some(lsn) => tracing::info!(confirmed = %lsn, "outbox-worker stopped"),
        None => tracing::info!("outbox-worker stopped"),
    }
    result
}

/// Resumes every sink for a stream that starts, all at once (one exactly-once sink's reading of
/// the progress topic may wait for another's fencing to end what it left open): `true` when
/// shutdown came first.
async fn resume(sinks: &Sinks, stream: &StreamId, shutdown: &CancellationToken) -> Result<bool> {
    let all =
        futures::future::try_join_all(sinks.iter().map(|(_, named)| named.sink.resume(stream)));
    tokio::select! {
        resumed = all => resumed.map(|_| false).map_err(Into::into),
        () = shutdown.cancelled() => Ok(true),
    }
}

/// The stream's identity: PostgreSQL's system identifier (kept by a physical standby that takes
/// over, new after a restore or `pg_upgrade`), the database and the slot.
async fn stream_id(client: &tokio_postgres::Client, slot: &str) -> Result<StreamId> {
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_database()::text
               FROM pg_catalog.pg_control_system()",
            &[],
        )
        .await
        .context("cannot read the PostgreSQL system identifier")?;
    Ok(StreamId {
        system: row.get(0),
        database: row.get(1),
        slot: slot.to_owned(),
    })
}

/// The first SQL connection: waits (with backoff) for a server that is down or starting, stops
/// at once on what waiting cannot fix (wrong password, missing database). `None`: shutdown.
async fn connect_at_start(
    url: &str,
    shutdown: &CancellationToken,
) -> Result<Option<tokio_postgres::Client>> {
    let mut attempt = 0;
    loop {
        match pg::connect(url).await {
            Ok(client) => return Ok(Some(client)),
            Err(e) => {
                if let Some(fatal) = triage::of_sql(&e, triage::WORKER_RIGHT) {
                    return Err(fatal.into());
                }
                attempt += 1;
                tracing::warn!(error = %format!("{e:#}"), "cannot connect to PostgreSQL; retrying");
                if wait_or_shutdown(reconnect_delay(attempt), shutdown).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// The error that stops the worker when its slot is missing or invalidated.
async fn slot_gone(settings: &SlotSettings, what: &str) -> anyhow::Error {
    let what = format!("is gone ({what})");
    match pg::connect(&settings.url).await {
        Ok(client) => setup::slot_gone(&client, &settings.slot, &what)
            .await
            .into(),
        Err(_) => anyhow!(
            "replication slot {:?} {what}: messages committed since its last confirmed position \
             may not have been delivered; run `outbox-worker setup --new-slot` (README, \"A lost \
             slot\")",
            settings.slot
        ),
    }
}

async fn stream(
    source: &mut ReplicationSource,
    parts: &mut Parts<'_>,
    config: &Config,
    publication_changed: &mut tokio::sync::mpsc::Receiver<Fatal>,
    shutdown: &CancellationToken,
) -> Result<Stop> {
    let mut tx = None;
    // A stop that came inside a transaction: read on to its commit first, so that what was sent
    // of it can be confirmed (else the next run sends all of it again), until this deadline.
    let mut stopping: Option<tokio::time::Instant> = None;
    let stop_by = |stopping: Option<tokio::time::Instant>| {
        stopping.map_or(config.delivery.shutdown_timeout, |deadline| {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        })
    };
    loop {
        let accepting = parts.delivery.can_accept();
        tokio::select! {
            biased;
            _ = shutdown.cancelled(), if stopping.is_none() => {
                if tx.is_none() {
                    drain(parts, config.delivery.shutdown_timeout).await?;
                    return Ok(Stop::Requested);
                }
                tracing::info!("stopping: reading to the end of the transaction under way first");
                stopping = Some(tokio::time::Instant::now() + config.delivery.shutdown_timeout);
            }
            () = tokio::time::sleep_until(stopping.unwrap_or_else(tokio::time::Instant::now)), if stopping.is_some() => {
                tracing::warn!("the end of the transaction under way did not come within shutdown_timeout; what was sent of it is delivered again by the next run");
                return Ok(Stop::Requested);
            }
            Some(fatal) = publication_changed.recv() => return Err(fatal.into()),
            settled = parts.delivery.progress() => {
                if shutdown_requested(parts.settle_one(settled).await)? {
                    return Ok(Stop::Requested);
                }
                if let Some(lsn) = parts.delivery.confirmed() {
                    source.confirm(lsn);
                }
            }
            event = source.next(), if accepting => match event {
                Ok(SourceEvent::Begin) => tx = Some(parts.delivery.begin()),
                Ok(SourceEvent::Message(message)) => {
                    let tx = tx.context("a message outside a transaction")?;
                    let mut routed = parts.route(tx, message).await;
                    while let Ok(Routed::AfterMove { message, before, at }) = routed {
                        if after_move(source, parts, config, &before, at, shutdown).await? {
                            return Ok(Stop::Requested);
                        }
                        parts.ownership.moved(before, at);
                        routed = parts.route(tx, *message).await;
                    }
                    if shutdown_requested(routed)? {
                        return Ok(Stop::Requested);
                    }
                }
                Ok(SourceEvent::Quarantine(q)) => {
                    tx.context("a message outside a transaction")?;
                    // Written before the stream goes on, so the slot never passes it first.
                    tracing::error!(claimed_id = ?q.id, commit_lsn = %q.commit_lsn, reason = %q.reason,
                        "quarantining a message not written by outbox.publish: not delivered, kept in outbox.dead_letters");
                    metrics::counter!(telemetry::QUARANTINED).increment(1);
                    if shutdown_requested(parts.dead_letters.quarantine(&q).await)? {
                        return Ok(Stop::Requested);
                    }
                }
                Ok(SourceEvent::Commit { end_lsn }) => {
                    let open = tx.take().context("a commit without a begin")?;
                    parts.delivery.commit(open, end_lsn);
                    if let Some(lsn) = parts.delivery.confirmed() {
                        source.confirm(lsn);
                    }
                    if stopping.is_some() {
                        drain(parts, stop_by(stopping)).await?;
                        return Ok(Stop::Requested);
                    }
                }
                Ok(SourceEvent::KeepAlive { wal_end }) => {
                    // Nothing of ours is pending: the server's WAL end is safe to confirm, so an
                    // idle outbox never holds back WAL that other tables write.
                    if parts.delivery.is_idle() && parts.delivery.confirmed().is_none_or(|c| wal_end > c) {
                        source.confirm(wal_end);
                    }
                }
                Err(e) => return match triage::of_stream(&e) {
                    Remedy::Reconnect | Remedy::WaitForSlot => Ok(Stop::Lost(e)),
                    Remedy::SlotGone(what) => Err(anyhow!("replication slot is gone: {what}")),
                    Remedy::Stop(fatal) => Err(fatal.into()),
                },
            },
        }
    }
}

/// Before delivering queues that moved to this slot at `at` from slot `before`: settles every
/// earlier transaction and confirms `at` (so that `before`, should it wait for this slot in
/// turn, is never held: a move both ways at once), then waits until `before` confirmed past
/// `at`, so that each key's messages keep their commit order across the move. `true` when
/// shutdown came first.
async fn after_move(
    source: &ReplicationSource,
    parts: &mut Parts<'_>,
    config: &Config,
    before: &str,
    at: Lsn,
    shutdown: &CancellationToken,
) -> Result<bool> {
    while !parts.delivery.earlier_transactions_settled() {
        tokio::select! {
            settled = parts.delivery.progress() => {
                if shutdown_requested(parts.settle_one(settled).await)? {
                    return Ok(true);
                }
                if let Some(lsn) = parts.delivery.confirmed() {
                    source.confirm(lsn);
                }
            }
            () = shutdown.cancelled() => return Ok(true),
        }
    }
    source.confirm(at);
    let started = tokio::time::Instant::now();
    let mut told: Option<tokio::time::Instant> = None;
    let mut previous = PreviousSlot::new(before, at);
    loop {
        match previous.passed(config).await {
            Ok(Passed::Yes) => break,
            Ok(Passed::Gone) => {
                tracing::warn!(slot = before, "the slot that delivered queues moved to this one is gone (no slot and no row in outbox.slots); what it had not delivered is not waited for");
                break;
            }
            Ok(Passed::No) => {}
            Err(e) => {
                previous = PreviousSlot::new(before, at);
                tracing::warn!(error = %format!("{e:#}"), slot = before, "cannot read the slot's confirmed position; retrying");
            }
        }
        if told.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            tracing::info!(previous = before, position = %at, seen_by = previous.seen_by(),
                "queues moved to this slot: waiting for the slot that delivered them to confirm past the move (its worker must run), so that their messages keep their order");
            told = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            settled = parts.delivery.progress() => {
                if shutdown_requested(parts.settle_one(settled).await)? {
                    return Ok(true);
                }
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = shutdown.cancelled() => return Ok(true),
        }
    }
    tracing::info!(previous = before, took = ?started.elapsed(),
        "the slot that delivered queues moved here confirmed past the move");
    Ok(false)
}

/// How far the slot that had moved queues confirmed, seen from this worker: on this worker's
/// server; else on the primary (this worker decoding on a standby); else (a slot decoded on a
/// standby this worker cannot see) from its record in `outbox.slots` on the primary, whose mark
/// moves on only once the slot confirmed past it (at most every 30 s, `record_slot`). One
/// connection to this worker's server, and one to the primary when that is another, for every
/// poll.
struct PreviousSlot<'a> {
    slot: &'a str,
    at: Lsn,
    own: Option<tokio_postgres::Client>,
    /// `postgres.primary_url`'s server, while this worker decodes on a standby.
    primary: Option<tokio_postgres::Client>,
    /// The last mark seen in `outbox.slots` (its time), and whether it is at or after the move.
    mark: Option<(String, bool)>,
}

enum Passed {
    Yes,
    No,
    /// Neither the slot nor its row in `outbox.slots` is there.
    Gone,
}

impl<'a> PreviousSlot<'a> {
    fn new(slot: &'a str, at: Lsn) -> PreviousSlot<'a> {
        PreviousSlot {
            slot,
            at,
            own: None,
            primary: None,
            mark: None,
        }
    }

    fn seen_by(&self) -> &'static str {
        match self.mark {
            Some(_) => "its record in outbox.slots (a slot on another server), at most every 30 s",
            None => "its slot",
        }
    }

    async fn passed(&mut self, config: &Config) -> Result<Passed> {
        let past = |confirmed: Lsn| match confirmed >= self.at {
            true => Passed::Yes,
            false => Passed::No,
        };
        if self.own.is_none() {
            self.own = Some(pg::connect(config.url()).await?);
        }
        let own = self.own.as_ref().expect("connected");
        if let Some(confirmed) = claims::confirmed_position(own, self.slot).await? {
            return Ok(past(confirmed));
        }
        if config.primary_url().is_some() && self.primary.is_none() {
            self.primary = Some(pg::connect_writer(config.url(), config.primary_url()).await?);
        }
        let writer = match &self.primary {
            Some(primary) => {
                if let Some(confirmed) = claims::confirmed_position(primary, self.slot).await? {
                    return Ok(past(confirmed));
                }
                primary
            }
            None => own,
        };
        let Some(row) = writer
            .query_opt(
                "SELECT mark_at::text, mark_lsn >= $2::text::pg_lsn, delivered_before::text
                   FROM outbox.slots WHERE slot_name = $1",
                &[&self.slot, &self.at.to_string()],
            )
            .await?
        else {
            return Ok(Passed::Gone);
        };
        let (mark_at, at_or_after, delivered_before): (String, bool, String) =
            (row.get(0), row.get(1), row.get(2));
        // A mark confirmed past becomes delivered_before (`record_slot`); setup moves the mark
        // too, confirming nothing (a hostile review): only the first counts.
        let passed = self.mark.as_ref().is_some_and(|(seen_at, seen_after)| {
            *seen_after && *seen_at != mark_at && *seen_at == delivered_before
        });
        self.mark = Some((mark_at, at_or_after));
        Ok(match passed {
            true => Passed::Yes,
            false => Passed::No,
        })
    }
}

/// Waits for every in-flight message, retrying failures, unless shutdown comes first.
async fn settle(parts: &mut Parts<'_>, shutdown: &CancellationToken) -> Result<()> {
    while !parts.delivery.is_settled() {
        tokio::select! {
            settled = parts.delivery.progress() => {
                if shutdown_requested(parts.settle_one(settled).await)? {
                    return Ok(());
                }
            }
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    Ok(())
}

/// SIGTERM: wait for in-flight messages, at most `timeout`; what is left is redelivered later.
async fn drain(parts: &mut Parts<'_>, timeout: Duration) -> Result<()> {
    tracing::info!(
        in_flight = parts.delivery.in_flight(),
        "stopping: draining in-flight messages"
    );
    let drained = tokio::time::timeout(timeout, async {
        while !parts.delivery.is_settled() {
            let settled = parts.delivery.progress().await;
            if shutdown_requested(parts.settle_one(settled).await)? {
                break;
            }
        }
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                in_flight = parts.delivery.in_flight(),
                "drain timed out; unacknowledged messages will be delivered again by the next run"
            );
            Ok(())
        }
    }
}

/// Every second: the publication still streams exactly the inserts of `outbox.messages`. Its
/// owner can change it while the worker runs, and pgoutput then leaves out the table-form
/// messages committed meanwhile, for good (it decodes by the publication as it was at their place
/// in the WAL): the worker stops, saying how to send them again. A change undone within a second
/// can go unseen.
async fn watch_publication(
    url: String,
    publication: Streamed,
    problems: tokio::sync::mpsc::Sender<Fatal>,
    shutdown: CancellationToken,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    while !shutdown.is_cancelled() {
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            client = pg::connect(&url).await.ok();
        }
        if let Some(c) = &client {
            if let Err(fatal) = publication.check(c).await {
                if !c.is_closed() {
                    let _ = problems
                        .send(Fatal::new(
                            format!(
                                "{} since the worker started: table-form messages committed while \
                                 it is so are not streamed, and never will be",
                                fatal.problem
                            ),
                            format!(
                                "{}; then `outbox-worker replay --since <when it changed>` sends \
                                 them from outbox.messages",
                                fatal.hint
                            ),
                        ))
                        .await;
                    return;
                }
            }
        }
        wait_or_shutdown(Duration::from_secs(1), &shutdown).await;
    }
}

/// Every 5 s over ordinary connections: the slot's lag for `/metrics`, and in `outbox.slots` up
/// to when everything was delivered (what a lost slot's error reports). The slot is read where it
/// is (a standby's, maybe), the record written on the primary.
async fn watch_slot(settings: SlotSettings, slot: String, shutdown: CancellationToken) {
    let mut clients = None;
    while !shutdown.is_cancelled() {
        if clients.is_none() {
            clients = slot_and_primary(&settings).await.ok();
        }
        if let Some((reader, primary)) = &clients {
            match record_slot(reader, primary.as_ref().unwrap_or(reader), &slot).await {
                Ok(lag) => metrics::gauge!(telemetry::SLOT_LAG).set(lag.unwrap_or(0.0)),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the slot's position");
                    clients = None;
                }
            }
        }
        wait_or_shutdown(Duration::from_secs(5), &shutdown).await;
    }
}

/// A connection to the slot's server and, only with `postgres.primary_url`, one for writing.
async fn slot_and_primary(
    settings: &SlotSettings,
) -> Result<(tokio_postgres::Client, Option<tokio_postgres::Client>)> {
    let reader = pg::connect(&settings.url).await?;
    let primary = match settings.primary_url.as_deref() {
        Some(primary_url) => Some(pg::connect_writer(&settings.url, Some(primary_url)).await?),
        None => None,
    };
    Ok((reader, primary))
}

/// Once the slot confirmed past the last mark (the primary's WAL position at a known time), that
/// time becomes `delivered_before` and a new mark is taken. Returns the lag in bytes (on a
/// standby, behind what it replayed).
async fn record_slot(
    reader: &tokio_postgres::Client,
    writer: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<f64>> {
    let Some(row) = reader
        .query_opt(
            "SELECT s.confirmed_flush_lsn::text,
                    (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                          ELSE pg_current_wal_lsn() END - s.confirmed_flush_lsn)::float8,
                    pg_is_in_recovery()
               FROM pg_replication_slots s
              WHERE s.slot_name = $1 AND s.database = current_database()",
            &[&slot],
        )
        .await?
    else {
        return Ok(None);
    };
    let (confirmed, in_recovery): (Option<String>, bool) = (row.get(0), row.get(2));
    // Promoted: the slot's server is the primary now, whatever still answers at primary_url.
    let writer = if in_recovery { writer } else { reader };
    writer
        .execute(
            "UPDATE outbox.slots t
                SET delivered_before = t.mark_at, mark_lsn = pg_current_wal_lsn(), mark_at = now()
              WHERE t.slot_name = $1 AND $2::text::pg_lsn >= t.mark_lsn
                AND t.mark_at < now() - interval '30 seconds'",
            &[&slot, &confirmed],
        )
        .await?;
    Ok(row.get(1))
}

/// After the drain, a stop's last steps (confirming, closing connections) get this long: a
/// broker that is down or frozen must not hold the stop past `shutdown_timeout` plus a second.
/// What they did not finish is delivered again by the next run.
async fn within_stop_grace<T>(step: impl std::future::Future<Output = T>) {
    if tokio::time::timeout(Duration::from_millis(500), step)
        .await
        .is_err()
    {
        tracing::debug!("a closing step did not finish in time");
    }
}

fn reconnect_delay(attempt: u32) -> Duration {
    Duration::from_millis(250 * 2u64.pow(attempt.min(5))).min(Duration::from_secs(5))
}

/// True when shutdown was requested during the wait.
async fn wait_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = shutdown.cancelled() => true,
    }
}
