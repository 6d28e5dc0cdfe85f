//! Ordinary (non-replication) SQL connections: setup, dead letters, the lag poller and the
//! operator commands all connect here.

mod tls;

use anyhow::{Context, Result};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};

use crate::fatal::{self, Fatal};
use crate::secret::redact_url;

/// An ordinary (non-replication) connection, TLS as `sslmode` says; its driver task ends with
/// the client.
pub async fn connect(url: &str) -> Result<Client> {
    let config: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("postgres.url {}", redact_url(url)))?;
    let context = || format!("cannot connect to PostgreSQL at {}", redact_url(url));
    let client = if config.get_ssl_mode() == SslMode::Disable {
        let (client, connection) = config.connect(NoTls).await.with_context(context)?;
        tokio::spawn(drive(connection));
        client
    } else {
        let (client, connection) = config
            .connect(tls::connector())
            .await
            .with_context(context)?;
        tokio::spawn(drive(connection));
        client
    };
    Ok(client)
}

async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "postgres connection ended");
    }
}

/// A server error no retry can fix (wrong password, missing right, missing table), with a hint;
/// `None` for errors worth a retry (connection lost, server starting up). `role_hint` names what
/// a role lacking a right should be granted.
pub fn permanent(e: &tokio_postgres::Error, role_hint: &str) -> Option<Fatal> {
    let db = e.as_db_error()?;
    fatal::permanent_server_error(db.code().code(), db.message(), role_hint)
}

/// [`permanent`] for an error with context (as [`connect`] returns).
pub fn permanent_in(e: &anyhow::Error, role_hint: &str) -> Option<Fatal> {
    e.chain()
        .find_map(|cause| cause.downcast_ref::<tokio_postgres::Error>())
        .and_then(|e| permanent(e, role_hint))
}
