//! A primary failure with the SQL install (no C extension), on the PostgreSQL under test when it
//! has failover slots (17+: scripts/test runs this file on 17, which has no extension), else on
//! 18: the worker makes a failover slot, PostgreSQL keeps a synced copy on a physical standby, the
//! primary is SIGKILLed while publishers commit, the standby is promoted, and the worker (given
//! both hosts) carries on from the synced slot. Every acknowledged commit arrives, each key's
//! first arrivals in order.

use outbox_tests::failover::kill_the_primary_under_publishers;
use outbox_tests::postgres::{count, Installation};
use outbox_tests::PgCluster;

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
    let failover = kill_the_primary_under_publishers(&primary, false, 300).await;
    eprintln!(
        "SQL install failover on PostgreSQL {major}: {} committed before the kill, 300 after; \
         {} lines, {} duplicates",
        failover.committed_before, failover.lines, failover.duplicates,
    );
}
