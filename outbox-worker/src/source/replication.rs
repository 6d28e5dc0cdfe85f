//! The replication connection: streams the slot with pgoutput (proto_version 1, messages on,
//! streaming off) and yields outbox messages between transaction boundaries.

use std::collections::HashMap;
use std::time::Duration;

use pgwire_replication::{
    Lsn as WireLsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use thiserror::Error;
use tokio_postgres::config::{Host, SslMode};

use super::decode::{
    check_publish_rules, decode_envelope, EnvelopeError, TableLayout, MESSAGE_PREFIX,
};
use super::pgoutput::{self, Change};
use crate::config::{Config, FailoverSlot};
use crate::lsn::Lsn;
use crate::message::{Message, Quarantined, QUARANTINE_KEEP};
use crate::pg::ServerError;
use std::fmt::Write as _;

#[derive(Debug, Error)]
pub enum SourceError {
    /// The connection failed or ended: reconnect and resume from the slot.
    #[error("replication connection: {0}")]
    Connection(#[from] PgWireError),
    /// The stream carries something this worker cannot read: stopping is the only safe move.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Protocol(#[from] pgoutput::ProtocolError),
    /// The server answered an ordinary connection with an error (finding the primary).
    #[error("{0}")]
    Server(ServerError),
}

#[derive(Debug, PartialEq)]
pub enum SourceEvent {
    Begin,
    Message(Message),
    /// Something in the outbox's place that is not a valid outbox message (not written by
    /// `outbox.publish*`): never delivered, never a reason to stop.
    Quarantine(Quarantined),
    Commit {
        end_lsn: Lsn,
    },
    /// The server's WAL end: every outbox transaction that committed before it has been received.
    KeepAlive {
        wal_end: Lsn,
    },
}

/// Events read from the slot ahead of delivery (the replication library's default is 8,192,
/// which for 1 MB messages is 8 GB); delivery.max_in_flight_bytes bounds what is behind them.
pub const READ_AHEAD_EVENTS: usize = 32;

#[derive(Clone)]
pub struct SlotSettings {
    pub url: String,
    pub slot: String,
    pub publication: String,
    pub status_interval: Duration,
    pub failover: FailoverSlot,
    /// Wal-form messages are trusted only where the extension keeps them to `outbox.publish*`.
    pub wal_form: bool,
    /// Where to write while `url` is a standby (`postgres.primary_url`).
    pub primary_url: Option<String>,
    /// `postgres.queues`.
    pub queues: Vec<String>,
    /// `setup --stopped-elsewhere`: slots on servers setup cannot see whose workers are stopped.
    pub stopped_elsewhere: Vec<String>,
}

impl SlotSettings {
    pub fn of(config: &Config) -> SlotSettings {
        SlotSettings {
            url: config.url().to_owned(),
            slot: config.postgres.slot.clone(),
            publication: config.postgres.publication.clone(),
            status_interval: config.postgres.status_interval,
            failover: config.postgres.failover_slot,
            wal_form: true,
            primary_url: config.primary_url().map(str::to_owned),
            queues: config.postgres.queues.clone(),
            stopped_elsewhere: Vec::new(),
        }
    }
}

/// `ALTER_REPLICATION_SLOT … (FAILOVER true)` (PostgreSQL 17+) is a replication command: it runs
/// on a replication connection that never starts streaming.
pub async fn make_failover_slot(settings: &SlotSettings) -> Result<(), SourceError> {
    let config = replication_config(settings, primary(settings).await?)
        .map_err(|e| SourceError::Connection(PgWireError::Internal(e)))?;
    let mut client = ReplicationClient::connect_gated(config).await?;
    client
        .simple_query(&format!(
            "ALTER_REPLICATION_SLOT \"{}\" ( FAILOVER true )",
            settings.slot.replace('"', "\"\"")
        ))
        .await?;
    Ok(())
}

pub struct ReplicationSource {
    client: ReplicationClient,
    /// Relation id → layout, or `None` for tables other than `outbox.messages`.
    layouts: HashMap<u32, Option<TableLayout>>,
    /// The commit LSN and time of the transaction being read.
    commit_lsn: Lsn,
    committed_at: chrono::DateTime<chrono::Utc>,
    /// Outbox messages seen so far in the transaction being read: a quarantine's place in it.
    seen_in_tx: u32,
    status_interval: Duration,
    wal_form: bool,
}

impl ReplicationSource {
    /// Starts streaming. `None` resumes from the slot's confirmed position; an LSN (a commit end
    /// this worker saw fully acknowledged) skips what came before it.
    pub async fn connect(settings: &SlotSettings, start: Option<Lsn>) -> Result<Self, SourceError> {
        // 0 asks the server for the slot's confirmed position.
        let start = start.map_or(0, |lsn| lsn.0);
        let config = replication_config(settings, primary(settings).await?)
            .map_err(|e| SourceError::Connection(PgWireError::Internal(e)))?
            .with_start_lsn(WireLsn(start));
        let mut client = ReplicationClient::connect(config).await?;
        // connect returns before START_REPLICATION ran: a busy slot must surface here.
        client.wait_started().await?;
        Ok(ReplicationSource {
            client,
            layouts: HashMap::new(),
            commit_lsn: Lsn(0),
            committed_at: chrono::Utc::now(),
            seen_in_tx: 0,
            status_interval: settings.status_interval,
            wal_form: settings.wal_form,
        })
    }

    pub async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        loop {
            let event = self.client.recv().await?.ok_or_else(|| {
                PgWireError::Io(std::sync::Arc::new(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server ended the replication stream",
                )))
            })?;
            match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    commit_time_micros,
                    ..
                } => {
                    self.commit_lsn = Lsn(final_lsn.0);
                    self.seen_in_tx = 0;
                    self.committed_at = postgres_time(commit_time_micros);
                    return Ok(SourceEvent::Begin);
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    return Ok(SourceEvent::Commit {
                        end_lsn: Lsn(end_lsn.0),
                    })
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    return Ok(SourceEvent::KeepAlive {
                        wal_end: Lsn(wal_end.0),
                    })
                }
                ReplicationEvent::Message {
                    transactional: true,
                    prefix,
                    content,
                    ..
                } if prefix == MESSAGE_PREFIX => {
                    let decoded = if self.wal_form {
                        decode_envelope(&content, self.commit_lsn)
                    } else {
                        Err(EnvelopeError::untrusted_wal_form())
                    };
                    if let Err(e) = decoded {
                        if e.is_newer_version() {
                            return Err(e.into());
                        }
                        return Ok(self.checked(Err(e), || kept(&content)));
                    }
                    return Ok(self.checked(decoded, || kept(&content)));
                }
                ReplicationEvent::XLogData { data, .. } => {
                    if let Some((decoded, values)) = self.decode_change(&data)? {
                        // The raw values are formatted only for a quarantine, and only so far.
                        return Ok(self.checked(decoded, || {
                            let mut text = Capped::default();
                            let _ = write!(text, "{values:?}");
                            (text.kept.into_bytes(), text.len)
                        }));
                    }
                }
                // Other prefixes, non-transactional messages (never written by pg_outbox: they
                // would survive a rollback) and stop markers are not outbox messages.
                _ => {}
            }
        }
    }

    /// A decoded message that keeps the publish rules, or its quarantine. `raw` gives the start
    /// of the raw content and its whole length.
    fn checked(
        &mut self,
        decoded: Result<Message, EnvelopeError>,
        raw: impl FnOnce() -> (Vec<u8>, usize),
    ) -> SourceEvent {
        self.seen_in_tx += 1;
        match decoded.and_then(|m| check_publish_rules(&m).map(|()| m)) {
            Ok(mut message) => {
                message.committed_at = self.committed_at;
                message.index = self.seen_in_tx;
                SourceEvent::Message(message)
            }
            Err(e) => {
                let (raw, len) = raw();
                let mut reason = e.to_string();
                if len > raw.len() {
                    reason.push_str(&format!(
                        " (content of {len} bytes; its first {} kept)",
                        raw.len()
                    ));
                }
                SourceEvent::Quarantine(Quarantined {
                    id: e.claimed_id(),
                    raw,
                    reason,
                    commit_lsn: self.commit_lsn,
                    position: self.seen_in_tx,
                })
            }
        }
    }

    /// An insert into `outbox.messages`: its decoding and its values (for a quarantine).
    #[allow(clippy::type_complexity)]
    fn decode_change(
        &mut self,
        data: &[u8],
    ) -> Result<Option<(Result<Message, EnvelopeError>, Vec<pgoutput::Value>)>, SourceError> {
        match pgoutput::decode(data)? {
            Change::Relation(relation) => {
                self.layouts
                    .insert(relation.id, TableLayout::of(&relation)?);
                Ok(None)
            }
            Change::Insert { relation, values } => match self.layouts.get(&relation) {
                Some(Some(layout)) => Ok(Some((layout.decode(&values, self.commit_lsn), values))),
                Some(None) => Ok(None),
                None => Err(pgoutput::ProtocolError::unknown_relation(relation).into()),
            },
            Change::Other(_) => Ok(None),
        }
    }

    /// Everything before `lsn` is delivered: the slot may release it. Sent to the server within
    /// one status interval.
    pub fn confirm(&self, lsn: Lsn) {
        self.client.update_applied_lsn(WireLsn(lsn.0));
    }

    /// Ends the session after the last confirmation reached the server (`shutdown` itself sends
    /// no final status update, so wait one interval first).
    pub async fn close(mut self) {
        tokio::time::sleep(self.status_interval + Duration::from_millis(100)).await;
        if let Err(e) = self.client.shutdown().await {
            tracing::debug!(error = %e, "replication shutdown");
        }
    }
}

/// PostgreSQL timestamps count microseconds from 2000-01-01.
fn postgres_time(micros: i64) -> chrono::DateTime<chrono::Utc> {
    const UNIX_TO_POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;
    chrono::DateTime::from_timestamp_micros(micros + UNIX_TO_POSTGRES_EPOCH_MICROS)
        .unwrap_or_default()
}

/// Where to open the replication connection: the primary among `postgres.url`'s hosts. A server
/// error keeps its SQLSTATE (so a wrong password stops the worker); anything else is retried.
async fn primary(settings: &SlotSettings) -> Result<(Host, u16), SourceError> {
    crate::pg::primary_of(&settings.url)
        .await
        .map_err(|e| match crate::pg::db_error_in(&e) {
            Some(db) => SourceError::Server(ServerError::from_db(db)),
            None => SourceError::Connection(PgWireError::Io(std::sync::Arc::new(
                std::io::Error::other(format!("{e:#}")),
            ))),
        })
}

fn replication_config(
    settings: &SlotSettings,
    (host, port): (Host, u16),
) -> Result<ReplicationConfig, String> {
    let pg: tokio_postgres::Config = settings
        .url
        .parse()
        .map_err(|e| format!("postgres.url: {e}"))?;
    let user = pg.get_user().unwrap_or("postgres").to_owned();
    let password = pg
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = pg.get_dbname().unwrap_or(&user).to_owned();
    let config = match host {
        Host::Unix(dir) => ReplicationConfig::unix(
            dir.to_string_lossy(),
            port,
            user,
            password,
            database,
            &settings.slot,
            settings.publication.as_str(),
        ),
        Host::Tcp(host) => ReplicationConfig::new(
            host,
            user,
            password,
            database,
            &settings.slot,
            settings.publication.as_str(),
        )
        .with_port(port)
        // The same sslmode semantics as the SQL connection (pg/tls.rs).
        .with_tls(match pg.get_ssl_mode() {
            SslMode::Require => TlsConfig::require(),
            SslMode::Prefer => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::disabled()
            },
            _ => TlsConfig::disabled(),
        }),
    };
    Ok(config
        .with_buffer_size(READ_AHEAD_EVENTS)
        .with_status_interval(settings.status_interval)
        .with_wakeup_interval(settings.status_interval)
        .with_application_name("outbox-worker")
        // The row decoder reads timestamptz and bytea text in these formats.
        .with_options("-c datestyle=ISO -c timezone=UTC -c bytea_output=hex"))
}

/// The start of a message's content that a quarantine keeps, and its whole length.
fn kept(content: &[u8]) -> (Vec<u8>, usize) {
    (
        content[..content.len().min(QUARANTINE_KEEP)].to_vec(),
        content.len(),
    )
}

/// Text that keeps its first [`QUARANTINE_KEEP`] bytes (on a character boundary) and counts the
/// rest.
#[derive(Default)]
struct Capped {
    kept: String,
    len: usize,
}

impl std::fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.len += s.len();
        let room = QUARANTINE_KEEP.saturating_sub(self.kept.len());
        if room > 0 {
            self.kept.push_str(&s[..s.floor_char_boundary(room)]);
        }
        Ok(())
    }
}
