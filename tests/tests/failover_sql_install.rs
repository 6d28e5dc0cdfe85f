//! A primary failure with the SQL install (no C extension), on the PostgreSQL under test when it
//! has failover slots (17+: scripts/test runs this file on 17, which has no extension), else on
//! 18: the worker makes a failover slot, PostgreSQL keeps a synced copy on a physical standby, the
//! primary is SIGKILLed while publishers commit, the standby is promoted, and the worker (given
//! both hosts) carries on from the synced slot. Every acknowledged commit arrives, each key's
//! first arrivals in order.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_tests::postgres::{count, Installation};
use outbox_tests::publish::read_json_lines;
use outbox_tests::{eventually, PgCluster, Worker};
use tokio_postgres::Client;

const KEYS: u64 = 20;

/// Publishes messages `first..first+10` (key `k-{i % KEYS}`) in one transaction; true once the
/// commit is acknowledged.
async fn publish_ten(db: &Client, first: u64) -> bool {
    db.batch_execute(&format!(
        "BEGIN;
         SELECT count(outbox.publish('orders', jsonb_build_object('i', i), '{{}}', 'k-' || i % {KEYS}))
           FROM generate_series({first}, {last}) AS i;
         COMMIT;",
        last = first + 9
    ))
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sql_install_fails_over_with_a_failover_slot() {
    let under_test = Installation::under_test();
    let installation = if under_test.major >= 17 {
        under_test.clone()
    } else {
        Installation::major(18)
    };
    let major = installation.major;
    let primary = PgCluster::start_on(installation, |_| {});
    primary.sql_install("postgres").await;
    let db = primary.superuser().await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_extension WHERE extname = 'pg_outbox'"
        )
        .await,
        0,
        "the SQL install, not the extension"
    );
    let standby = primary.start_standby();
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
    assert!(failover, "auto makes a failover slot on {major}");

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
                assert!(publish_ten(db_ref, first).await);
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
            while publish_ten(&db, i).await {
                i += 10;
            }
            i // the first index whose commit was not acknowledged
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    primary.kill();
    let unacknowledged = publisher.await.unwrap();
    standby.promote();

    // The new primary takes the rest; the in-doubt transaction's indexes are skipped.
    let new_primary = standby.superuser().await;
    let after = unacknowledged + 10;
    for first in (after..after + 300).step_by(10) {
        assert!(publish_ten(&new_primary, first).await);
    }
    let expected: HashSet<u64> = (0..unacknowledged).chain(after..after + 300).collect();
    let (out_ref, expected_ref) = (&out, &expected);
    eventually(
        Duration::from_secs(120),
        "every acknowledged commit after the failover",
        || async move {
            let seen: HashSet<u64> = read_json_lines(out_ref)
                .iter()
                .filter_map(|s| s.payload["i"].as_u64())
                .collect();
            expected_ref.is_subset(&seen)
        },
    )
    .await;

    let lines = read_json_lines(&out);
    let mut first_arrivals = HashSet::new();
    let mut last_per_key: HashMap<String, u64> = HashMap::new();
    for line in &lines {
        if !first_arrivals.insert(line.id.clone()) {
            continue;
        }
        let i = line.payload["i"].as_u64().unwrap();
        let key = line.key.clone().unwrap();
        if let Some(last) = last_per_key.insert(key.clone(), i) {
            assert!(last < i, "key {key}: {i} arrived after {last}");
        }
    }
    eprintln!(
        "SQL install failover on PostgreSQL {major}: {unacknowledged} committed before the kill, \
         300 after; {} lines, {} duplicates",
        lines.len(),
        lines.len() - first_arrivals.len(),
    );
    drop(worker);
}
