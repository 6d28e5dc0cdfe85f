//! The run loop races `ReplicationSource::next` against acknowledgements and shutdown, so the
//! future is dropped whenever another branch wins. Dropping it must never lose an event: here it
//! is cancelled over and over while a real slot streams both storage forms.

use std::collections::HashSet;
use std::time::Duration;

use outbox_tests::publish::{publish_range, Storage};
use outbox_tests::PgCluster;
use outbox_worker::config::FailoverSlot;
use outbox_worker::setup;
use outbox_worker::source::{ReplicationSource, SlotSettings, SourceEvent};

#[tokio::test(flavor = "multi_thread")]
async fn dropping_next_mid_await_never_loses_an_event() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    let client = outbox_worker::pg::connect(&pg.url()).await.unwrap();
    const COUNT: u64 = 1500;
    let settings = SlotSettings {
        url: pg.url(),
        slot: "pg_outbox".into(),
        publication: "pg_outbox".into(),
        status_interval: Duration::from_millis(250),
        failover: FailoverSlot::Auto,
        wal_form: true,
        primary_url: None,
        queues: Vec::new(),
        stopped_elsewhere: Vec::new(),
    };
    setup::ensure_slot(&client, &settings, setup::SlotSetup::Keep)
        .await
        .unwrap();
    let mut source = ReplicationSource::connect(&settings, None).await.unwrap();
    // Published while streaming, so that `next` often has to wait.
    let publisher = tokio::spawn(async move {
        let mut transactions = 0;
        for first in (0..COUNT).step_by(100) {
            // Alternate a burst (one 100-message transaction per form) with single-message ones.
            if first % 200 == 0 {
                transactions += publish_range(&db, "orders", first, 100, 10, Storage::Mixed).await;
                continue;
            }
            for i in first..first + 100 {
                let form = if i % 2 == 0 { "table" } else { "wal" };
                db.batch_execute(&format!(
                    "BEGIN; SET LOCAL pg_outbox.storage = '{form}';
                     SELECT outbox.publish('orders', jsonb_build_object('i', {i}), '{{}}', 'k-{}');
                     COMMIT;",
                    i % 10
                ))
                .await
                .unwrap();
                transactions += 1;
            }
        }
        transactions
    });
    let (mut ids, mut begins, mut commits, mut cancelled) = (HashSet::new(), 0, 0, 0u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while ids.len() as u64 != COUNT {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stalled after {commits} commits"
        );
        tokio::select! {
            event = source.next() => match event.unwrap() {
                SourceEvent::Begin => begins += 1,
                SourceEvent::Message(m) => assert!(ids.insert(m.id), "{} twice", m.id),
                SourceEvent::Commit { .. } => commits += 1,
                SourceEvent::KeepAlive { .. } => {}
                SourceEvent::Quarantine(q) => panic!("quarantined: {}", q.reason),
            },
            // Tokio timers tick in milliseconds: every wait for the next transaction longer than that is
            // cut short.
            _ = tokio::time::sleep(Duration::from_micros(20)) => cancelled += 1,
        }
    }
    let transactions = publisher.await.unwrap();
    assert_eq!(begins, transactions);
    assert_eq!(
        commits + 1,
        transactions,
        "the loop stops at the last message, before its commit"
    );
    assert!(
        cancelled > 20,
        "the test must actually cancel ({cancelled})"
    );
}
