//! What waiting cannot fix stops the worker with exit status 1 and a hint, instead of a retry
//! loop: a missing right, a wrong password, a dropped publication, a closed stdout, and above all
//! a lost slot, which is never created again behind the operator's back. And what waiting can
//! fix (a dead-letter table that is locked) never keeps the worker from stopping on SIGTERM.

use std::io::BufRead;
use std::process::Stdio;
use std::time::Duration;

use outbox_tests::postgres::{count, free_port};
use outbox_tests::publish::{read_json_lines, stdout_file, wait_for_lines, Seen};
use outbox_tests::worker::{http_get, run_once, stdout_to};
use outbox_tests::{eventually, PgCluster, Worker};

const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// Runs `outbox-worker ARGS` (with `env`) and expects it to stop by itself with status 1, its
/// log holding every one of `expected`.
fn expect_exit_1(args: &[&str], env: &[(&str, &str)], expected: &[&str]) -> String {
    let mut worker = Worker::start_with(args, env, None);
    let status = worker.wait_exit(EXIT_WITHIN);
    let log = worker.log();
    assert_eq!(status.code(), Some(1), "{log}");
    for text in expected {
        assert!(log.contains(text), "{text:?} missing from:\n{log}");
    }
    log
}

fn setup(pg: &PgCluster) {
    let out = run_once(&["setup", "--postgres-url", &pg.url()], &[]);
    assert!(out.status.success(), "{out:?}");
}

async fn slot_count(db: &tokio_postgres::Client) -> i64 {
    count(db, "SELECT count(*) FROM pg_replication_slots").await
}

/// The operator's way out of a lost slot: `setup --new-slot`, then a worker that delivers
/// message `{"n": n}`, published after it started. Returns what that worker wrote.
async fn new_slot_then_deliver(pg: &PgCluster, db: &tokio_postgres::Client, n: i32) -> Vec<Seen> {
    let out = run_once(&["setup", "--new-slot", "--postgres-url", &pg.url()], &[]);
    assert!(out.status.success(), "{out:?}");
    let (_dir, out) = stdout_file();
    let mut worker = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&out));
    pg.wait_for_slot(db).await;
    db.execute(
        "SELECT outbox.publish('orders', jsonb_build_object('n', $1::int))",
        &[&n],
    )
    .await
    .unwrap();
    wait_for_lines(&out, 1).await;
    worker.terminate(Duration::from_secs(10));
    read_json_lines(&out)
}

/// Runs a worker until it delivered one message, then stops it: the slot has been used.
async fn deliver_one_and_stop(pg: &PgCluster, db: &tokio_postgres::Client) {
    let (_dir, out) = stdout_file();
    let mut worker = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&out));
    pg.wait_for_slot(db).await;
    db.batch_execute("SELECT outbox.publish('orders', '{\"n\": 0}')")
        .await
        .unwrap();
    wait_for_lines(&out, 1).await;
    assert!(worker.terminate(EXIT_WITHIN).success());
}

/// The time the error names: "every message committed before <time> was delivered".
fn delivered_before(log: &str) -> chrono::DateTime<chrono::Utc> {
    let start = log
        .find("committed before ")
        .unwrap_or_else(|| panic!("no time in:\n{log}"))
        + "committed before ".len();
    let time = &log[start..start + "2026-01-01T00:00:00Z".len()];
    time.parse().unwrap_or_else(|e| panic!("{time:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_dropped_while_the_worker_was_down_stops_it_and_says_what_may_be_missing() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    deliver_one_and_stop(&pg, &db).await;

    db.batch_execute("SELECT pg_drop_replication_slot('pg_outbox')")
        .await
        .unwrap();
    let id: uuid::Uuid = db
        .query_one("SELECT outbox.publish('orders', '{\"n\": 1}')", &[])
        .await
        .unwrap()
        .get(0);
    let missing_table: chrono::DateTime<chrono::Utc> = db
        .query_one(
            "SELECT created_at FROM outbox.messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    db.batch_execute(
        "SET pg_outbox.storage = 'wal'; SELECT outbox.publish('orders', '{\"n\": 2}'); RESET pg_outbox.storage",
    )
    .await
    .unwrap();

    let log = expect_exit_1(
        &["run", "--postgres-url", &pg.url()],
        &[],
        &[
            "replication slot \"pg_outbox\" does not exist",
            "may not have been",
            "outbox-worker setup --new-slot",
        ],
    );
    assert_eq!(slot_count(&db).await, 0, "the slot was not created again");
    // The time it names is early enough to find the message that went missing in table form.
    assert!(
        delivered_before(&log) <= missing_table,
        "{} is after the missing message's {missing_table}",
        delivered_before(&log)
    );

    // The operator's way out: a new slot on purpose; then delivery goes on.
    let seen: Vec<_> = new_slot_then_deliver(&pg, &db, 3)
        .await
        .iter()
        .map(|s| s.payload["n"].clone())
        .collect();
    assert_eq!(seen, [3], "only what the new slot saw");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalidated_slot_stops_the_worker_until_setup_makes_a_new_one() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    deliver_one_and_stop(&pg, &db).await;

    // Let the slot keep at most 1 MB of WAL, then write and recycle a few segments.
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        "SELECT pg_reload_conf()",
        "CREATE TABLE filler (t text)",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    let (db_ref,) = (&db,);
    eventually(
        Duration::from_secs(60),
        "the slot to be invalidated",
        || async move {
            for sql in [
                "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 5000)",
                "SELECT pg_switch_wal()",
                "CHECKPOINT",
            ] {
                db_ref.batch_execute(sql).await.unwrap();
            }
            count(
                db_ref,
                "SELECT count(*) FROM pg_replication_slots WHERE wal_status = 'lost'",
            )
            .await
                == 1
        },
    )
    .await;

    expect_exit_1(
        &["run", "--postgres-url", &pg.url()],
        &[],
        &[
            "replication slot \"pg_outbox\" was invalidated",
            "outbox-worker setup --new-slot",
        ],
    );
    for sql in [
        "ALTER SYSTEM RESET max_slot_wal_keep_size",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    new_slot_then_deliver(&pg, &db, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_dropped_under_a_running_worker_stops_it() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    let mut worker = Worker::start(&["run", "--postgres-url", &pg.url()], None);
    pg.wait_for_slot(&db).await;
    let db_ref = &db;
    eventually(
        Duration::from_secs(20),
        "the slot to be dropped between two connections",
        || async move {
            let _ = db_ref
                .batch_execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active",
                )
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            db_ref
                .batch_execute("SELECT pg_drop_replication_slot('pg_outbox')")
                .await
                .is_ok()
        },
    )
    .await;
    let status = worker.wait_exit(EXIT_WITHIN);
    let log = worker.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("replication slot \"pg_outbox\""), "{log}");
    assert!(log.contains("setup --new-slot"), "{log}");
    assert_eq!(slot_count(&db).await, 0, "the slot was not created again");
}

/// A worker role made by `create`, on a set-up database: refused at start with `expected`.
async fn role_is_refused(create: &str, expected: &[&str]) -> String {
    let pg = PgCluster::start().await;
    pg.superuser().await.batch_execute(create).await.unwrap();
    setup(&pg);
    expect_exit_1(
        &["run", "--postgres-url", &pg.url_of("relay", "postgres")],
        &[],
        expected,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_without_replication_stops_the_worker_with_a_hint() {
    role_is_refused(
        "CREATE ROLE relay LOGIN; GRANT outbox_relay TO relay",
        &[
            "role \"relay\" may not stream",
            "ALTER ROLE relay REPLICATION (on Amazon RDS and Aurora: GRANT rds_replication TO relay)",
        ],
    )
    .await;
}

/// Amazon RDS and Aurora grant replication through membership in `rds_replication`, Neon through
/// `neon_superuser`, not the REPLICATION attribute: the start-up check lets such a role through.
/// This server is neither, so its walsender refuses the role, and that refusal still stops the
/// worker with a hint.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_of_a_managed_services_replication_role_passes_the_start_up_check() {
    for service_role in ["rds_replication", "neon_superuser"] {
        let log = role_is_refused(
            &format!(
                "CREATE ROLE {service_role};
                 CREATE ROLE relay LOGIN IN ROLE {service_role}, outbox_relay"
            ),
            &[
                "must be superuser or replication role",
                "the worker's role lacks a right it needs",
                "GRANT rds_replication TO",
            ],
        )
        .await;
        assert!(
            !log.contains("may not stream a replication slot"),
            "{service_role}: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_that_cannot_write_dead_letters_is_refused_at_start() {
    role_is_refused(
        "CREATE ROLE relay LOGIN REPLICATION",
        &[
            "cannot write outbox.dead_letters",
            "GRANT outbox_relay TO relay",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_stops_the_worker_with_a_hint() {
    let pg = PgCluster::start_with_passwords().await;
    pg.superuser()
        .await
        .batch_execute(
            "CREATE ROLE relay LOGIN REPLICATION PASSWORD 'right'; GRANT outbox_relay TO relay",
        )
        .await
        .unwrap();
    setup(&pg);
    let url = format!("postgres://relay:wrong@127.0.0.1:{}/postgres", pg.port);
    // Without start-up setup, the replication connection is the first to meet the password.
    let log = expect_exit_1(
        &["run", "--postgres-url", &url],
        &[("OUTBOX_POSTGRES__SETUP", "false")],
        &[
            "password authentication failed",
            "hint: check the user and password",
        ],
    );
    assert!(!log.contains("wrong"), "the password is not logged:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_publication_stops_the_worker_with_a_hint() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    let config = Worker::config_file("[postgres]\npublication = \"relay\"\n");
    let args = [
        "run",
        "--postgres-url",
        &pg.url(),
        "--config",
        config.path().to_str().unwrap(),
    ];
    let (_dir, out) = stdout_file();
    let mut worker = Worker::start(&args, Some(&out));
    pg.wait_for_slot(&db).await;
    db.batch_execute("SELECT outbox.publish('orders', '{\"n\": 0}')")
        .await
        .unwrap();
    wait_for_lines(&out, 1).await;
    assert!(worker.terminate(EXIT_WITHIN).success());

    db.batch_execute("DROP PUBLICATION relay; SELECT outbox.publish('orders', '{\"n\": 1}')")
        .await
        .unwrap();
    expect_exit_1(
        &args,
        &[("OUTBOX_POSTGRES__SETUP", "false")],
        &[
            "publication \"relay\" does not exist",
            "outbox-worker setup",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_stdout_stops_the_worker() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    let mut worker = Worker::start_with(
        &["run", "--postgres-url", &pg.url()],
        &[],
        Some(Stdio::piped()),
    );
    let stdout = worker.take_stdout();
    pg.wait_for_slot(&db).await;
    db.batch_execute("SELECT outbox.publish('orders', '{\"n\": 0}')")
        .await
        .unwrap();
    // Read one line, then go away as `| head -1` would.
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    })
    .await
    .unwrap();
    assert!(first.contains("\"n\": 0"), "{first}");
    db.batch_execute("SELECT outbox.publish('orders', jsonb_build_object('n', i)) FROM generate_series(1, 100) i")
        .await
        .unwrap();
    let status = worker.wait_exit(EXIT_WITHIN);
    let log = worker.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("cannot write to stdout"), "{log}");
    // Nothing after the first message was confirmed: the next run delivers all of it.
    let (_dir, out) = stdout_file();
    let _worker = Worker::start(&["run", "--postgres-url", &pg.url()], Some(&out));
    wait_for_lines(&out, 100).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_write_that_hangs_reads_not_ready_and_sigterm_still_stops_the_worker() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    let config = Worker::config_file(
        "[sinks.out]\ntype = \"stdout\"\n[[routes]]\nqueues = \"orders.*\"\nsink = \"out\"\n",
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let args = [
        "run",
        "--postgres-url",
        &pg.url(),
        "--config",
        config.path().to_str().unwrap(),
        "--http-listen",
        &listen,
    ];
    let (_dir, out) = stdout_file();
    let mut worker = Worker::start_with(&args, &[], Some(stdout_to(&out)));
    pg.wait_for_slot(&db).await;
    let listen_ref = &listen;
    let ready = |code: u16| async move {
        http_get(listen_ref, "/health/ready").is_ok_and(|(status, _)| status == code)
    };
    eventually(Duration::from_secs(20), "ready", || ready(200)).await;

    // An operator's long transaction holds the dead-letter table.
    let locker = pg.superuser().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE outbox.dead_letters IN EXCLUSIVE MODE")
        .await
        .unwrap();
    db.batch_execute(
        "SELECT outbox.publish('audit', '{\"n\": 1}'); SELECT outbox.publish('orders.created', '{\"n\": 2}')",
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(20), "not ready", || ready(503)).await;

    let status = worker.terminate(Duration::from_secs(15));
    assert!(status.success(), "{}", worker.log());
    locker.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.dead_letters").await,
        0
    );
    assert!(read_json_lines(&out).is_empty(), "the stream waited");

    // Nothing was confirmed past the dead letter: the next run writes it and goes on.
    let _worker = Worker::start_with(&args, &[], Some(stdout_to(&out)));
    wait_for_lines(&out, 1).await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.dead_letters WHERE queue = 'audit'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wal_level_below_logical_stops_the_worker_with_a_hint() {
    let pg = PgCluster::start_with_conf("wal_level = replica\n").await;
    // Without start-up setup (which would say it first), streaming meets it.
    expect_exit_1(
        &["run", "--postgres-url", &pg.url()],
        &[("OUTBOX_POSTGRES__SETUP", "false")],
        &["wal_level", "hint: set wal_level = logical"],
    );
    // With it (the default), start-up setup says it first, with the same hint line (0.2.0: none).
    expect_exit_1(
        &["run", "--postgres-url", &pg.url()],
        &[],
        &["wal_level", "hint: set wal_level = logical"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_right_revoked_mid_run_stops_the_worker_at_the_dead_letter_it_cannot_write() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    db.batch_execute("CREATE ROLE relay LOGIN REPLICATION; GRANT outbox_relay TO relay")
        .await
        .unwrap();
    setup(&pg);
    let config = Worker::config_file(
        "[sinks.out]\ntype = \"stdout\"\n[[routes]]\nqueues = \"orders.*\"\nsink = \"out\"\n",
    );
    let url = pg.url_of("relay", "postgres");
    let args = [
        "run",
        "--postgres-url",
        &url,
        "--config",
        config.path().to_str().unwrap(),
    ];
    let mut worker = Worker::start(&args, None);
    pg.wait_for_slot(&db).await;
    // Two transactions: logical decoding may hand a transaction to the worker before its commit
    // is visible to other sessions, so a REVOKE committed with the message could still let the
    // worker write its dead letter (seen in CI under load).
    db.batch_execute("REVOKE outbox_relay FROM relay")
        .await
        .unwrap();
    db.batch_execute("SELECT outbox.publish('audit', '{}')")
        .await
        .unwrap();
    let status = worker.wait_exit(EXIT_WITHIN);
    let log = worker.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("permission denied"), "{log}");
    assert!(
        log.contains("hint: the worker's role lacks a right it needs: outbox_relay"),
        "{log}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.dead_letters").await,
        0
    );
}

/// An envelope from a newer pg_outbox is not guessed at, nor quarantined (it is genuine: only the
/// extension and superusers can write one): the worker stops and asks for an upgrade, and the
/// message stays unconfirmed for the upgraded worker.
#[tokio::test(flavor = "multi_thread")]
async fn a_newer_envelope_version_stops_the_worker_and_asks_for_an_upgrade() {
    let pg = PgCluster::start().await;
    let mut worker = Worker::start(&["run", "--postgres-url", &pg.url()], None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    let v2 = r#"{"v":2,"id":"01a208bd-0000-7000-8000-000000000003","queue":"q","key":null,"created_at":"2026-11-23T00:00:00Z","headers":{},"payload":1}"#;
    db.execute(
        "SELECT pg_logical_emit_message(true, 'pg_outbox', $1::text)",
        &[&v2],
    )
    .await
    .unwrap();
    let status = worker.wait_exit(EXIT_WITHIN);
    let log = worker.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("upgrade outbox-worker") && log.contains("hint:"),
        "{log}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.dead_letters").await,
        0,
        "not quarantined"
    );
}
