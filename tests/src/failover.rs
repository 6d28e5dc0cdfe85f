//! A primary failure, as both failover tests run it (`failover.rs` with the extension,
//! `failover_sql_install.rs` with the SQL install): a physical standby keeps a synced copy of the
//! worker's failover slot, the primary is SIGKILLed while publishers commit, the standby is
//! promoted, and the worker (given both hosts) carries on. Every acknowledged commit must arrive,
//! each key's first arrivals in order.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio_postgres::Client;

use crate::postgres::count;
use crate::publish::read_json_lines;
use crate::{eventually, PgCluster, Worker};

const KEYS: u64 = 20;

/// What a failover delivered.
#[derive(Debug)]
pub struct Failover {
    /// Messages `0..committed_before` were acknowledged before the kill.
    pub committed_before: u64,
    /// Lines the worker wrote, repeats included, and how many were repeats.
    pub lines: usize,
    pub duplicates: usize,
    /// The transaction in doubt at the kill (its commit was not acknowledged) was delivered.
    pub in_doubt_delivered: bool,
}

/// Publishes messages `first..first+10` (key `k-{i % KEYS}`) in one transaction, alternating the
/// storage form when `mixed` (else in the install's default form); true once the commit is
/// acknowledged.
pub async fn publish_ten(db: &Client, first: u64, mixed: bool) -> bool {
    let form = match (mixed, (first / 10).is_multiple_of(2)) {
        (false, _) => "",
        (true, true) => "SET LOCAL pg_outbox.storage = 'table';",
        (true, false) => "SET LOCAL pg_outbox.storage = 'wal';",
    };
    db.batch_execute(&format!(
        "BEGIN; {form}
         SELECT count(outbox.publish('orders', jsonb_build_object('i', i), '{{}}', 'k-' || i % {KEYS}))
           FROM generate_series({first}, {last}) AS i;
         COMMIT;",
        last = first + 9
    ))
    .await
    .is_ok()
}

/// Runs the failover against `primary` (pg_outbox installed in database `postgres`), with
/// `after` messages published on the promoted standby; panics on a lost or reordered message.
pub async fn kill_the_primary_under_publishers(
    primary: &PgCluster,
    mixed: bool,
    after: u64,
) -> Failover {
    let db = primary.superuser().await;
    let standby = primary.start_standby();
    // Commits wait for the standby; the logical slot never runs ahead of it.
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby'",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(sql).await.unwrap();
    }

    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stdout.jsonl");
    let worker = Worker::start(&["run", "--postgres-url", &url], Some(&out));
    primary.wait_for_slot(&db).await;
    let failover: bool = db
        .query_one(
            "SELECT failover FROM outbox.status() WHERE slot_name = 'pg_outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failover, "auto makes a failover slot (17 and later)");

    // Traffic until the standby holds a synced copy of the slot that has moved.
    let mut next = 0;
    let on_standby = standby.superuser().await;
    let (db_ref, standby_ref) = (&db, &on_standby);
    eventually(
        Duration::from_secs(90),
        "the slot synced to the standby",
        || {
            let first = next;
            next += 10;
            async move {
                assert!(publish_ten(db_ref, first, mixed).await);
                count(
                    standby_ref,
                    "SELECT count(*) FROM pg_replication_slots
                      WHERE slot_name = 'pg_outbox' AND synced AND confirmed_flush_lsn IS NOT NULL",
                )
                .await
                    == 1
            }
        },
    )
    .await;

    // Publishers keep committing; the primary dies under them.
    let publisher = {
        let db = primary.superuser().await;
        let first = next;
        tokio::spawn(async move {
            let mut i = first;
            while publish_ten(&db, i, mixed).await {
                i += 10;
            }
            i // the first index whose commit was not acknowledged
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    primary.kill();
    let committed_before = publisher.await.unwrap();
    standby.promote();

    // The new primary takes the rest; the in-doubt transaction's indexes are skipped.
    let new_primary = standby.superuser().await;
    let resume = committed_before + 10;
    for first in (resume..resume + after).step_by(10) {
        assert!(publish_ten(&new_primary, first, mixed).await);
    }
    let expected: HashSet<u64> = (0..committed_before)
        .chain(resume..resume + after)
        .collect();
    let in_doubt: HashSet<u64> = (committed_before..resume).collect();
    let (lines, duplicates) = every_acknowledged_commit(&out, &expected, &in_doubt).await;
    drop(worker);
    Failover {
        committed_before,
        lines,
        duplicates,
        in_doubt_delivered: read_json_lines(&out).iter().any(|l| {
            l.payload["i"]
                .as_u64()
                .is_some_and(|i| in_doubt.contains(&i))
        }),
    }
}

/// Waits (2 minutes at most) until every index of `expected` was delivered to the stdout file
/// `out`; then checks that nothing outside `expected` and `in_doubt` (a transaction whose commit
/// was not acknowledged) arrived and that each key's first arrivals are in index order. Returns
/// (lines, repeats).
pub async fn every_acknowledged_commit(
    out: &std::path::Path,
    expected: &HashSet<u64>,
    in_doubt: &HashSet<u64>,
) -> (usize, usize) {
    eventually(
        Duration::from_secs(120),
        "every acknowledged commit delivered",
        || async move {
            let seen: HashSet<u64> = read_json_lines(out)
                .iter()
                .filter_map(|s| s.payload["i"].as_u64())
                .collect();
            expected.is_subset(&seen)
        },
    )
    .await;
    let lines = read_json_lines(out);
    let mut first_arrivals = HashSet::new();
    let mut last_per_key: HashMap<String, u64> = HashMap::new();
    for line in &lines {
        if !first_arrivals.insert(line.id.clone()) {
            continue;
        }
        let i = line.payload["i"].as_u64().unwrap();
        assert!(
            expected.contains(&i) || in_doubt.contains(&i),
            "message {i} was never committed"
        );
        let key = line.key.clone().unwrap();
        if let Some(last) = last_per_key.insert(key.clone(), i) {
            assert!(last < i, "key {key}: {i} arrived after {last}");
        }
    }
    (lines.len(), lines.len() - first_arrivals.len())
}
