//! A primary failure on PostgreSQL 18: the worker's failover slot is kept in step on a physical
//! standby, the primary is SIGKILLed while publishers commit in both storage forms, the standby is
//! promoted, and the worker (given both hosts) carries on from the synced slot. Every committed
//! message arrives; duplicates are counted; each key's first arrivals keep their order.
//! Also: `setup` converting an existing slot, and `failover_slot = "on"` refused before 17.
//! (On 18 and 15 whichever PostgreSQL the rest of the suite runs on: failover slots need 17+.)

use outbox_tests::failover::kill_the_primary_under_publishers;
use outbox_tests::postgres::Installation;
use outbox_tests::worker::run_once;
use outbox_tests::PgCluster;

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_killed_mid_stream_loses_no_committed_message_after_promotion() {
    let primary = PgCluster::start_on(Installation::major(18), |_| {});
    primary
        .superuser()
        .await
        .batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    let failover = kill_the_primary_under_publishers(&primary, true, 500).await;
    eprintln!(
        "failover: {} committed before the kill, 500 after; {} lines, {} duplicates; in-doubt \
         transaction {}",
        failover.committed_before,
        failover.lines,
        failover.duplicates,
        if failover.in_doubt_delivered {
            "delivered (it had committed)"
        } else {
            "not delivered"
        }
    );
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
