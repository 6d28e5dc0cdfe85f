//! `outbox-worker run`: source → router → sinks → delivery → confirm, with reconnects and a
//! graceful stop.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dead_letters::DeadLetters;
use crate::delivery::{self, Delivery, Undeliverable};
use crate::http::{self, Health};
use crate::pg;
use crate::router::Router;
use crate::sink::Sinks;
use crate::source::{setup, ReplicationSource, SlotSettings, SourceError, SourceEvent};
use crate::telemetry;

/// Why a stream ended.
enum Stop {
    /// Shutdown was requested and in-flight messages have drained (or the drain timed out).
    Requested,
    /// The replication connection was lost or refused: reconnect.
    Lost(SourceError),
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    if config.postgres.setup {
        let client = pg::connect(config.url()).await?;
        setup::ensure_slot(&client, &config.postgres.slot, &config.postgres.publication).await?;
    }
    let mut router = Router::new(&config);
    let sinks = Sinks::build(&config)?;
    let health = Health::new(sinks.iter().map(|(_, s)| s.sink.clone()).collect());
    if let Some(listen) = config.http.listen {
        let metrics = http::install_metrics()?;
        tokio::spawn(http::serve(
            listen,
            metrics,
            health.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(poll_slot_lag(
            config.url().to_owned(),
            config.postgres.slot.clone(),
            shutdown.clone(),
        ));
    }
    let mut delivery = Delivery::new(&sinks, config.delivery.clone());
    let mut dead_letters = DeadLetters::new(config.url());
    let settings = SlotSettings {
        url: config.url().to_owned(),
        slot: config.postgres.slot.clone(),
        publication: config.postgres.publication.clone(),
        status_interval: config.postgres.status_interval,
    };
    tracing::info!(
        slot = settings.slot, publication = settings.publication,
        sinks = ?sinks.names(), max_in_flight = config.delivery.max_in_flight,
        "outbox-worker starting"
    );

    let mut reconnects = 0u32;
    let result = loop {
        // None = the slot's confirmed position; after a lost connection, what this run confirmed.
        let start = delivery.confirmed();
        let mut source = tokio::select! {
            connected = ReplicationSource::connect(&settings, start) => match connected {
                Ok(source) => source,
                Err(e) if e.is_retryable() => {
                    reconnects += 1;
                    // A standby polls a held slot every second, so it takes over quickly.
                    let delay = if e.is_slot_busy() {
                        if reconnects == 1 {
                            tracing::info!(slot = settings.slot, "slot is active in another process; waiting for it");
                        }
                        Duration::from_secs(1)
                    } else {
                        tracing::warn!(error = %e, "cannot start replication; retrying");
                        reconnect_delay(reconnects)
                    };
                    if wait_or_shutdown(delay, &shutdown).await {
                        break Ok(());
                    }
                    continue;
                }
                Err(e) => break Err(anyhow!(e).context("cannot start replication")),
            },
            _ = shutdown.cancelled() => break Ok(()),
        };
        reconnects = 0;
        health.set_streaming(true);
        match start {
            Some(lsn) => tracing::info!(slot = settings.slot, start = %lsn, "streaming"),
            None => tracing::info!(
                slot = settings.slot,
                "streaming from the slot's confirmed position"
            ),
        }
        let mut parts = Parts {
            router: &mut router,
            delivery: &mut delivery,
            dead_letters: &mut dead_letters,
        };
        let stopped = stream(&mut source, &mut parts, &config, &shutdown).await;
        health.set_streaming(false);
        match stopped {
            Ok(Stop::Requested) => {
                if let Some(lsn) = delivery.confirmed() {
                    source.confirm(lsn);
                }
                source.close().await;
                break Ok(());
            }
            Ok(Stop::Lost(e)) => {
                tracing::warn!(error = %e, "replication connection lost; reconnecting");
                settle(&mut parts, &shutdown).await;
                delivery.reset_stream();
                if wait_or_shutdown(reconnect_delay(0), &shutdown).await {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    delivery.close().await;
    match delivery.confirmed() {
        Some(lsn) => tracing::info!(confirmed = %lsn, "outbox-worker stopped"),
        None => tracing::info!("outbox-worker stopped"),
    }
    result
}

/// What a stream works with, borrowed for its lifetime.
struct Parts<'a> {
    router: &'a mut Router,
    delivery: &'a mut Delivery,
    dead_letters: &'a mut DeadLetters,
}

impl Parts<'_> {
    /// Handles what [`Delivery::progress`] returned: a message refused for good goes to the dead
    /// letters. Called from a `select!` branch's body, never raced: once the write started it
    /// finishes, so a dead letter cannot be dropped half way.
    async fn settle_one(&mut self, undeliverable: Option<Undeliverable>) {
        let Some(u) = undeliverable else { return };
        let destination = format!("{}:{}", u.sink, u.destination);
        tracing::error!(
            id = %u.message.id, queue = %u.message.queue, destination, attempts = u.attempts,
            error = %u.error, "dead-lettering a message the broker refused"
        );
        self.dead_letters
            .write(&u.message, &destination, &u.error.to_string(), u.attempts)
            .await;
        self.delivery.dead_lettered(&u);
    }
}

async fn stream(
    source: &mut ReplicationSource,
    parts: &mut Parts<'_>,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Stop> {
    let mut tx = None;
    loop {
        let accepting = parts.delivery.can_accept();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                drain(parts, config.delivery.shutdown_timeout).await;
                return Ok(Stop::Requested);
            }
            settled = parts.delivery.progress() => {
                parts.settle_one(settled).await;
                if let Some(lsn) = parts.delivery.confirmed() {
                    source.confirm(lsn);
                }
            }
            event = source.next(), if accepting => match event {
                Ok(SourceEvent::Begin) => tx = Some(parts.delivery.begin()),
                Ok(SourceEvent::Message(message)) => {
                    let tx = tx.context("a message outside a transaction")?;
                    match parts.router.route(&message.queue) {
                        Some(route) => parts.delivery.send(tx, route, message),
                        None => {
                            // Written before the stream goes on, so the slot never passes it first.
                            let error = format!("no route matches queue {:?}", message.queue);
                            tracing::error!(id = %message.id, queue = %message.queue, "{error}; dead-lettering it");
                            delivery::count_dead_letter("", &message);
                            parts.dead_letters.write(&message, "(no route)", &error, 1).await;
                        }
                    }
                }
                Ok(SourceEvent::Quarantine(q)) => {
                    tx.context("a message outside a transaction")?;
                    // Written before the stream goes on, so the slot never passes it first.
                    tracing::error!(claimed_id = ?q.id, commit_lsn = %q.commit_lsn, reason = %q.reason,
                        "quarantining a message not written by outbox.publish: not delivered, kept in outbox.dead_letters");
                    metrics::counter!(telemetry::QUARANTINED).increment(1);
                    parts.dead_letters.quarantine(&q).await;
                }
                Ok(SourceEvent::Commit { end_lsn }) => {
                    let open = tx.take().context("a commit without a begin")?;
                    parts.delivery.commit(open, end_lsn);
                    if let Some(lsn) = parts.delivery.confirmed() {
                        source.confirm(lsn);
                    }
                }
                Ok(SourceEvent::KeepAlive { wal_end }) => {
                    // Nothing of ours is pending: the server's WAL end is safe to confirm, so an
                    // idle outbox never holds back WAL that other tables write.
                    if parts.delivery.is_idle() && parts.delivery.confirmed().is_none_or(|c| wal_end > c) {
                        source.confirm(wal_end);
                    }
                }
                Err(e) if e.is_retryable() => return Ok(Stop::Lost(e)),
                Err(e) => return Err(anyhow!(e)),
            },
        }
    }
}

/// Waits for every in-flight message, retrying failures, unless shutdown comes first.
async fn settle(parts: &mut Parts<'_>, shutdown: &CancellationToken) {
    while !parts.delivery.is_settled() {
        tokio::select! {
            settled = parts.delivery.progress() => parts.settle_one(settled).await,
            _ = shutdown.cancelled() => return,
        }
    }
}

/// SIGTERM: wait for in-flight messages, at most `timeout`; what is left is redelivered later.
async fn drain(parts: &mut Parts<'_>, timeout: Duration) {
    tracing::info!(
        in_flight = parts.delivery.in_flight(),
        "stopping: draining in-flight messages"
    );
    let drained = tokio::time::timeout(timeout, async {
        while !parts.delivery.is_settled() {
            let settled = parts.delivery.progress().await;
            parts.settle_one(settled).await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            in_flight = parts.delivery.in_flight(),
            "drain timed out; unacknowledged messages will be delivered again by the next run"
        );
    }
}

/// The slot's lag for `/metrics`, every 5 s, over an ordinary connection.
async fn poll_slot_lag(url: String, slot: String, shutdown: CancellationToken) {
    let mut client = None;
    while !shutdown.is_cancelled() {
        if client.is_none() {
            client = pg::connect(&url).await.ok();
        }
        if let Some(c) = &client {
            let lag = c
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await;
            match lag {
                Ok(Some(row)) => metrics::gauge!(telemetry::SLOT_LAG)
                    .set(row.get::<_, Option<f64>>(0).unwrap_or(0.0)),
                Ok(None) => {}
                Err(_) => client = None,
            }
        }
        wait_or_shutdown(Duration::from_secs(5), &shutdown).await;
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
