//! `outbox-worker run`: source → router → sinks → delivery → confirm, with reconnects and a
//! graceful stop.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dead_letters::DeadLetters;
use crate::delivery::{Delivery, Undeliverable};
use crate::http::{self, Health};
use crate::message::Lsn;
use crate::router::Router;
use crate::sink;
use crate::source::{setup, ReplicationSource, SlotSettings, SourceError, SourceEvent};

/// Why a stream ended.
enum Stop {
    /// Shutdown was requested and in-flight messages have drained (or the drain timed out).
    Requested,
    /// The replication connection was lost or refused: reconnect.
    Lost(SourceError),
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    if config.postgres.setup {
        let client = setup::connect(config.url()).await?;
        setup::ensure_slot(&client, &config.postgres.slot, &config.postgres.publication).await?;
    }
    let mut router = Router::new(&config);
    let sinks = sink::build_all(&config)?;
    let health = Health::new(sinks.clone());
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
    let mut delivery = Delivery::new(sinks, router.sink_names().to_vec(), config.delivery.clone());
    let mut dead_letters = DeadLetters::new(config.url());
    let settings = SlotSettings {
        url: config.url().to_owned(),
        slot: config.postgres.slot.clone(),
        publication: config.postgres.publication.clone(),
        status_interval: config.postgres.status_interval,
    };
    tracing::info!(
        slot = settings.slot, publication = settings.publication,
        sinks = ?router.sink_names(), max_in_flight = config.delivery.max_in_flight,
        "outbox-worker starting"
    );

    let mut reconnects = 0u32;
    let result = loop {
        // 0 = the slot's confirmed position; after a lost connection, what this run has confirmed.
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
        tracing::info!(slot = settings.slot, start = %format_lsn(start), "streaming");
        let mut parts = Parts {
            router: &mut router,
            delivery: &mut delivery,
            dead_letters: &mut dead_letters,
        };
        let stopped = stream(&mut source, &mut parts, &config, &shutdown).await;
        health.set_streaming(false);
        match stopped {
            Ok(Stop::Requested) => {
                source.confirm(delivery.confirmed());
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
    tracing::info!(confirmed = %format_lsn(delivery.confirmed()), "outbox-worker stopped");
    result
}

/// What a stream works with, borrowed for its lifetime.
struct Parts<'a> {
    router: &'a mut Router,
    delivery: &'a mut Delivery,
    dead_letters: &'a mut DeadLetters,
}

impl Parts<'_> {
    /// Waits for the next acknowledgement; a message refused for good goes to the dead letters.
    async fn progress(&mut self) {
        if let Some(u) = self.delivery.progress().await {
            dead_letter(self.dead_letters, &u).await;
            self.delivery.dead_lettered(&u);
        }
    }
}

async fn dead_letter(dead_letters: &mut DeadLetters, u: &Undeliverable) {
    let destination = format!("{}:{}", u.sink, u.destination);
    tracing::error!(
        id = %u.message.id, queue = %u.message.queue, destination, attempts = u.attempts,
        error = %u.error, "dead-lettering a message the broker refused"
    );
    dead_letters
        .write(&u.message, &destination, &u.error.to_string(), u.attempts)
        .await;
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
            _ = parts.progress() => {
                if let Some(lsn) = confirmable(parts.delivery) {
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
                            metrics::counter!("outbox_messages_dead_lettered_total", "sink" => "", "queue" => message.queue.clone()).increment(1);
                            parts.dead_letters.write(&message, "(no route)", &error, 1).await;
                        }
                    }
                }
                Ok(SourceEvent::Quarantine(q)) => {
                    tx.context("a message outside a transaction")?;
                    // Written before the stream goes on, so the slot never passes it first.
                    tracing::error!(claimed_id = ?q.id, commit_lsn = %format_lsn(q.commit_lsn), reason = %q.reason,
                        "quarantining a message not written by outbox.publish: not delivered, kept in outbox.dead_letters");
                    metrics::counter!("outbox_messages_quarantined_total").increment(1);
                    parts.dead_letters.quarantine(&q).await;
                }
                Ok(SourceEvent::Commit { end_lsn }) => {
                    let open = tx.take().context("a commit without a begin")?;
                    parts.delivery.commit(open, end_lsn);
                    if let Some(lsn) = confirmable(parts.delivery) {
                        source.confirm(lsn);
                    }
                }
                Ok(SourceEvent::KeepAlive { wal_end }) => {
                    // Nothing of ours is pending: the server's WAL end is safe to confirm, so an
                    // idle outbox never holds back WAL that other tables write.
                    if parts.delivery.is_idle() && wal_end > parts.delivery.confirmed() {
                        source.confirm(wal_end);
                    }
                }
                Err(e) if e.is_retryable() => return Ok(Stop::Lost(e)),
                Err(e) => return Err(anyhow!(e)),
            },
        }
    }
}

/// The confirmed position, when it moved.
fn confirmable(delivery: &Delivery) -> Option<Lsn> {
    Some(delivery.confirmed()).filter(|&lsn| lsn > 0)
}

/// Waits for every in-flight message, retrying failures, unless shutdown comes first.
async fn settle(parts: &mut Parts<'_>, shutdown: &CancellationToken) {
    while !parts.delivery.is_settled() {
        tokio::select! {
            _ = parts.progress() => {}
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
            parts.progress().await;
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
            client = setup::connect(&url).await.ok();
        }
        if let Some(c) = &client {
            let lag = c
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await;
            match lag {
                Ok(Some(row)) => metrics::gauge!("outbox_slot_lag_bytes")
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

pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}
