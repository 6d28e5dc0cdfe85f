//! `outbox-worker run`: source → router → sinks → delivery → confirm, with reconnects and a
//! graceful stop.

use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::{Delivery, Undeliverable};
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
    let mut delivery = Delivery::new(sinks, router.sink_names().to_vec(), config.delivery.clone());
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
                    if e.is_slot_busy() {
                        tracing::info!(slot = settings.slot, "slot is active in another process; waiting for it");
                    } else {
                        tracing::warn!(error = %e, "cannot start replication; retrying");
                    }
                    if wait_or_shutdown(reconnect_delay(reconnects), &shutdown).await {
                        break Ok(());
                    }
                    continue;
                }
                Err(e) => break Err(anyhow!(e).context("cannot start replication")),
            },
            _ = shutdown.cancelled() => break Ok(()),
        };
        reconnects = 0;
        tracing::info!(slot = settings.slot, start = %format_lsn(start), "streaming");
        match stream(&mut source, &mut router, &mut delivery, &config, &shutdown).await {
            Ok(Stop::Requested) => {
                source.confirm(delivery.confirmed());
                source.close().await;
                break Ok(());
            }
            Ok(Stop::Lost(e)) => {
                tracing::warn!(error = %e, "replication connection lost; reconnecting");
                settle(&mut delivery, &shutdown).await?;
                delivery.reset_stream();
            }
            Err(e) => break Err(e),
        }
    };
    delivery.close().await;
    tracing::info!(confirmed = %format_lsn(delivery.confirmed()), "outbox-worker stopped");
    result
}

async fn stream(
    source: &mut ReplicationSource,
    router: &mut Router,
    delivery: &mut Delivery,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Stop> {
    let mut tx = None;
    loop {
        let accepting = delivery.can_accept();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                drain(delivery, config.delivery.shutdown_timeout).await?;
                return Ok(Stop::Requested);
            }
            undeliverable = delivery.progress() => {
                if let Some(u) = undeliverable {
                    return Err(give_up(u));
                }
                if let Some(lsn) = confirmable(delivery) {
                    source.confirm(lsn);
                }
            }
            event = source.next(), if accepting => match event {
                Ok(SourceEvent::Begin) => tx = Some(delivery.begin()),
                Ok(SourceEvent::Message(message)) => {
                    let tx = tx.context("a message outside a transaction")?;
                    let route = router.route(&message.queue).ok_or_else(|| anyhow!(
                        "queue {:?} (message {}) matches no route: add a [[routes]] entry for it; \
                         the slot stays before this message, nothing is lost",
                        message.queue, message.id
                    ))?;
                    delivery.send(tx, route, message);
                }
                Ok(SourceEvent::Commit { end_lsn }) => {
                    let open = tx.take().context("a commit without a begin")?;
                    delivery.commit(open, end_lsn);
                    if let Some(lsn) = confirmable(delivery) {
                        source.confirm(lsn);
                    }
                }
                Ok(SourceEvent::KeepAlive { wal_end }) => {
                    // Nothing of ours is pending: the server's WAL end is safe to confirm, so an
                    // idle outbox never holds back WAL that other tables write.
                    if delivery.is_idle() && wal_end > delivery.confirmed() {
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

fn give_up(u: Undeliverable) -> anyhow::Error {
    anyhow!(
        "message {} of queue {:?} failed {} times on sink {:?} (destination {:?}): {}; stopping \
         without confirming it, so it is delivered when the cause is fixed",
        u.message.id,
        u.message.queue,
        u.attempts,
        u.sink,
        u.destination,
        u.error
    )
}

/// Waits for every in-flight message, retrying failures, unless shutdown comes first.
async fn settle(delivery: &mut Delivery, shutdown: &CancellationToken) -> Result<()> {
    while !delivery.is_settled() {
        tokio::select! {
            undeliverable = delivery.progress() => if let Some(u) = undeliverable {
                return Err(give_up(u));
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    Ok(())
}

/// SIGTERM: wait for in-flight messages, at most `timeout`; what is left is redelivered later.
async fn drain(delivery: &mut Delivery, timeout: Duration) -> Result<()> {
    tracing::info!(
        in_flight = delivery.in_flight(),
        "stopping: draining in-flight messages"
    );
    let drained = tokio::time::timeout(timeout, async {
        while !delivery.is_settled() {
            if let Some(u) = delivery.progress().await {
                return Err(give_up(u));
            }
        }
        Ok(())
    })
    .await;
    match drained {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                in_flight = delivery.in_flight(),
                "drain timed out; unacknowledged messages will be delivered again by the next run"
            );
            Ok(())
        }
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
