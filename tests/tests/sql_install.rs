//! The SQL install (`sql/pg_outbox.sql`, for servers that cannot load a C extension): generated
//! from the extension's own SQL files, installed by a role without superuser, the same errors as
//! the extension for every bad input, the same rights, and a worker delivering from it while
//! refusing wal-form messages anyone could write there.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use outbox_tests::postgres::{bad_inputs, column, count, expect_error, Install};
use outbox_tests::publish::{
    check_delivery, publish_range, read_json_lines, stdout_file, wait_for_lines, Storage,
};
use outbox_tests::{eventually, PgCluster, Worker};

#[test]
fn the_sql_install_is_generated_from_the_extensions_sql() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/build-sql-install");
    let out = Command::new(script).arg("--check").output().unwrap();
    assert!(
        out.status.success(),
        "sql/pg_outbox.sql drifted from pg_outbox/sql/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One cluster, two databases: `with_extension` and `with_sql`, pg_outbox installed one way in each.
async fn side_by_side() -> PgCluster {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    for (database, install) in [
        ("with_extension", Install::Extension),
        ("with_sql", Install::Sql),
    ] {
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        pg.install_in(install, database).await;
    }
    pg
}

/// The SQL install's error is the extension's: code, message and hint, but for the way to raise
/// the size limit, which the SQL install's hint names as its own (`outbox.set_setting`; the
/// extension's is a superuser's setting).
fn assert_same_error(
    sql: &(String, String, String),
    extension: &(String, String, String),
    statement: &str,
) {
    assert_eq!(
        (&sql.0, &sql.1),
        (&extension.0, &extension.1),
        "{statement}"
    );
    match extension
        .2
        .split_once("or raise pg_outbox.max_message_size (superuser")
    {
        Some((common, _)) => {
            assert!(sql.2.starts_with(common), "{statement}: {sql:?}");
            assert!(sql.2.contains("outbox.set_setting"), "{statement}: {sql:?}");
        }
        None => assert_eq!(sql.2, extension.2, "{statement}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_bad_input_gets_the_extensions_error_and_hint() {
    let pg = side_by_side().await;
    let extension = pg.connect_to("postgres", "with_extension").await;
    let sql = pg.connect_to("postgres", "with_sql").await;
    for (statement, message, hint) in bad_inputs() {
        let from_extension = expect_error(&extension, &statement).await;
        let from_sql = expect_error(&sql, &statement).await;
        assert!(from_sql.1.contains(message), "{statement}: {from_sql:?}");
        assert!(from_sql.2.contains(hint), "{statement}: {from_sql:?}");
        assert_same_error(&from_sql, &from_extension, &statement);
    }
    assert_eq!(count(&sql, "SELECT count(*) FROM outbox.messages").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_databases_settings_mean_what_they_mean_to_the_extension() {
    // The extension's settings are checked GUCs; here they are strings the script parses, so a
    // number without a unit, a unit, an upper-case value must come out the same.
    let pg = side_by_side().await;
    let admin = pg.superuser().await;
    for database in ["with_extension", "with_sql"] {
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {database} SET pg_outbox.max_message_size = '2';
                 ALTER DATABASE {database} SET pg_outbox.retention = '5400';"
            ))
            .await
            .unwrap();
    }
    let extension = pg.connect_to("postgres", "with_extension").await;
    let sql = pg.connect_to("postgres", "with_sql").await;
    for db in [&extension, &sql] {
        let retention: i32 = db
            .query_one("SELECT outbox._retention_seconds()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(retention, 5400, "a number without a unit is seconds");
        // '2' is 2kB: 1,500 bytes pass, 3,000 do not.
        db.batch_execute(
            "SET pg_outbox.storage = 'TABLE';
             SELECT outbox.publish('orders', to_jsonb(repeat('x', 1500)));",
        )
        .await
        .unwrap();
    }
    let too_large = "SELECT outbox.publish('orders', to_jsonb(repeat('x', 3000)))";
    let from_extension = expect_error(&extension, too_large).await;
    assert!(
        from_extension.1.contains("(2048 bytes)"),
        "{from_extension:?}"
    );
    assert_same_error(
        &expect_error(&sql, too_large).await,
        &from_extension,
        too_large,
    );

    // A value the extension refuses when it is set can only be refused when it is read here: by
    // every publish that the smallest valid limit (1kB) does not already allow.
    let (code, message, _) = expect_error(
        &extension,
        "ALTER DATABASE with_extension SET pg_outbox.max_message_size = '100B'",
    )
    .await;
    assert_eq!(code, "22023", "{message}");
    for value in ["lots", "-1 day", "0"] {
        admin
            .batch_execute(&format!(
                "ALTER DATABASE with_sql SET pg_outbox.retention = '{value}'"
            ))
            .await
            .unwrap();
        let sql = pg.connect_to("postgres", "with_sql").await;
        let (code, message, hint) = expect_error(&sql, "SELECT outbox.prune()").await;
        assert_eq!(code, "22023", "{value}: {message}");
        assert_eq!(
            message,
            format!("invalid value for parameter \"pg_outbox.retention\": \"{value}\"")
        );
        assert!(hint.contains("at least 1s"), "{hint}");
    }
    for value in ["100B", "1TB", "lots"] {
        admin
            .batch_execute(&format!(
                "ALTER DATABASE with_sql SET pg_outbox.max_message_size = '{value}'"
            ))
            .await
            .unwrap();
        let sql = pg.connect_to("postgres", "with_sql").await;
        let (code, message, hint) = expect_error(&sql, too_large).await;
        assert_eq!(code, "22023", "{value}: {message}");
        assert_eq!(
            message,
            format!("invalid value for parameter \"pg_outbox.max_message_size\": \"{value}\"")
        );
        assert!(hint.contains("from 1kB to 64MB"), "{hint}");
    }
    assert_eq!(count(&sql, "SELECT count(*) FROM outbox.messages").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_without_superuser_installs_it_and_the_rights_are_the_extensions() {
    let pg = PgCluster::start_sql_install().await;
    let db = pg.superuser().await;
    db.batch_execute(
        "CREATE ROLE app LOGIN; GRANT outbox_publisher TO app;
         CREATE ROLE stranger LOGIN;",
    )
    .await
    .unwrap();
    let app = pg.connect_as("app").await;
    let id: uuid::Uuid = app
        .query_one(
            "SELECT outbox.publish('orders', '{\"n\": 1}', '{}', 'k-1')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id.get_version_num(), 7, "a UUIDv7");
    assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
    let ids: Vec<uuid::Uuid> = column(
        &app,
        "SELECT outbox.publish_batch('orders', ARRAY['1', '2', '3']::jsonb[])",
    )
    .await;
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids ascend: {ids:?}");
    assert!(ids[0] > id);

    // What the extension refuses, this install refuses too.
    let stranger = pg.connect_as("stranger").await;
    for sql in [
        "SELECT outbox.publish('orders', '{}')",
        "INSERT INTO outbox.messages (id, queue, payload) VALUES (gen_random_uuid(), 'orders', '{}')",
    ] {
        let (code, message, _) = expect_error(&stranger, sql).await;
        assert_eq!(code, "42501", "{sql}: {message}");
    }
    let (_, message, _) = expect_error(
        &app,
        "INSERT INTO outbox.messages (id, queue, payload) VALUES (gen_random_uuid(), 'orders', '{}')",
    )
    .await;
    assert!(message.contains("permission denied"), "{message}");
    // The wal form is not offered: anyone could forge it here.
    let (code, message, hint) = expect_error(
        &app,
        "SET pg_outbox.storage = 'wal'; SELECT outbox.publish('orders', '{}')",
    )
    .await;
    assert_eq!(code, "0A000");
    assert!(
        message.contains("not available in the SQL install"),
        "{message}"
    );
    assert!(hint.contains("pg_outbox.storage = 'table'"), "{hint}");
    // A read-only transaction is refused as an INSERT would be.
    let (code, _, _) = expect_error(
        &app,
        "BEGIN READ ONLY; SELECT outbox.publish('orders', '{}')",
    )
    .await;
    assert_eq!(code, "25006");
    app.batch_execute("ROLLBACK").await.unwrap();
    // A publisher cannot raise the size limit: only the database's setting counts.
    app.batch_execute("SET pg_outbox.max_message_size = '64MB'")
        .await
        .unwrap();
    let (code, message, _) = expect_error(
        &app,
        "SELECT outbox.publish('orders', jsonb_build_object('pad', repeat('x', 600000)))",
    )
    .await;
    assert_eq!(code, "54000", "{message}");
    assert!(
        message.contains("more than pg_outbox.max_message_size (524288 bytes)"),
        "{message}"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.messages").await, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sessions_ids_ascend_even_when_the_clock_steps_back() {
    let pg = PgCluster::start_sql_install().await;
    let db = pg.superuser().await;
    // The session's id clock stands an hour ahead, as after the wall clock stepped back an hour.
    let ahead: i64 = db
        .query_one(
            "SELECT set_config('pg_outbox._last_micros',
                 ((extract(epoch FROM clock_timestamp()) + 3600) * 1000000)::bigint::text, false)::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let ids: Vec<uuid::Uuid> = column(
        &db,
        "SELECT outbox.publish('orders', '{}') UNION ALL
             SELECT * FROM outbox.publish_batch('orders', array_fill('{}'::jsonb, ARRAY[1000]))
             UNION ALL SELECT outbox.publish_bytes('orders', '\\x00')",
    )
    .await;
    assert_eq!(ids.len(), 1002);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids ascend");
    let (seconds, nanos) = ids[0].get_timestamp().unwrap().to_unix();
    let first_micros = seconds as i64 * 1_000_000 + nanos as i64 / 1_000;
    assert!(
        first_micros > ahead - 1_000,
        "the first id ({first_micros} µs) is not behind the session's clock ({ahead} µs)"
    );
}

/// The extension's writer refuses what it cannot honour itself (CHECK constraints, triggers...);
/// the SQL install writes with a plain INSERT, so every change to the table is honoured as for
/// any INSERT.
#[tokio::test(flavor = "multi_thread")]
async fn changes_to_the_table_are_honoured_as_by_an_insert() {
    let pg = PgCluster::start_sql_install().await;
    let db = pg.superuser().await;
    db.batch_execute(
        "ALTER TABLE outbox.messages ADD CHECK (queue <> 'forbidden');
         ALTER TABLE outbox.messages ALTER COLUMN key SET NOT NULL;
         CREATE FUNCTION public.stamp() RETURNS trigger LANGUAGE plpgsql AS
             'BEGIN NEW.headers := NEW.headers || ''{\"stamped\": \"yes\"}''; RETURN NEW; END';
         CREATE TRIGGER stamp BEFORE INSERT ON outbox.messages
             FOR EACH ROW EXECUTE FUNCTION public.stamp();",
    )
    .await
    .unwrap();
    let (code, message, _) =
        expect_error(&db, "SELECT outbox.publish('forbidden', '1', '{}', 'k')").await;
    assert_eq!(code, "23514", "{message}");
    let (code, message, _) = expect_error(&db, "SELECT outbox.publish('orders', '1')").await;
    assert_eq!(code, "23502", "{message}");
    let (code, message, _) = expect_error(
        &db,
        "SELECT outbox.publish_batch('orders', ARRAY['1', '2']::jsonb[], '{}', ARRAY['a', NULL])",
    )
    .await;
    assert_eq!(code, "23502", "{message}");
    db.batch_execute(
        "SELECT outbox.publish('orders', '1', '{}', 'k');
         SELECT outbox.publish_batch('orders', ARRAY['2', '3']::jsonb[], '{}', ARRAY['a', 'b']);",
    )
    .await
    .unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE headers ->> 'stamped' = 'yes'"
        )
        .await,
        3,
        "the trigger ran for every row"
    );
}

/// Upgrading in place while services publish (prepared statements, as a connection pool keeps
/// them): no publish fails, and every one is kept.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_under_load_fails_no_publish() {
    let pg = PgCluster::start_sql_install().await;
    let db = pg.superuser().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for _ in 0..4 {
        let client = pg.superuser().await;
        let stop = stop.clone();
        publishers.push(tokio::spawn(async move {
            let publish = client
                .prepare("SELECT outbox.publish('orders', '{\"n\": 1}', '{}', 'k')")
                .await
                .unwrap();
            let mut published = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client.execute(&publish, &[]).await.expect("publish");
                published += 1;
            }
            published
        }));
    }
    for round in 0..3 {
        db.batch_execute(&format!(
            "UPDATE outbox.sql_install SET build = 'earlier-{round}'"
        ))
        .await
        .unwrap();
        let upgrade = pg.run_sql_install("postgres");
        assert!(upgrade.status.success(), "{upgrade:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut published = 0;
    for publisher in publishers {
        published += publisher.await.expect("no publish failed");
    }
    assert!(published > 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.messages").await,
        published
    );
}

/// A role with no grant emits a 100 MB message under pg_outbox's prefix (open to it where the
/// SQL install is used). 0.2.1 quarantined it whole: +648 MB RSS for 128 MB and 128 MB into
/// `outbox.dead_letters`, repeatably (issue 34, item 5). The quarantine keeps the first 64 kB and
/// says how long it was, and the worker goes on. What one message costs: its replication frame
/// and one copy of its content (pgwire-replication copies a logical message out of its frame),
/// and with two back to back the first's copy may still be held while the second is read: at
/// most three times its size (seen: +207 MB for one, +269 MB for two on PostgreSQL 18), never a
/// copy per quarantine step.
#[tokio::test(flavor = "multi_thread")]
async fn a_huge_forged_message_is_quarantined_as_a_bounded_prefix() {
    const MB: u64 = 100;
    let pg = PgCluster::start_sql_install().await;
    let db = pg.superuser().await;
    db.batch_execute("GRANT outbox_relay TO installer; CREATE ROLE stranger LOGIN;")
        .await
        .unwrap();
    let (_dir, out) = stdout_file();
    let args = ["run", "--postgres-url", &pg.url_of("installer", "postgres")];
    let worker = Worker::start(&args, Some(&out));
    pg.wait_for_slot(&db).await;
    let rss = |field: &str| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", worker.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            / 1024
    };
    let before = rss("VmRSS:");
    let stranger = pg.connect_as("stranger").await;
    for _ in 0..2 {
        stranger
            .batch_execute(&format!(
                "SELECT pg_logical_emit_message(true, 'pg_outbox', repeat('x', {}))",
                MB * 1024 * 1024
            ))
            .await
            .unwrap();
    }
    db.batch_execute("SELECT outbox.publish('orders', '{\"after\": 1}', '{}', 'k')")
        .await
        .unwrap();
    let db = &db;
    eventually(
        Duration::from_secs(120),
        "both forged messages quarantined",
        || async move {
            count(
                db,
                "SELECT count(*) FROM outbox.dead_letters WHERE destination = 'quarantine'",
            )
            .await
                == 2
        },
    )
    .await;
    let out = out.clone();
    eventually(
        Duration::from_secs(60),
        "the next message delivered",
        || {
            let out = out.clone();
            async move { std::fs::read_to_string(&out).is_ok_and(|s| s.contains("\"after\"")) }
        },
    )
    .await;
    let kept: Vec<(i32, String)> = db
        .query(
            "SELECT length(payload_bytes), error FROM outbox.dead_letters WHERE destination = 'quarantine'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (length, error) in &kept {
        assert_eq!(*length, 64 * 1024, "{error}");
        assert!(
            error.contains(&format!("content of {} bytes", MB * 1024 * 1024)),
            "{error}"
        );
    }
    let peak = rss("VmHWM:");
    eprintln!("{MB} MB forged twice: RSS {before} MB before, peak {peak} MB");
    assert!(
        peak - before <= 3 * MB + 50,
        "peak RSS grew by {} MB for a {MB} MB message:\n{}",
        peak - before,
        worker.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_delivers_from_it_through_a_sigkill_and_refuses_forged_wal_messages() {
    const TOTAL: u64 = 5_000;
    let pg = PgCluster::start_sql_install().await;
    let db = pg.superuser().await;
    db.batch_execute("GRANT outbox_relay TO installer; CREATE ROLE stranger LOGIN;")
        .await
        .unwrap();
    let (_dir, out) = stdout_file();
    // The installer runs the worker: REPLICATION and outbox_relay, no superuser.
    let args = ["run", "--postgres-url", &pg.url_of("installer", "postgres")];
    let mut worker = Worker::start(&args, Some(&out));
    pg.wait_for_slot(&db).await;

    // A role with no grant at all writes a well-formed wal-form envelope: on the extension only
    // outbox.publish could; here pg_logical_emit_message is open to it.
    let stranger = pg.connect_as("stranger").await;
    stranger
        .batch_execute(
            "BEGIN; SELECT pg_logical_emit_message(true, 'pg_outbox',
               '{\"v\":1,\"id\":\"01890a5d-ac96-774b-bcce-b302099a8057\",\"queue\":\"orders\",\"key\":\"k-0\",\"headers\":{},\"payload\":{\"i\":0,\"forged\":true},\"created_at\":\"2026-01-01T00:00:00Z\"}');
             COMMIT;",
        )
        .await
        .unwrap();

    let publisher = {
        let db = pg.superuser().await;
        tokio::spawn(
            async move { publish_range(&db, "orders", 0, TOTAL, 20, Storage::Table).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.kill();
    let _worker = Worker::start(&args, Some(&out));
    publisher.await.unwrap();
    wait_for_lines(&out, TOTAL as usize).await;
    let out_ref = &out;
    eventually(Duration::from_secs(60), "every message", || async move {
        read_json_lines(out_ref)
            .iter()
            .map(|s| s.id.clone())
            .collect::<HashSet<_>>()
            .len() as u64
            >= TOTAL
    })
    .await;
    let seen = read_json_lines(&out);
    assert!(
        seen.iter().all(|s| s.payload.get("forged").is_none()),
        "the forged message was delivered"
    );
    let tally = check_delivery(&seen, TOTAL);
    eprintln!("SQL install, SIGKILL mid-stream: {tally:?}");
    let quarantined = count(
        &db,
        "SELECT count(*) FROM outbox.dead_letters WHERE destination = 'quarantine'
            AND error LIKE '%SQL install%' AND written_by = 'installer'",
    )
    .await;
    assert_eq!(
        quarantined, 1,
        "the forged message is kept aside, written by the worker's role"
    );
}

/// Moving from the SQL install to CREATE EXTENSION (a server that can load it now), with the
/// README's statements: the slot, the consumers' marks and the dead letters carry over, and the
/// worker goes on without losing a message.
#[tokio::test(flavor = "multi_thread")]
async fn moving_to_the_extension_keeps_the_slot_marks_and_dead_letters() {
    let pg = PgCluster::start_sql_install().await;
    let db = pg.superuser().await;
    db.batch_execute(
        "SELECT outbox.register_consumer('billing', 'outbox_consumer');
         SELECT outbox.try_mark_processed('billing', 'm-1');
         INSERT INTO outbox.dead_letters (id, queue, payload, created_at, destination, error, attempts)
              VALUES (gen_random_uuid(), 'orders', '{}', now(), 'kafka:orders', 'too large', 5);",
    )
    .await
    .unwrap();
    let (_dir, out) = stdout_file();
    let args = ["run", "--postgres-url", &pg.url()];
    let mut worker = Worker::start(&args, Some(&out));
    pg.wait_for_slot(&db).await;
    publish_range(&db, "orders", 0, 100, 5, Storage::Table).await;
    wait_for_lines(&out, 100).await;
    assert!(worker.terminate(Duration::from_secs(30)).success());
    publish_range(&db, "orders", 100, 100, 5, Storage::Table).await;

    let readme = include_str!("../../README.md");
    let start = readme
        .find("```sql\n-- SQL install → extension")
        .expect("the README's steps")
        + "```sql\n".len();
    let steps = &readme[start..start + readme[start..].find("```").unwrap()];
    db.batch_execute(steps).await.unwrap();

    let _worker = Worker::start(&args, Some(&out));
    publish_range(&db, "orders", 200, 100, 5, Storage::Mixed).await;
    wait_for_lines(&out, 300).await;
    check_delivery(&read_json_lines(&out), 300);
    let marked_again: bool = db
        .query_one("SELECT outbox.try_mark_processed('billing', 'm-1')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !marked_again,
        "a mark from before the move is still a duplicate"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.dead_letters").await,
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_extension WHERE extname = 'pg_outbox'"
        )
        .await,
        1
    );
}

/// What a logical slot sees: every committed publish (each form of call) as one INSERT into
/// outbox.messages, nothing of a rolled-back one.
/// Dead letters and redrive, prune by the database's retention, status: the SQL functions the
/// extension shares with this install, on this install.
#[tokio::test(flavor = "multi_thread")]
async fn redrive_prune_and_status_work() {
    let pg = PgCluster::start_sql_install().await;
    let db = pg.superuser().await;
    let id: uuid::Uuid = db
        .query_one(
            "INSERT INTO outbox.dead_letters (id, queue, key, payload, created_at, destination, error, attempts)
             VALUES ('01890a5d-ac96-774b-bcce-b302099a8057', 'orders', 'k', '{\"n\": 1}', now(), 'kafka:orders', 'too large', 5)
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let redriven: uuid::Uuid = db
        .query_one("SELECT outbox.redrive($1::uuid)", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(redriven, id, "the same id");
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.dead_letters").await,
        0
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.messages WHERE id = '01890a5d-ac96-774b-bcce-b302099a8057'").await,
        1
    );

    // Retention comes from the database's setting; a session's SET cannot shorten it.
    db.batch_execute("UPDATE outbox.messages SET created_at = now() - interval '2 hours'")
        .await
        .unwrap();
    db.batch_execute("SET pg_outbox.retention = '1s'")
        .await
        .unwrap();
    assert_eq!(
        count(&db, "SELECT outbox.prune()").await,
        0,
        "1 day by default"
    );
    db.batch_execute("ALTER DATABASE postgres SET pg_outbox.retention = '1h'")
        .await
        .unwrap();
    assert_eq!(count(&db, "SELECT outbox.prune()").await, 1);

    db.batch_execute("SELECT pg_create_logical_replication_slot('pg_outbox', 'pgoutput')")
        .await
        .unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.status() WHERE slot_name = 'pg_outbox' AND NOT active"
        )
        .await,
        1
    );
}

/// Deploy pipelines may run the script on every deploy: over the same version it changes
/// nothing; over an older install it upgrades in place, keeping every row; over a newer one it
/// stops before changing anything. (0.2.0 is the first SQL install: the older one is this one
/// marked 0.1.9 and missing what it would not have had, a function and a table.)
#[tokio::test(flavor = "multi_thread")]
async fn running_the_script_again_keeps_or_upgrades_in_place() {
    let pg = PgCluster::start_sql_install().await;
    let db = pg.superuser().await;
    db.batch_execute(
        "SELECT outbox.publish('orders', '{\"n\": 1}');
         SELECT outbox.register_consumer('billing', 'outbox_consumer');
         SELECT outbox.try_mark_processed('billing', 'm-1');",
    )
    .await
    .unwrap();
    let again = pg.run_sql_install("postgres");
    assert!(again.status.success(), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("already installed"),
        "{again:?}"
    );

    // Another build of the same version (a changed script, or one from before builds were
    // recorded) is upgraded too.
    // The extension's version (pg_outbox/Cargo.toml), which the SQL install takes.
    let version = include_str!("../../pg_outbox/Cargo.toml")
        .lines()
        .find_map(|line| line.strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .expect("pg_outbox's version");
    for (change, installed) in [
        (
            "UPDATE outbox.sql_install SET build = 'earlier'",
            format!("{version} (build earlier)"),
        ),
        (
            "ALTER TABLE outbox.sql_install DROP COLUMN build",
            format!("{version} to"),
        ),
    ] {
        db.batch_execute(&format!("{change}; DROP FUNCTION outbox.status()"))
            .await
            .unwrap();
        let rebuild = pg.run_sql_install("postgres");
        assert!(rebuild.status.success(), "{rebuild:?}");
        assert_eq!(
            String::from_utf8_lossy(&rebuild.stderr),
            "",
            "an upgrade is quiet"
        );
        assert!(
            String::from_utf8_lossy(&rebuild.stdout)
                .contains(&format!("upgrading the SQL install from {installed}")),
            "{rebuild:?}"
        );
        assert_eq!(count(&db, "SELECT count(*) FROM outbox.status()").await, 0);
    }

    db.batch_execute(
        "UPDATE outbox.sql_install SET version = '0.1.9';
         DROP FUNCTION outbox.status(); DROP TABLE outbox.slots;",
    )
    .await
    .unwrap();
    let upgrade = pg.run_sql_install("postgres");
    assert!(upgrade.status.success(), "{upgrade:?}");
    assert!(
        String::from_utf8_lossy(&upgrade.stdout).contains("upgrading the SQL install from 0.1.9"),
        "{upgrade:?}"
    );
    let db = pg.superuser().await;
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.messages").await, 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.processed_messages").await,
        1
    );
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.status()").await, 0);
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.slots").await, 0);
    let installed: String = db
        .query_one("SELECT version FROM outbox.sql_install", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(installed, version);
    // The functions and policies were made again: publishing and the consumers' rules work.
    db.batch_execute("SELECT outbox.publish('orders', '{\"n\": 2}')")
        .await
        .unwrap();
    let again: bool = db
        .query_one("SELECT outbox.try_mark_processed('billing', 'm-1')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!again);

    db.batch_execute("UPDATE outbox.sql_install SET version = '9.9.9'")
        .await
        .unwrap();
    let newer = pg.run_sql_install("postgres");
    let stderr = String::from_utf8_lossy(&newer.stderr);
    assert!(!newer.status.success());
    assert!(
        stderr.contains("the SQL install 9.9.9 is newer than this script"),
        "{stderr}"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM outbox.messages").await, 2);
}

/// An application transaction that publishes, then marks a message processed (a consumer that
/// publishes in its handler), while the script runs again as an upgrade: neither is deadlocked
/// nor aborted, in every interleaving: the transaction open (with a business write) before the
/// script starts, or with its publish done; the script running free, or held just before its end
/// (a session holds a lock its last statements need) so that the transaction's next statements
/// meet every lock it has taken.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_neither_deadlocks_nor_aborts_a_transaction_that_publishes_then_marks() {
    for publish_before_the_script in [false, true] {
        for hold_the_script in [false, true] {
            publish_and_mark_around_an_upgrade(publish_before_the_script, hold_the_script).await;
        }
    }
}

async fn publish_and_mark_around_an_upgrade(
    publish_before_the_script: bool,
    hold_the_script: bool,
) {
    let case = format!(
        "publish before the script: {publish_before_the_script}, script held: {hold_the_script}"
    );
    let pg = std::sync::Arc::new(PgCluster::start_sql_install().await);
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN IN ROLE outbox_publisher, outbox_consumer;
             SELECT outbox.register_consumer('billing', 'app');
             CREATE TABLE orders (id int); GRANT INSERT ON orders TO app;
             UPDATE outbox.sql_install SET build = 'older';",
        )
        .await
        .unwrap();
    let holder = pg.superuser().await;
    if hold_the_script {
        // The script's epilogue alters outbox.sql_install: it waits there, every earlier lock held.
        holder
            .batch_execute("BEGIN; LOCK TABLE outbox.sql_install IN ACCESS SHARE MODE")
            .await
            .unwrap();
    }
    let app = pg.connect_as("app").await;
    app.batch_execute("BEGIN; INSERT INTO orders VALUES (1)")
        .await
        .unwrap();
    if publish_before_the_script {
        app.batch_execute("SELECT outbox.publish('orders', '{\"n\": 1}', '{}', 'k')")
            .await
            .unwrap();
    }
    let script = {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.run_sql_install("postgres"))
    };
    // Until the script has finished or waits for a lock (held: on outbox.sql_install; free: only
    // on a lock of the application's transaction, as the script of 0.2.0 did, deadlocked).
    let watcher = pg.superuser().await;
    let watcher = &watcher;
    eventually(
        Duration::from_secs(30),
        "the script to wait or end",
        || async move {
            count(
                watcher,
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'installer'
                AND wait_event_type = 'Lock'",
            )
            .await
                > 0
                || count(
                    watcher,
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'installer'",
                )
                .await
                    == 0
        },
    )
    .await;
    let rest = if publish_before_the_script {
        "SELECT outbox.try_mark_processed('billing', 'm-1'); COMMIT"
    } else {
        "SELECT outbox.publish('orders', '{\"n\": 1}', '{}', 'k');
         SELECT outbox.try_mark_processed('billing', 'm-1'); COMMIT"
    };
    let app_task = tokio::spawn(async move { app.batch_execute(rest).await });
    tokio::time::sleep(Duration::from_millis(1500)).await; // past deadlock_timeout (1 s)
    if hold_the_script {
        holder.batch_execute("COMMIT").await.unwrap();
    }
    let app_result = tokio::time::timeout(Duration::from_secs(30), app_task)
        .await
        .unwrap_or_else(|_| panic!("{case}: the application transaction hangs"))
        .unwrap();
    if let Err(e) = &app_result {
        panic!(
            "{case}: the application transaction failed: {:?}",
            e.as_db_error().map(|d| (d.code().code(), d.message()))
        );
    }
    let out = tokio::time::timeout(Duration::from_secs(30), script)
        .await
        .unwrap_or_else(|_| panic!("{case}: the script hangs"))
        .unwrap();
    assert!(
        out.status.success(),
        "{case}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("upgrading the SQL install"),
        "{case}: {out:?}"
    );
    assert_eq!(
        count(&admin, "SELECT count(*) FROM outbox.messages").await,
        1,
        "{case}"
    );
    assert_eq!(
        count(&admin, "SELECT count(*) FROM outbox.processed_messages").await,
        1,
        "{case}"
    );
}
