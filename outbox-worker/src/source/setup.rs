//! `outbox-worker setup`: checks the database and creates the publication and the slot. Idempotent,
//! safe to run from several workers at once.

use anyhow::{bail, Context, Result};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

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
