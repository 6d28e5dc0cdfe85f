//! Ordinary (non-replication) SQL connections: setup, dead letters, the lag poller and the
//! operator commands all connect here.

mod tls;

use anyhow::{Context, Result};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};

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
