//! The worker with its zero-config stdout sink against a real PostgreSQL: the JSON line format,
//! graceful stop, PostgreSQL restarts, an idle outbox on a busy database, an unroutable queue.

use std::time::Duration;

use outbox_tests::postgres::column;
use outbox_tests::publish::{
    check_delivery, only_dead_letter, publish_range, publish_rolled_back, read_json_lines,
    stdout_file, wait_for_lines, Storage,
};
use outbox_tests::worker::run_once;
use outbox_tests::{eventually, PgCluster, Worker};

#[tokio::test(flavor = "multi_thread")]
async fn zero_config_prints_each_committed_message_as_one_json_line() {
    let pg = PgCluster::start().await;
    let (_dir, out) = stdout_file();
    let mut worker = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&out));
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    db.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY);
         BEGIN;
         INSERT INTO orders VALUES (1);
         SELECT outbox.publish('orders', '{\"order\": 1, \"total\": 12.50}', '{\"traceparent\": \"00-abc\"}', 'o-1');
         COMMIT;
         BEGIN; SET LOCAL pg_outbox.storage = 'wal';
         SELECT outbox.publish('orders', '{\"order\": 2}', '{}', 'o-2');
         COMMIT;
         SELECT outbox.publish_bytes('blobs', '\\x00ff', '{}', NULL);",
    )
    .await
    .unwrap();
    publish_rolled_back(&db, "orders", Storage::Table).await;
    publish_rolled_back(&db, "orders", Storage::Wal).await;
    db.batch_execute("SELECT outbox.publish('orders', '{\"last\": true}')")
        .await
        .unwrap();
    wait_for_lines(&out, 4).await;

    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{text}");
    let first = lines[0].as_object().unwrap();
    assert_eq!(
        first.keys().map(String::as_str).collect::<Vec<_>>(),
        ["created_at", "headers", "id", "key", "payload", "queue"]
    );
    assert_eq!(lines[0]["queue"], "orders");
    assert_eq!(lines[0]["key"], "o-1");
    assert_eq!(
        lines[0]["payload"],
        serde_json::json!({"order": 1, "total": 12.50})
    );
    assert_eq!(
        lines[0]["headers"],
        serde_json::json!({"traceparent": "00-abc"})
    );
    assert!(lines[0]["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        lines[1]["payload"],
        serde_json::json!({"order": 2}),
        "wal form"
    );
    assert_eq!(lines[2]["payload_base64"], "AP8=");
    assert!(lines[2].get("payload").is_none());
    assert_eq!(lines[2]["key"], serde_json::Value::Null);
    assert_eq!(
        lines[3]["payload"],
        serde_json::json!({"last": true}),
        "the rolled-back ones never came"
    );
    let ids: Vec<uuid::Uuid> = column(&db, "SELECT id FROM outbox.messages ORDER BY id").await;
    assert!(ids.iter().any(|id| id.to_string() == lines[0]["id"]));

    // SIGTERM: drains, confirms what was delivered, exits 0, and leaves the slot free.
    let status = worker.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}:\n{}", worker.log());
    let lag = pg.slot_lag(&db).await;
    assert!(
        lag < 1024,
        "slot confirmed up to the end after a graceful stop, lag {lag}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restart_mid_stream_loses_nothing() {
    let pg = PgCluster::start().await;
    let (_dir, out) = stdout_file();
    let worker = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&out));
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    const TOTAL: u64 = 20_000;
    publish_range(&db, "orders", 0, TOTAL / 2, 50, Storage::Mixed).await;
    // Restart while the worker is still streaming the first half.
    pg.restart();
    let db = pg.superuser().await;
    publish_range(&db, "orders", TOTAL / 2, TOTAL / 2, 50, Storage::Mixed).await;

    wait_for_lines(&out, TOTAL as usize).await;
    let tally = check_delivery(&read_json_lines(&out), TOTAL);
    eprintln!("postgres restart: {tally:?}");
    assert!(
        worker.log().contains("replication connection lost"),
        "{}",
        worker.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_outbox_does_not_hold_back_wal_that_other_tables_write() {
    let pg = PgCluster::start().await;
    let _worker = Worker::start(&["run", "--postgres-url", &pg.url()], None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    db.batch_execute("SELECT outbox.publish('orders', '{}')")
        .await
        .unwrap();

    // ≥ 50 MB of WAL from a table the outbox does not publish.
    db.batch_execute("CREATE TABLE busy (id bigint, filler text)")
        .await
        .unwrap();
    let start: i64 = db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
        .await
        .unwrap()
        .get(0);
    for _ in 0..12 {
        db.batch_execute(
            "INSERT INTO busy SELECT i, repeat('x', 400) FROM generate_series(1, 10000) i",
        )
        .await
        .unwrap();
    }
    let written: i64 = db
        .query_one(
            "SELECT (pg_current_wal_lsn() - '0/0')::bigint - $1",
            &[&start],
        )
        .await
        .unwrap()
        .get(0);
    assert!(written >= 50 << 20, "wrote only {written} bytes of WAL");

    let (pg, db) = (&pg, &db);
    eventually(
        Duration::from_secs(60),
        "the slot to follow the server",
        || async move { pg.slot_lag(db).await < 1 << 20 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_without_a_route_is_dead_lettered_and_the_stream_moves_on() {
    let pg = PgCluster::start().await;
    let config = Worker::config_file(
        "[sinks.out]\ntype = \"stdout\"\n[[routes]]\nqueues = \"orders.*\"\nsink = \"out\"\n",
    );
    let (_dir, out) = stdout_file();
    let args = [
        "run",
        "--postgres-url",
        &pg.url(),
        "--config",
        config.path().to_str().unwrap(),
    ];
    let mut worker = Worker::start(&args, Some(&out));
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    let lost: uuid::Uuid = db
        .query_one("SELECT outbox.publish('audit', '{\"n\": 2}')", &[])
        .await
        .unwrap()
        .get(0);
    db.batch_execute("SELECT outbox.publish('orders.created', '{\"n\": 3}')")
        .await
        .unwrap();
    wait_for_lines(&out, 1).await;
    assert_eq!(
        read_json_lines(&out)[0].payload["n"],
        3,
        "the stream moved on"
    );
    let (id, destination, error, attempts) = only_dead_letter(&db).await;
    assert_eq!(id, lost);
    assert_eq!(destination, "(no route)");
    assert_eq!(error, "no route matches queue \"audit\"");
    assert_eq!(attempts, 1);
    assert!(
        worker.log().contains("no route matches queue"),
        "{}",
        worker.log()
    );

    // Fix the config (a catch-all route), redrive: delivered with the same id.
    worker.terminate(Duration::from_secs(30));
    let (_dir2, out2) = stdout_file();
    let _fixed = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&out2));
    pg.wait_for_slot(&db).await;
    db.batch_execute("SELECT outbox.redrive('audit')")
        .await
        .unwrap();
    wait_for_lines(&out2, 1).await;
    assert_eq!(read_json_lines(&out2)[0].id, lost.to_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_worker_takes_over_when_the_active_one_is_killed() {
    let pg = PgCluster::start().await;
    let (_dir, out_a) = stdout_file();
    let (_dir_b, out_b) = stdout_file();
    let args = ["run", "--postgres-url", &pg.url()];
    let mut active = Worker::start(&args, Some(&out_a));
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    let standby = Worker::start(&args, Some(&out_b));
    // The standby waits for the slot.
    let (standby_ref, db_ref) = (&standby, &db);
    eventually(
        Duration::from_secs(20),
        "the standby to report a busy slot",
        || async move {
            standby_ref
                .log()
                .contains("slot is active in another process")
        },
    )
    .await;
    let first = slot_holder(db_ref).await;

    const TOTAL: u64 = 20_000;
    let publisher = {
        let db = pg.superuser().await;
        tokio::spawn(
            async move { publish_range(&db, "orders", 0, TOTAL, 50, Storage::Mixed).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    active.kill();
    let killed = std::time::Instant::now();
    eventually(
        Duration::from_secs(10),
        "the standby to hold the slot",
        || async move {
            let pid = slot_holder(db_ref).await;
            pid.is_some() && pid != first
        },
    )
    .await;
    let takeover = killed.elapsed();
    publisher.await.unwrap();

    let (out_b_ref, out_a_ref) = (&out_b, &out_a);
    eventually(
        Duration::from_secs(60),
        "all messages across both workers",
        || async move {
            let mut ids = std::collections::HashSet::new();
            for p in [out_a_ref, out_b_ref] {
                ids.extend(read_json_lines(p).into_iter().map(|s| s.id));
            }
            ids.len() as u64 >= TOTAL
        },
    )
    .await;
    let all: Vec<_> = [&out_a, &out_b]
        .into_iter()
        .flat_map(|p| read_json_lines(p))
        .collect();
    let tally = check_delivery(&all, TOTAL);
    eprintln!("standby takeover after SIGKILL: {takeover:?}; {tally:?}");
    assert!(
        !read_json_lines(&out_b).is_empty(),
        "the standby delivered the rest"
    );
    // The wait is announced once, and the replication library's own error line (once a second)
    // is not repeated.
    let log = standby.log();
    assert_eq!(
        log.matches("slot is active in another process").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("replication worker terminated"), "{log}");
}

/// The pid of the walsender holding the slot, if any.
async fn slot_holder(db: &tokio_postgres::Client) -> Option<i32> {
    db.query_one(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'pg_outbox'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn sslmode_require_streams_over_tls_where_plain_connections_are_refused() {
    let pg = PgCluster::start_tls_only().await;
    let plain = run_once(
        &[
            "setup",
            "--postgres-url",
            &format!("{}?sslmode=disable", pg.url()),
        ],
        &[],
    );
    assert!(!plain.status.success(), "the cluster refuses plain TCP");
    assert!(String::from_utf8_lossy(&plain.stderr).contains("cannot connect to PostgreSQL"));

    let (_dir, out) = stdout_file();
    let url = format!("{}?sslmode=require", pg.url());
    let _worker = Worker::start(&["run", "--postgres-url", &url], Some(&out));
    let db = pg.socket_client().await;
    pg.wait_for_slot(&db).await;
    db.batch_execute("SELECT outbox.publish('orders', '{\"over\": \"tls\"}')")
        .await
        .unwrap();
    wait_for_lines(&out, 1).await;
    assert_eq!(read_json_lines(&out)[0].payload["over"], "tls");
    let ssl_walsender: bool = db
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl_walsender, "the replication connection uses TLS");
}

/// The extension and the worker together against forgery: a role without grants cannot write a
/// `pg_outbox` message at all; what a privileged hand writes that breaks the publish rules
/// (garbage, an invalid queue) is quarantined, not delivered, and does not stop the stream; a
/// legitimate publish right after both is delivered.
#[tokio::test(flavor = "multi_thread")]
async fn forged_and_garbage_messages_are_never_delivered_and_never_stop_the_worker() {
    let pg = PgCluster::start().await;
    let (_dir, out) = stdout_file();
    let mut worker = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&out));
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    db.batch_execute("CREATE ROLE stranger LOGIN")
        .await
        .unwrap();
    let forged = r#"{"v":1,"id":"01a208bd-0000-7000-8000-000000000001","queue":"payments","key":"acct-7","created_at":"2026-11-23T00:00:00Z","headers":{},"payload":{"refund":1000000}}"#;
    let refused = pg
        .connect_as("stranger")
        .await
        .execute(
            "SELECT pg_logical_emit_message(true, 'pg_outbox', $1::text)",
            &[&forged],
        )
        .await
        .expect_err("a role without grants emitted a pg_outbox message");
    let refused = refused
        .as_db_error()
        .expect("a server error")
        .message()
        .to_owned();
    assert!(refused.contains("permission denied"), "{refused}");
    let bad_queue = forged.replace("\"payments\"", "\"pay/ments\"");
    emit_then_publish_one_legit(
        &pg,
        &db,
        &["garbage", bad_queue.as_str()],
        "",
        &out,
        &worker,
    )
    .await;
    assert!(
        worker.exited().is_none(),
        "the worker stopped:\n{}",
        worker.log()
    );
    let quarantined: Vec<(String, String)> = db
        .query(
            "SELECT convert_from(payload_bytes, 'UTF8'), error FROM outbox.dead_letters
              WHERE destination = 'quarantine' ORDER BY failed_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(quarantined.len(), 2, "{quarantined:?}");
    assert_eq!(quarantined[0].0, "garbage");
    assert!(
        quarantined[1].1.contains("invalid queue name"),
        "{quarantined:?}"
    );
    // A quarantined message is not redriven by accident.
    let redriven: i64 = db
        .query_one("SELECT outbox.redrive('(quarantine)')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(redriven, 0);
    worker.terminate(Duration::from_secs(10));
}

/// Quarantine keeps one row per message, and a message no table column can hold (a `\u0000`
/// that jsonb refuses) is quarantined instead of stalling the stream. 0.2.0: two identical
/// garbage messages left one row, and the NUL one was delivered (or, without a route, its
/// dead-letter insert failed for ever and stalled every later message).
#[tokio::test(flavor = "multi_thread")]
async fn identical_garbage_is_quarantined_once_each_and_a_nul_never_stalls_the_stream() {
    let pg = PgCluster::start().await;
    let (_dir, out) = stdout_file();
    let mut worker = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&out));
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    let nul = r#"{"v":1,"id":"01a208bd-0000-7000-8000-000000000002","queue":"payments","key":"k","created_at":"2026-11-23T00:00:00Z","headers":{},"payload":{"a":"x\u0000y"}}"#;
    db.batch_execute("BEGIN").await.unwrap();
    // A NUL in the reason too: the uuid crate quotes the bad id raw.
    let nul_id = r#"{"v":1,"id":"\u0000bc","queue":"q","key":null,"created_at":"2026-11-23T00:00:00Z","headers":{},"payload":1}"#;
    emit_then_publish_one_legit(
        &pg,
        &db,
        &["garbage", "garbage", nul, nul_id],
        "COMMIT;",
        &out,
        &worker,
    )
    .await;
    let errors: Vec<String> = db
        .query(
            "SELECT error FROM outbox.dead_letters WHERE destination = 'quarantine' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors[2].contains("NUL"), "{errors:?}");
    assert!(errors[3].contains("\\u0000"), "{errors:?}");
    worker.terminate(Duration::from_secs(10));
}

/// Emits each of `contents` as a `pg_outbox` logical message, runs `before_publish`, publishes one
/// legitimate message, and checks that it alone was delivered and the slot moved past them all.
async fn emit_then_publish_one_legit(
    pg: &PgCluster,
    db: &tokio_postgres::Client,
    contents: &[&str],
    before_publish: &str,
    out: &std::path::Path,
    worker: &Worker,
) {
    for content in contents {
        db.execute(
            "SELECT pg_logical_emit_message(true, 'pg_outbox', $1::text)",
            &[content],
        )
        .await
        .unwrap();
    }
    db.batch_execute(&format!(
        "{before_publish} SELECT outbox.publish('payments', '{{\"legit\": true}}', '{{}}', 'k')"
    ))
    .await
    .unwrap();
    wait_for_lines(out, 1).await;
    eventually(
        Duration::from_secs(10),
        "the slot to confirm past the quarantined messages",
        || async move { pg.slot_lag(db).await < 1024 },
    )
    .await;
    let delivered = read_json_lines(out);
    assert_eq!(delivered.len(), 1, "{}", worker.log());
    assert_eq!(delivered[0].payload["legit"], true);
}
