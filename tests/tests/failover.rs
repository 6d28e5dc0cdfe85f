//! A primary failure on PostgreSQL 18: the worker's failover slot is kept in step on a physical
//! standby, the primary is SIGKILLed while publishers commit in both storage forms, the standby is
//! promoted, and the worker (given both hosts) carries on from the synced slot. Every committed
//! message arrives; duplicates are counted; each key's first arrivals keep their order.
//! Also: `setup` converting an existing slot, and `failover_slot = "on"` refused before 17.
//! (On 18 and 15 whichever PostgreSQL the rest of the suite runs on: failover slots need 17+.)

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_tests::postgres::{count, Installation};
use outbox_tests::publish::read_json_lines;
use outbox_tests::worker::run_once;
use outbox_tests::{eventually, PgCluster, Worker};
use tokio_postgres::Client;

const KEYS: u64 = 20;

/// Publishes messages `first..first+10` (key `k-{i % KEYS}`) in one transaction, alternating the
/// storage form; true once the commit is acknowledged.
async fn publish_ten(db: &Client, first: u64) -> bool {
    let form = if (first / 10).is_multiple_of(2) {
        "table"
    } else {
        "wal"
    };
    db.batch_execute(&format!(
        "BEGIN; SET LOCAL pg_outbox.storage = '{form}';
         SELECT count(outbox.publish('orders', jsonb_build_object('i', i), '{{}}', 'k-' || i % {KEYS}))
           FROM generate_series({first}, {last}) AS i;
         COMMIT;",
        last = first + 9
    ))
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_killed_mid_stream_loses_no_committed_message_after_promotion() {
    let primary = PgCluster::start_on(Installation::major(18), |_| {});
    let db = primary.superuser().await;
    db.batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
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
    assert!(failover, "auto makes a failover slot on 18");

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
    for first in (after..after + 500).step_by(10) {
        assert!(publish_ten(&new_primary, first).await);
    }
    let expected: HashSet<u64> = (0..unacknowledged).chain(after..after + 500).collect();
    let out_ref = &out;
    let expected_ref = &expected;
    eventually(
        Duration::from_secs(120),
        "every committed message after the failover",
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
        "failover: {} committed before the kill, {} after; {} lines, {} duplicates; in-doubt \
         transaction {}",
        unacknowledged,
        500,
        lines.len(),
        lines.len() - first_arrivals.len(),
        if (unacknowledged..after).any(|i| lines.iter().any(|l| l.payload["i"] == i)) {
            "delivered (it had committed)"
        } else {
            "not delivered"
        }
    );
    drop(worker);
}

/// A slot made before failover slots were asked for (an older worker, or by hand) becomes one at
/// the next `setup`, and `status` says so.
#[tokio::test(flavor = "multi_thread")]
async fn setup_makes_an_existing_slot_a_failover_slot() {
    let pg = PgCluster::start_on(Installation::major(18), |_| {});
    let db = pg.superuser().await;
    for sql in [
        "CREATE EXTENSION pg_outbox",
        "SELECT pg_create_logical_replication_slot('pg_outbox', 'pgoutput')",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    let failover = || async {
        db.query_one(
            "SELECT failover FROM outbox.status() WHERE slot_name = 'pg_outbox'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    };
    assert!(!failover().await);
    let out = run_once(&["setup", "--postgres-url", &pg.url()], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(failover().await, "setup converted it");
    let status = run_once(&["status", "--postgres-url", &pg.url()], &[]);
    let text = String::from_utf8_lossy(&status.stdout);
    let header: Vec<&str> = text.lines().next().unwrap().split('\t').collect();
    let row: Vec<&str> = text.lines().nth(1).unwrap().split('\t').collect();
    let column = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(column("failover"), "true", "{text}");
    // setup adopted the slot: it is remembered from now on.
    assert!(column("delivered_before").ends_with('Z'), "{text}");
}

/// `failover_slot = "on"` where the server has no failover slots is refused with what to do.
#[tokio::test(flavor = "multi_thread")]
async fn a_failover_slot_cannot_be_required_before_postgres_17() {
    let pg = PgCluster::start_on(Installation::major(15), |_| {});
    pg.superuser()
        .await
        .batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    let out = run_once(
        &["setup", "--postgres-url", &pg.url()],
        &[("OUTBOX_POSTGRES__FAILOVER_SLOT", "on")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("postgres.failover_slot = \"on\" needs PostgreSQL 17 or later"),
        "{stderr}"
    );
}
