//! `outbox-worker replay`: after a lost slot, the table-form messages committed while it was gone
//! are sent again with their ids, counted end to end; `--queue` and `--until` narrow it.

use std::collections::HashSet;
use std::time::Duration;

use outbox_tests::publish::{
    check_delivery, publish_range, read_json_lines, wait_for_lines, Storage,
};
use outbox_tests::worker::run_once;
use outbox_tests::{PgCluster, Worker};

/// The time a lost-slot error names (`--since` for the replay).
fn delivered_before(log: &str) -> String {
    let start = log.find("committed before ").expect("a time") + "committed before ".len();
    log[start..start + "2026-01-01T00:00:00Z".len()].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_recovers_what_was_committed_while_the_slot_was_gone() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    let dir = tempfile::tempdir().unwrap();
    let before = dir.path().join("before.jsonl");
    let mut worker = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&before));
    pg.wait_for_slot(&db).await;
    publish_range(&db, "orders", 0, 300, 10, Storage::Table).await;
    wait_for_lines(&before, 300).await;
    assert!(worker.terminate(Duration::from_secs(30)).success());

    // The slot goes; 700 table-form messages (and another queue's) are committed meanwhile.
    db.batch_execute("SELECT pg_drop_replication_slot('pg_outbox')")
        .await
        .unwrap();
    publish_range(&db, "orders", 300, 700, 10, Storage::Table).await;
    db.batch_execute("SELECT outbox.publish('audit', '{\"i\": 0}', '{}', 'k-0')")
        .await
        .unwrap();
    let mut stopped = Worker::start(&["run", "--postgres-url", &pg.url()], None);
    assert_eq!(stopped.wait_exit(Duration::from_secs(30)).code(), Some(1));
    let since = delivered_before(&stopped.log());
    assert!(stopped
        .log()
        .contains(&format!("outbox-worker replay --since {since}")));

    let out = run_once(&["setup", "--new-slot", "--postgres-url", &pg.url()], &[]);
    assert!(out.status.success(), "{out:?}");
    let (after, live) = (
        dir.path().join("after.jsonl"),
        dir.path().join("live.jsonl"),
    );
    let _worker = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&live));
    pg.wait_for_slot(&db).await;
    let replayed = run_once(
        &[
            "replay",
            "--postgres-url",
            &pg.url(),
            "--since",
            &since,
            "--queue",
            "orders*",
        ],
        &[],
    );
    let report = String::from_utf8_lossy(&replayed.stderr);
    assert!(replayed.status.success(), "{report}");
    std::fs::write(&after, &replayed.stdout).unwrap();
    publish_range(&db, "orders", 1000, 100, 10, Storage::Table).await;
    wait_for_lines(&live, 100).await;

    // Everything, once at least: before the loss, replayed, and live after the new slot.
    let all: Vec<_> = [&before, &after, &live]
        .into_iter()
        .flat_map(|p| read_json_lines(p))
        .collect();
    let tally = check_delivery(&all, 1100);
    let replayed = read_json_lines(&after);
    let replayed_ids: HashSet<_> = replayed.iter().map(|s| s.id.clone()).collect();
    assert_eq!(
        replayed_ids.len(),
        replayed.len(),
        "each message replayed once"
    );
    assert!(
        replayed
            .iter()
            .all(|s| s.payload["i"].as_u64() < Some(1000)),
        "nothing of the new slot's"
    );
    let queues: HashSet<String> = String::from_utf8_lossy(&std::fs::read(&after).unwrap())
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["queue"].to_string())
        .collect();
    assert_eq!(
        queues,
        HashSet::from(["\"orders\"".to_owned()]),
        "--queue left audit out"
    );
    assert!(report.contains("1 of other queues"), "{report}");
    // The summary adds up, and its "sent" is what arrived.
    let line = report
        .lines()
        .find(|l| l.starts_with("replayed "))
        .unwrap_or_else(|| panic!("no summary in {report}"));
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let [total, sent, dead, skipped, other] = numbers[..] else {
        panic!("{line}")
    };
    assert_eq!(total, sent + dead + skipped + other, "{line}");
    assert_eq!(sent, replayed.len(), "{line}");
    eprintln!(
        "replay: {} replayed ({} from before the loss, already delivered); {tally:?}",
        replayed.len(),
        replayed
            .iter()
            .filter(|s| s.payload["i"].as_u64() < Some(300))
            .count()
    );

    // --until: nothing created after it.
    let none = run_once(
        &[
            "replay",
            "--postgres-url",
            &pg.url(),
            "--since",
            &since,
            "--until",
            &since,
        ],
        &[],
    );
    assert!(none.status.success());
    assert!(none.stdout.is_empty(), "an empty range sends nothing");
}

/// The publication's owner sets `publish = 'update'` while the worker runs: pgoutput leaves out
/// the table-form messages committed meanwhile, for good. 0.2.1 carried on and never delivered
/// them (issue 34, item 6). Now the worker stops (exit 1) naming the change and the replay that
/// sends them; fixed and replayed, every message arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_publication_changed_while_running_stops_the_worker_with_the_replay_to_run() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.jsonl");
    let mut worker = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&live));
    pg.wait_for_slot(&db).await;
    publish_range(&db, "orders", 0, 100, 10, Storage::Table).await;
    wait_for_lines(&live, 100).await;
    let since = db
        .query_one(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    db.batch_execute("ALTER PUBLICATION pg_outbox SET (publish = 'update')")
        .await
        .unwrap();
    publish_range(&db, "orders", 100, 50, 10, Storage::Table).await;
    assert_eq!(worker.wait_exit(Duration::from_secs(30)).code(), Some(1));
    let log = worker.log();
    assert!(
        log.contains("does not stream exactly the inserts") && log.contains("replay --since"),
        "{log}"
    );

    db.batch_execute("ALTER PUBLICATION pg_outbox SET (publish = 'insert')")
        .await
        .unwrap();
    let _worker = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&live));
    publish_range(&db, "orders", 150, 50, 10, Storage::Table).await;
    let replayed = run_once(
        &["replay", "--postgres-url", &pg.url(), "--since", &since],
        &[],
    );
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    let after = dir.path().join("replayed.jsonl");
    std::fs::write(&after, &replayed.stdout).unwrap();
    wait_for_lines(&live, 150).await;
    // Every message, once at least (the replayed ones arrive after later ones of their key: a
    // recovery, as after a lost slot).
    let arrived: HashSet<u64> = [&live, &after]
        .into_iter()
        .flat_map(|p| read_json_lines(p))
        .map(|s| s.payload["i"].as_u64().unwrap())
        .collect();
    let missing: Vec<u64> = (0..200).filter(|i| !arrived.contains(i)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
}
