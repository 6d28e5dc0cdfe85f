//! `outbox-worker setup`: checks the database and creates the publication and the slot, and
//! remembers the slot in `outbox.slots`. Idempotent, safe to run from several workers at once.

use anyhow::{bail, Context, Result};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::claims::Claiming;
use crate::config::FailoverSlot;
use crate::fatal::Fatal;
use crate::slot_publication::Prepared;
use crate::source::{make_failover_slot, SlotSettings};

/// What to do with a slot that was used before and is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotSetup {
    /// Create the slot only on first setup; stop if a slot used before is missing or invalidated.
    Keep,
    /// `setup --new-slot`: a new slot at the current position, in place of the old one if any
    /// (the operator accepts that what it had not delivered must be sent again).
    Replace,
}

/// Checks the database, creates the publication when missing, and the slot on first setup (a
/// failover slot where `settings.failover` asks for one and the server has them).
pub async fn ensure_slot(client: &Client, settings: &SlotSettings, mode: SlotSetup) -> Result<()> {
    let (slot, publication) = (settings.slot.as_str(), settings.publication.as_str());
    // A standby's slot: decoded there, written about on the primary.
    let primary = match check_standby(client, settings).await? {
        Some(primary_url) => {
            Some(crate::pg::connect_writer(&settings.url, Some(primary_url)).await?)
        }
        None => None,
    };
    let writer = primary.as_ref().unwrap_or(client);
    // The standby this slot is decoded on, if it is.
    let decoding = primary.as_ref().map(|_| client);
    let failover = match primary {
        Some(_) => false,
        None => wants_failover(client, settings.failover).await?,
    };
    // Checked before anything is made, recorded once the slot exists (its stream then holds the
    // claim's position).
    let mut claims_writer =
        crate::pg::connect_writer(&settings.url, settings.primary_url.as_deref()).await?;
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(Fatal::new(
            format!("wal_level is {wal_level:?}, the worker needs \"logical\""),
            "set wal_level = logical in postgresql.conf and restart PostgreSQL",
        )
        .into());
    }
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    if installed(client).await?.is_none() {
        bail!(
            "the pg_outbox extension is not installed in database {database:?}: run CREATE \
             EXTENSION pg_outbox (or, where no C extension can be loaded, psql -f sql/pg_outbox.sql)"
        );
    }
    if writer
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
        ignore_duplicate(writer.batch_execute(&create).await)
            .with_context(|| format!("cannot create publication {publication:?}"))?;
        tracing::info!(publication, "created publication");
    }
    check_publication(writer, publication).await?;
    let changes =
        crate::claims::claim(&mut claims_writer, decoding, settings, Claiming::Check).await?;
    // Before the slot is made: its first position then lies after the publication's.
    let prepared = match settings.queues.is_empty() {
        true => Prepared::Kept,
        false => {
            crate::slot_publication::prepare(&claims_writer, slot, &settings.queues, changes)
                .await?
        }
    };
    let slot_state = client
        .query_opt(
            "SELECT plugin, database,
                    wal_status = 'lost' OR coalesce((pg_catalog.to_jsonb(s) ->> 'conflicting')::boolean, false),
                    coalesce((pg_catalog.to_jsonb(s) ->> 'failover')::boolean, false), active
               FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let known = writer
        .query_opt(
            "SELECT delivered_before FROM outbox.slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .context("cannot read outbox.slots")?
        .is_some();
    let created = match slot_state {
        Some(row) => {
            let (plugin, slot_database, invalidated): (Option<String>, Option<String>, bool) =
                (row.get(0), row.get(1), row.get(2));
            let (is_failover, active): (bool, bool) = (row.get(3), row.get(4));
            if plugin.as_deref() != Some("pgoutput") || slot_database.as_deref() != Some(&database)
            {
                bail!(
                    "replication slot {slot:?} exists but is not a pgoutput slot of database \
                     {database:?} (plugin {plugin:?}, database {slot_database:?}): choose another \
                     postgres.slot or drop it"
                );
            }
            match mode {
                SlotSetup::Keep if invalidated => {
                    return Err(slot_gone(writer, slot, "was invalidated (wal_status lost)")
                        .await
                        .into())
                }
                SlotSetup::Keep => {
                    if failover && !is_failover {
                        convert_to_failover(settings, active).await?;
                    }
                    false
                }
                SlotSetup::Replace => {
                    client
                        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                        .await
                        .with_context(|| {
                            format!("cannot drop slot {slot:?} (stop every worker using it first)")
                        })?;
                    tracing::warn!(slot, "dropped the replication slot");
                    create_slot(client, primary.as_ref(), &settings.url, slot, failover).await?;
                    true
                }
            }
        }
        None if known && mode == SlotSetup::Keep => {
            return Err(slot_gone(writer, slot, "does not exist").await.into())
        }
        None => {
            create_slot(client, primary.as_ref(), &settings.url, slot, failover).await?;
            true
        }
    };
    // A new slot starts a new record; an existing slot without one (set up by an older worker)
    // is adopted. created_at stays when a slot is replaced (`--new-slot`): it dates the row,
    // and claims older than it are those of a retired slot of the same name (claims.rs).
    writer
        .execute(
            "INSERT INTO outbox.slots AS t (slot_name) VALUES ($1)
             ON CONFLICT (slot_name) DO UPDATE SET
                 delivered_before = now(),
                 mark_lsn = pg_current_wal_lsn(), mark_at = now()
             WHERE $2",
            &[&slot, &created],
        )
        .await
        .context("cannot record the slot in outbox.slots")?;
    if let Some(primary) = &primary {
        reaches_the_standby(client, primary, slot).await?;
    }
    // A slot made after the wait decodes nothing from before it: its publication holds for
    // all of its stream.
    let prepared = match (created, prepared) {
        (true, Prepared::Waited(at)) => Prepared::Created(at),
        (_, prepared) => prepared,
    };
    let claimed = crate::claims::claim(
        &mut claims_writer,
        decoding,
        settings,
        Claiming::Record(prepared),
    )
    .await
    .map(|_| ());
    if let (Err(_), true, false) = (&claimed, created, known) {
        // Refused since the check (a worker started meanwhile): the slot made for this claim
        // would otherwise stay, taking every queue no set claims. (Not a slot replaced with
        // --new-slot: its row says what it delivered before.)
        let _ = client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await;
        let _ = writer
            .execute("DELETE FROM outbox.slots WHERE slot_name = $1", &[&slot])
            .await;
    }
    claimed
}

/// What the worker writes on `postgres.primary_url` must reach the standby `postgres.url` names:
/// a new mark taken there is waited for on the standby, 30 s at most. A server with the primary's
/// system identifier that is not its primary (a restored backup, another promoted standby, an old
/// primary) never sends it, and dead letters written there would be lost to the slot.
async fn reaches_the_standby(standby: &Client, primary: &Client, slot: &str) -> Result<()> {
    use chrono::{DateTime, Utc};
    let row = primary
        .query_one(
            "UPDATE outbox.slots SET mark_lsn = pg_current_wal_lsn(), mark_at = clock_timestamp()
              WHERE slot_name = $1 RETURNING mark_lsn::text, mark_at",
            &[&slot],
        )
        .await
        .context("cannot mark the slot in outbox.slots")?;
    let mark: (String, DateTime<Utc>) = (row.get(0), row.get(1));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let seen = standby
            .query_opt(
                "SELECT mark_lsn::text, mark_at FROM outbox.slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .map(|row| (row.get::<_, String>(0), row.get::<_, DateTime<Utc>>(1)));
        if seen.as_ref() == Some(&mark) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Fatal::new(
                "what the worker writes on postgres.primary_url did not reach the standby postgres.url names within 30 s",
                "postgres.primary_url must name the server the standby replicates from (not a copy of it: a restored backup, another promoted standby, an old primary), and the standby must be replaying",
            )
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// How pg_outbox is installed in a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// `CREATE EXTENSION pg_outbox`: only `outbox.publish*` can write a wal-form message.
    Extension,
    /// `sql/pg_outbox.sql`: `pg_logical_emit_message` stays open to every role, so wal-form
    /// messages are not trusted (the SQL install writes only the table form).
    Sql,
}

/// `None` when pg_outbox is not installed in the connected database.
pub async fn installed(client: &Client) -> Result<Option<Install>> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_outbox'),
                    to_regclass('outbox.sql_install') IS NOT NULL",
            &[],
        )
        .await?;
    Ok(match (row.get(0), row.get(1)) {
        (true, _) => Some(Install::Extension),
        (false, true) => Some(Install::Sql),
        (false, false) => None,
    })
}

/// The publication streams what the install made it stream: inserts into `outbox.messages`, whole
/// rows, nothing else. Its owner could otherwise make it stream deletes only (committed messages
/// would never reach the slot), filter rows or columns, or add every table (issue 21).
pub async fn check_publication(client: &Client, publication: &str) -> Result<(), Fatal> {
    let row = client
        .query_opt(
            "SELECT p.pubinsert, p.pubupdate OR p.pubdelete OR p.pubtruncate, p.puballtables,
                    coalesce((SELECT array_agg(format('%s.%s', t.schemaname, t.tablename) ORDER BY 1)
                                FROM pg_publication_tables t WHERE t.pubname = p.pubname), '{}'),
                    EXISTS (SELECT FROM pg_publication_rel r
                             WHERE r.prpubid = p.oid AND (r.prqual IS NOT NULL OR r.prattrs IS NOT NULL))
               FROM pg_publication p WHERE p.pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| Fatal::new(format!("cannot read publication {publication:?}: {e}"), "is the role allowed to read pg_publication?"))?;
    // A missing publication is reported where it is used (setup creates it).
    let Some(row) = row else { return Ok(()) };
    let (insert, more, all_tables, tables, filtered): (bool, bool, bool, Vec<String>, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    let problem = if !insert || more {
        Some("does not stream exactly the inserts (publish = 'insert')".to_owned())
    } else if all_tables || tables != ["outbox.messages"] {
        Some(format!("streams {tables:?}, not exactly outbox.messages"))
    } else if filtered {
        Some("filters rows or columns of outbox.messages".to_owned())
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(Fatal::new(
            format!("publication {publication:?} {problem}"),
            format!(
                "make it what the install made: ALTER PUBLICATION {} SET TABLE outbox.messages; ALTER PUBLICATION {} SET (publish = 'insert'), as its owner (pg_outbox's installer)",
                quote_ident(publication),
                quote_ident(publication)
            ),
        )),
    }
}

/// The rights `run` needs beyond the replication connection, checked before anything streams: a
/// dead letter that cannot be written would stop delivery later, mid-stream. Managed services may
/// grant replication through a role rather than the REPLICATION attribute (`rds_replication` on
/// Amazon RDS and Aurora, `neon_superuser` on Neon): membership is accepted here, and a server
/// that refuses it anyway stops the worker with the walsender's error and a hint. `streams`:
/// the role also streams the slot (not `primary_url`'s, which only writes).
pub async fn check_rights(client: &Client, streams: bool) -> Result<(), Fatal> {
    let row = client
        .query_one(
            "SELECT current_user::text, pg_catalog.quote_ident(current_user::text),
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)
                      OR EXISTS (SELECT FROM unnest(ARRAY['rds_replication', 'neon_superuser']) AS r
                                  WHERE pg_catalog.pg_has_role(pg_catalog.to_regrole(r)::oid, 'MEMBER')),
                    pg_catalog.has_schema_privilege('outbox', 'USAGE')
                      AND pg_catalog.has_table_privilege(pg_catalog.to_regclass('outbox.dead_letters')::oid, 'INSERT'),
                    pg_catalog.has_schema_privilege('outbox', 'USAGE')
                      AND pg_catalog.has_table_privilege(pg_catalog.to_regclass('outbox.slots')::oid, 'SELECT')
                      AND pg_catalog.has_table_privilege(pg_catalog.to_regclass('outbox.slots')::oid, 'INSERT')
                      AND pg_catalog.has_table_privilege(pg_catalog.to_regclass('outbox.slots')::oid, 'UPDATE')
                      AND coalesce(pg_catalog.has_table_privilege(pg_catalog.to_regclass('outbox.queue_claims')::oid, 'SELECT')
                                   AND pg_catalog.has_table_privilege(pg_catalog.to_regclass('outbox.queue_claims')::oid, 'INSERT'), true)",
            &[],
        )
        .await
        .map_err(|e| {
            crate::triage::of_query(&e, crate::triage::WORKER_RIGHT).unwrap_or_else(|| {
                Fatal::new(
                    format!("cannot check the worker's rights: {e}"),
                    "is pg_outbox installed in this database (CREATE EXTENSION pg_outbox, or sql/pg_outbox.sql)?",
                )
            })
        })?;
    let (role, quoted, replication, dead_letters, slots): (String, String, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if streams && !replication {
        return Err(Fatal::new(
            format!("role {role:?} may not stream a replication slot"),
            format!(
                "ALTER ROLE {quoted} REPLICATION (on Amazon RDS and Aurora: GRANT rds_replication TO {quoted})"
            ),
        ));
    }
    if !dead_letters || !slots {
        return Err(Fatal::new(
            format!(
                "role {role:?} cannot write outbox.dead_letters, outbox.slots and \
                 outbox.queue_claims, so a message a broker refuses could never be set aside"
            ),
            format!("GRANT outbox_relay TO {quoted}"),
        ));
    }
    Ok(())
}

/// Whether the slot should be a failover slot: `auto` where the server has them (17+), `on`
/// refuses an older server.
async fn wants_failover(client: &Client, setting: FailoverSlot) -> Result<bool> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let supported = version >= 170_000;
    match setting {
        FailoverSlot::Off => Ok(false),
        FailoverSlot::Auto => Ok(supported),
        FailoverSlot::On if supported => Ok(true),
        FailoverSlot::On => Err(Fatal::new(
            format!("postgres.failover_slot = \"on\" needs PostgreSQL 17 or later; this server is {version}"),
            "set postgres.failover_slot = \"auto\" (or \"off\"); on older servers see the README's failover runbook",
        )
        .into()),
    }
}

/// An existing slot made a failover slot. Not while another worker streams it (a standby's
/// setup must not fail because the active worker holds the slot): the next setup converts it.
async fn convert_to_failover(settings: &SlotSettings, active: bool) -> Result<()> {
    let slot = &settings.slot;
    if active {
        tracing::warn!(
            slot,
            "the slot is not a failover slot and is in use; run `outbox-worker setup` while no worker streams it to convert it"
        );
        return Ok(());
    }
    make_failover_slot(settings)
        .await
        .with_context(|| format!("cannot make {slot:?} a failover slot"))?;
    tracing::info!(slot, "made the replication slot a failover slot");
    Ok(())
}

async fn create_slot(
    client: &Client,
    primary: Option<&Client>,
    url: &str,
    slot: &str,
    failover: bool,
) -> Result<()> {
    // The five-argument form (temporary, two-phase, failover) exists from PostgreSQL 17 on.
    let created = if let Some(primary) = primary {
        on_standby(client, primary, slot, url).await?
    } else if failover {
        client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)",
                &[&slot],
            )
            .await
    } else {
        client
            .query_one(
                "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
    };
    match created {
        Ok(row) => tracing::info!(
            slot,
            lsn = row.get::<_, String>(0),
            failover,
            "created replication slot"
        ),
        Err(e) => ignore_duplicate(Err(e))
            .with_context(|| format!("cannot create replication slot {slot:?}"))?,
    }
    Ok(())
}

/// A slot made on a standby waits for the primary's next record of its running transactions
/// (written at checkpoints): `pg_log_standby_snapshot()` writes one every second meanwhile. 30 s
/// without it reaching the standby: `primary_url` is not the standby's primary (a copy of
/// it), or the standby does not replay.
async fn on_standby(
    standby: &Client,
    primary: &Client,
    slot: &str,
    url: &str,
) -> Result<Result<tokio_postgres::Row, tokio_postgres::Error>> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
    let creating = standby.query_one(
        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
        &params,
    );
    tokio::pin!(creating);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if std::time::Instant::now() > deadline {
            crate::pg::cancel(standby, url).await;
            return Err(Fatal::new(
                "making the slot on the standby waited 30 s for a snapshot of running transactions from postgres.primary_url, which never reached it",
                "postgres.primary_url must name the server the standby replicates from (not a copy of it: a restored backup, another promoted standby, an old primary), and the standby must be replaying",
            )
            .into());
        }
        tokio::select! {
            created = &mut creating => return Ok(created),
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                if let Err(e) = primary.execute("SELECT pg_catalog.pg_log_standby_snapshot()", &[]).await {
                    tracing::debug!(error = %e, "cannot log a standby snapshot on the primary");
                }
            }
        }
    }
}

/// `None` for a primary. For a standby (`postgres.url` in recovery), what decoding there needs:
/// PostgreSQL 16+, `postgres.primary_url` to write to, and `hot_standby_feedback` (else the
/// primary's vacuum removes catalog rows the slot still needs and the standby invalidates it);
/// returns the primary's URL.
pub async fn check_standby<'a>(
    client: &Client,
    settings: &'a SlotSettings,
) -> Result<Option<&'a str>> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int,
                    current_setting('hot_standby_feedback')::bool,
                    current_setting('primary_slot_name')",
            &[],
        )
        .await?;
    let (in_recovery, version, feedback, physical_slot): (bool, i32, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !in_recovery {
        return Ok(None);
    }
    if version < 160_000 {
        return Err(Fatal::new(
            format!("postgres.url is a standby of PostgreSQL {}: logical decoding on a standby needs 16 or later", version / 10_000),
            "point postgres.url at the primary, or upgrade",
        )
        .into());
    }
    let Some(primary_url) = settings.primary_url.as_deref() else {
        return Err(Fatal::new(
            "postgres.url is a standby (in recovery): the slot can be decoded there, but the worker writes outbox.slots and dead letters, which a standby cannot",
            "set postgres.primary_url (OUTBOX_POSTGRES__PRIMARY_URL) to the primary",
        )
        .into());
    };
    if !feedback {
        return Err(Fatal::new(
            "hot_standby_feedback is off on the standby postgres.url names: the primary's vacuum may remove catalog rows the slot needs, and the standby then invalidates the slot",
            "set hot_standby_feedback = on on the standby (and primary_slot_name, a physical slot on the primary, so that the feedback holds while it is disconnected)",
        )
        .into());
    }
    if physical_slot.is_empty() {
        tracing::warn!(
            "the standby streams from the primary without a physical slot (primary_slot_name): while it is disconnected, the primary's vacuum may remove catalog rows the standby's logical slot needs, and the standby then invalidates it"
        );
    }
    Ok(Some(primary_url))
}

/// What `outbox.slots` says about a slot that is gone, as an error that stops the worker.
pub async fn slot_gone(client: &Client, slot: &str, what_happened: &str) -> Fatal {
    let delivered_before: Option<String> = client
        .query_opt(
            "SELECT to_char(delivered_before AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
               FROM outbox.slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ok()
        .flatten()
        .map(|row| row.get(0));
    let since = match &delivered_before {
        Some(time) => format!(
            "every message committed before {time} was delivered; messages committed since \
             then may not have been"
        ),
        None => "messages committed since its last confirmed position may not have been \
                 delivered"
            .to_owned(),
    };
    Fatal::new(
        format!("replication slot {slot:?} {what_happened}: {since}"),
        format!(
            "the worker never creates a slot it has used before on its own, since that would \
             skip those messages for good. Run `outbox-worker setup --new-slot` to start a new \
             slot at the current position, then `outbox-worker replay --since {}` to send the \
             table-form messages of that time again (consumers drop duplicates); wal-form ones \
             cannot be recovered (README, \"A lost slot\")",
            delivered_before
                .as_deref()
                .unwrap_or("<when it was last confirmed>")
        ),
    )
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

/// While the first slot is being created, PostgreSQL waits for every transaction that was open
/// when it started (a long application transaction can hold it for minutes): logs which one, every
/// 10 s, over a connection of its own. Runs until dropped.
pub async fn report_blockers(url: &str) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let mut client = None;
    loop {
        if client.is_none() {
            client = crate::pg::connect(url).await.ok();
        }
        if let Some(c) = &client {
            // The slot's creator (one of our own sessions) waits on the transaction id lock of
            // each transaction it must outlive.
            match c
                .query_opt(
                    "SELECT holder.pid,
                            extract(epoch FROM now() - coalesce(a.xact_start, p.prepared))::bigint,
                            CASE WHEN p.gid IS NOT NULL THEN 'prepared transaction ' || p.gid
                                 ELSE coalesce(a.application_name, '') END
                       FROM pg_catalog.pg_stat_activity w
                       JOIN pg_catalog.pg_locks waits ON waits.pid = w.pid AND NOT waits.granted
                            AND waits.locktype = 'transactionid'
                       JOIN pg_catalog.pg_locks holder ON holder.locktype = 'transactionid'
                            AND holder.transactionid = waits.transactionid AND holder.granted
                       LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = holder.pid
                       LEFT JOIN pg_catalog.pg_prepared_xacts p ON p.transaction = holder.transactionid
                      WHERE w.usename = current_user AND w.pid <> pg_catalog.pg_backend_pid()
                      ORDER BY coalesce(a.xact_start, p.prepared) NULLS LAST LIMIT 1",
                    &[],
                )
                .await
            {
                Ok(Some(row)) => {
                    // A prepared transaction has no backend: no pid.
                    let (pid, age, application): (Option<i32>, Option<i64>, Option<String>) = (
                        row.try_get(0).unwrap_or_default(),
                        row.try_get(1).unwrap_or_default(),
                        row.try_get(2).unwrap_or_default(),
                    );
                    let blocking_pid = pid.map_or_else(
                        || "none (a prepared transaction: COMMIT PREPARED or ROLLBACK PREPARED it)".to_owned(),
                        |p| p.to_string(),
                    );
                    let application = application.unwrap_or_default();
                    let open_for = age
                        .map_or("an unknown time (pg_read_all_stats shows it)".into(), |s| {
                            format!("{s}s")
                        });
                    tracing::warn!(
                        blocking_pid = %blocking_pid,
                        open_for = %open_for,
                        application = %application,
                        "creating the replication slot waits for transactions that were open \
                         before it to end; ready once they do"
                    );
                }
                Ok(None) => tracing::info!("creating the replication slot"),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read what the slot creation waits for");
                    client = None;
                }
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}
