//! `outbox-worker setup`: checks the database and creates the publication and the slot. Idempotent,
//! safe to run from several workers at once.

use anyhow::{bail, Context, Result};
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// An ordinary (non-replication) connection, TLS as `sslmode` says; its driver task ends with
/// the client.
pub async fn connect(url: &str) -> Result<Client> {
    let config: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("postgres.url {}", redact(url)))?;
    let context = || format!("cannot connect to PostgreSQL at {}", redact(url));
    let client = if config.get_ssl_mode() == SslMode::Disable {
        let (client, connection) = config.connect(NoTls).await.with_context(context)?;
        tokio::spawn(drive(connection));
        client
    } else {
        let (client, connection) = config
            .connect(super::tls::connector())
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

pub async fn ensure_slot(client: &Client, slot: &str, publication: &str) -> Result<()> {
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        bail!(
            "wal_level is {wal_level:?}, the worker needs \"logical\": set wal_level = logical in \
             postgresql.conf and restart PostgreSQL"
        );
    }
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    if client
        .query_opt(
            "SELECT 1 FROM pg_extension WHERE extname = 'pg_outbox'",
            &[],
        )
        .await?
        .is_none()
    {
        bail!("the pg_outbox extension is not installed in database {database:?}: run CREATE EXTENSION pg_outbox");
    }
    if client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_none()
    {
        let create = format!(
            "CREATE PUBLICATION {} FOR TABLE outbox.messages WITH (publish = 'insert')",
            quote_ident(publication)
        );
        ignore_duplicate(client.batch_execute(&create).await)
            .with_context(|| format!("cannot create publication {publication:?}"))?;
        tracing::info!(publication, "created publication");
    }
    match client
        .query_opt(
            "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
    {
        Some(row) => {
            let (plugin, slot_database): (Option<String>, Option<String>) =
                (row.get(0), row.get(1));
            if plugin.as_deref() != Some("pgoutput") || slot_database.as_deref() != Some(&database)
            {
                bail!(
                    "replication slot {slot:?} exists but is not a pgoutput slot of database \
                     {database:?} (plugin {plugin:?}, database {slot_database:?}): choose another \
                     postgres.slot or drop it"
                );
            }
        }
        None => {
            let created = client
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await;
            match created {
                Ok(row) => tracing::info!(
                    slot,
                    lsn = row.get::<_, String>(0),
                    "created replication slot"
                ),
                Err(e) => ignore_duplicate(Err(e))
                    .with_context(|| format!("cannot create replication slot {slot:?}"))?,
            }
        }
    }
    Ok(())
}

/// Another worker may have created it a moment ago.
fn ignore_duplicate(
    result: Result<(), tokio_postgres::Error>,
) -> Result<(), tokio_postgres::Error> {
    match result {
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(()),
        other => other,
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((credentials, host)) => {
                let user = credentials.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}@{host}")
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_the_password() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5/db"),
            "postgres://u@h:5/db"
        );
        assert_eq!(super::redact("postgres://h/db"), "postgres://h/db");
    }
}
