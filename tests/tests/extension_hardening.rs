//! The extension tried as a hostile or careless user would: forged messages, oversized messages,
//! read-only transactions, concurrent index builds, altered tables, a million-element batch,
//! pg_dump and restore, consumers acting for each other, an adopted schema, FOR ALL TABLES
//! publications, settings read two ways, and a LATIN1 database. The tests that do not depend on
//! the C code's own checks run on the SQL install too (`on_both_installs!`).

use std::time::Duration;

use outbox_tests::postgres::{column, count, expect_error, Install};
use outbox_tests::publish::read_json_lines;
use outbox_tests::{eventually, on_both_installs, PgCluster, Worker};
use tokio_postgres::Client;

on_both_installs!(
    publish_in_a_read_only_transaction_is_refused_like_an_insert,
    publish_works_while_an_index_is_built_concurrently,
    a_million_element_batch_keeps_backend_memory_flat,
    pg_dump_and_restore_keep_messages_marks_and_dead_letters,
    one_consumer_cannot_mark_or_purge_for_another,
    prune_works_beside_a_publication_for_all_tables,
    prune_reads_retention_the_same_way_in_every_session,
);

/// Everything test_decoding decoded from `slot` so far, one change per line.
async fn decoded(db: &Client, slot: &str) -> String {
    db.query(
        "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL)",
        &[&slot],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect::<Vec<_>>()
    .join("\n")
}

fn outbox_messages_in(changes: &str) -> usize {
    changes.matches("prefix: pg_outbox").count()
        + changes.matches("table outbox.messages: INSERT").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_logical_messages_need_a_grant_nobody_has_by_default() {
    let pg = PgCluster::start().await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "SELECT pg_create_logical_replication_slot('probe', 'test_decoding');
             CREATE ROLE stranger LOGIN;
             CREATE ROLE app LOGIN IN ROLE outbox_publisher;",
        )
        .await
        .unwrap();
    let forged = r#"{"v":1,"id":"01a208bd-0000-7000-8000-000000000001","queue":"payments","key":"acct-7","created_at":"2026-11-23T00:00:00Z","headers":{},"payload":{"refund":1000000}}"#;
    for role in ["stranger", "app"] {
        let db = pg.connect_as(role).await;
        for sql in [
            format!("SELECT pg_logical_emit_message(true, 'pg_outbox', '{forged}')"),
            "SELECT pg_logical_emit_message(true, 'pg_outbox', 'garbage')".into(),
            "SELECT pg_logical_emit_message(true, 'pg_outbox', '\\x00'::bytea)".into(),
        ] {
            let (code, message, _) = expect_error(&db, &sql).await;
            assert_eq!(code, "42501", "{role}: {message}");
            assert!(message.contains("pg_logical_emit_message"), "{message}");
        }
    }
    let stranger = pg.connect_as("stranger").await;
    let (code, _, _) = expect_error(&stranger, "SELECT outbox.publish('payments', '{}')").await;
    assert_eq!(code, "42501");
    // The publisher's own path still writes wal-form messages.
    pg.connect_as("app")
        .await
        .batch_execute(
            "SET pg_outbox.storage = 'wal'; SELECT outbox.publish('payments', '{\"ok\": 1}')",
        )
        .await
        .unwrap();
    let changes = decoded(&admin, "probe").await;
    assert_eq!(outbox_messages_in(&changes), 1, "{changes}");
    assert!(!changes.contains("refund"), "{changes}");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_messages_are_refused_before_anything_reaches_wal() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    db.batch_execute("SELECT pg_create_logical_replication_slot('probe', 'test_decoding')")
        .await
        .unwrap();
    for storage in ["table", "wal"] {
        db.batch_execute(&format!("SET pg_outbox.storage = '{storage}'"))
            .await
            .unwrap();
        for sql in [
            "SELECT outbox.publish_bytes('big', convert_to(repeat('a', 600000), 'UTF8'))",
            "SELECT outbox.publish('big', to_jsonb(repeat('a', 600000)))",
            "SELECT outbox.publish_batch('big', ARRAY['1', to_jsonb(repeat('a', 600000))])",
            "SELECT outbox.publish('big', '1', '{}', repeat('k', 600000))",
        ] {
            let (code, message, hint) = expect_error(&db, sql).await;
            assert_eq!(code, "54000", "{storage}: {sql}: {message}");
            assert!(
                message.contains("more than pg_outbox.max_message_size (524288 bytes)"),
                "{message}"
            );
            assert!(hint.contains("publish a reference"), "{hint}");
        }
        // Just under the default limit: accepted.
        db.batch_execute(
            "SELECT outbox.publish_bytes('big', convert_to(repeat('a', 500000), 'UTF8'))",
        )
        .await
        .unwrap();
    }
    // The ceiling: 64MB at most, and a superuser setting.
    let (code, message, _) = expect_error(&db, "SET pg_outbox.max_message_size = '65MB'").await;
    assert_eq!(code, "22023", "{message}");
    db.batch_execute(
        "SET pg_outbox.max_message_size = '64MB'; SET pg_outbox.storage = 'wal';
         CREATE ROLE app LOGIN IN ROLE outbox_publisher",
    )
    .await
    .unwrap();
    let (code, _, _) = expect_error(
        &db,
        "SELECT outbox.publish_bytes('huge', convert_to(repeat('a', 65 * 1024 * 1024), 'UTF8'))",
    )
    .await;
    assert_eq!(code, "54000");
    // A publisher cannot raise its own limit: not before the library is loaded (the value is
    // discarded when it loads), not after.
    let app = pg.connect_as("app").await;
    app.batch_execute("SET pg_outbox.max_message_size = '64MB'")
        .await
        .unwrap();
    let (code, _, _) = expect_error(
        &app,
        "SELECT outbox.publish_bytes('big', convert_to(repeat('a', 600000), 'UTF8'))",
    )
    .await;
    assert_eq!(code, "54000");
    let (code, message, _) = expect_error(&app, "SET pg_outbox.max_message_size = '64MB'").await;
    assert_eq!(code, "42501", "{message}");

    let changes = decoded(&db, "probe").await;
    assert_eq!(
        outbox_messages_in(&changes),
        2,
        "only the two small messages: {changes:.300}"
    );
}

async fn publish_in_a_read_only_transaction_is_refused_like_an_insert(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let db = pg.superuser().await;
    db.batch_execute("SELECT pg_create_logical_replication_slot('probe', 'test_decoding')")
        .await
        .unwrap();
    for storage in ["table", "wal"] {
        for call in [
            "outbox.publish('ro', '{}')",
            "outbox.publish_bytes('ro', '\\x00')",
            "outbox.publish_batch('ro', ARRAY['1']::jsonb[])",
        ] {
            let sql = format!(
                "BEGIN READ ONLY; SET LOCAL pg_outbox.storage = '{storage}'; SELECT {call}; COMMIT"
            );
            let (code, message, _) = expect_error(&db, &sql).await;
            db.batch_execute("ROLLBACK").await.unwrap();
            assert_eq!(code, "25006", "{storage} {call}: {message}");
            assert!(message.contains("read-only transaction"), "{message}");
        }
    }
    let changes = decoded(&db, "probe").await;
    assert_eq!(outbox_messages_in(&changes), 0, "{changes}");
}

/// While CREATE INDEX CONCURRENTLY (or REINDEX CONCURRENTLY) waits for an open transaction, its
/// new index is not ready for inserts: publish must skip it as the executor does, and the index
/// must still end up with the row.
async fn publish_works_while_an_index_is_built_concurrently(install: Install) {
    let pg = PgCluster::start_install(install).await;
    for (n, ddl) in [
        "CREATE INDEX CONCURRENTLY messages_key ON outbox.messages (key)",
        "REINDEX INDEX CONCURRENTLY outbox.messages_key",
    ]
    .into_iter()
    .enumerate()
    {
        let holder = pg.superuser().await;
        holder
            .batch_execute("BEGIN; SELECT outbox.publish('q', '1', '{}', 'holder')")
            .await
            .unwrap();
        let builder = pg.superuser().await;
        let build = tokio::spawn(async move { builder.batch_execute(ddl).await });
        let db = pg.superuser().await;
        eventually(Duration::from_secs(30), "the index build to wait", || async {
            count(
                &db,
                "SELECT count(*) FROM pg_index WHERE indrelid = 'outbox.messages'::regclass AND NOT indisready",
            )
            .await
                == 1
        })
        .await;
        let key = format!("during-build-{n}");
        db.execute("SELECT outbox.publish('q', '2', '{}', $1)", &[&key])
            .await
            .expect("publish while an index is being built");
        holder.batch_execute("COMMIT").await.unwrap();
        build.await.unwrap().expect(ddl);
        let found: i64 = db
            .query_one(
                "SELECT count(*) FROM outbox.messages WHERE key = $1",
                &[&key],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(found, 1);
        db.batch_execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
            .await
            .unwrap();
        let plan: String = db
            .query("EXPLAIN SELECT * FROM outbox.messages WHERE key = 'x'", &[])
            .await
            .unwrap()[0]
            .get(0);
        assert!(plan.contains("Index Scan using messages_key"), "{plan}");
        let via_index: i64 = db
            .query_one(
                "SELECT count(*) FROM outbox.messages WHERE key = $1",
                &[&key],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(via_index, 1, "the concurrently built index lacks the row");
    }
}

/// Publish checks the table once and keeps what it found until PostgreSQL invalidates it: a
/// change committed by another session is seen by the next publish of a session that already
/// published, and undoing it makes publish work again.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_committed_by_another_session_is_seen_by_the_next_publish() {
    let pg = PgCluster::start().await;
    let publisher = pg.superuser().await;
    let admin = pg.superuser().await;
    let changes = [
        (
            "ALTER TABLE outbox.messages ADD CONSTRAINT c CHECK (queue <> 'x')",
            "ALTER TABLE outbox.messages DROP CONSTRAINT c",
            "has a CHECK constraint",
        ),
        (
            "CREATE FUNCTION t() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
          CREATE TRIGGER t BEFORE INSERT ON outbox.messages FOR EACH ROW EXECUTE FUNCTION t()",
            "DROP TRIGGER t ON outbox.messages; DROP FUNCTION t()",
            "has a trigger",
        ),
        (
            "CREATE INDEX e ON outbox.messages (lower(key))",
            "DROP INDEX outbox.e",
            "uses an expression or a predicate",
        ),
        (
            "ALTER TABLE outbox.messages ADD COLUMN x int",
            "ALTER TABLE outbox.messages DROP COLUMN x",
            "unexpected column \"x\"",
        ),
        (
            "ALTER TABLE outbox.messages RENAME TO gone",
            "ALTER TABLE outbox.gone RENAME TO messages",
            "table outbox.messages does not exist",
        ),
    ];
    for (change, undo, fragment) in changes {
        publisher
            .batch_execute("SELECT outbox.publish('q', '1')")
            .await
            .unwrap();
        admin.batch_execute(change).await.unwrap();
        let (_, message, _) = expect_error(&publisher, "SELECT outbox.publish('q', '2')").await;
        assert!(message.contains(fragment), "after {change}: {message}");
        admin.batch_execute(undo).await.unwrap();
        publisher
            .batch_execute("SELECT outbox.publish('q', '3')")
            .await
            .unwrap_or_else(|e| panic!("after {undo}: {e}"));
    }
    // A unique index added by another session is enforced by the next publish, not skipped
    // because the session knew the table without it.
    publisher
        .batch_execute("SELECT outbox.publish('q', '4', '{}', 'k')")
        .await
        .unwrap();
    admin
        .batch_execute("CREATE UNIQUE INDEX one_per_key ON outbox.messages (key)")
        .await
        .unwrap();
    let (code, message, _) =
        expect_error(&publisher, "SELECT outbox.publish('q', '5', '{}', 'k')").await;
    assert_eq!(code, "23505", "{message}");
}

/// Each change a careless operator could make to outbox.messages: refused with a clear error,
/// or honoured, never a crash and never a silent bypass.
#[tokio::test(flavor = "multi_thread")]
async fn publish_honours_or_refuses_every_change_to_the_table() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    let refused = [
        ("ALTER TABLE outbox.messages ALTER COLUMN id TYPE text", "55000", "column \"id\" has type text"),
        ("ALTER TABLE outbox.messages ALTER COLUMN key TYPE varchar(3)", "55000", "column \"key\" has type character varying(3)"),
        ("ALTER TABLE outbox.messages ADD COLUMN x int", "55000", "unexpected column \"x\""),
        ("ALTER TABLE outbox.messages ADD COLUMN x int GENERATED ALWAYS AS (1) STORED", "55000", "unexpected column \"x\""),
        ("ALTER TABLE outbox.messages DROP COLUMN headers", "55000", "column \"headers\" is missing"),
        ("ALTER TABLE outbox.messages ADD CHECK (queue <> 'x')", "0A000", "has a CHECK constraint"),
        ("ALTER TABLE outbox.messages ALTER COLUMN key SET NOT NULL", "23502", "null value in column \"key\""),
        ("CREATE FUNCTION pg_temp.t() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
          CREATE TRIGGER t BEFORE INSERT ON outbox.messages FOR EACH ROW EXECUTE FUNCTION pg_temp.t()", "0A000", "has a trigger"),
        ("CREATE TABLE queues (name text PRIMARY KEY); INSERT INTO queues VALUES ('q');
          ALTER TABLE outbox.messages ADD FOREIGN KEY (queue) REFERENCES queues", "0A000", "has a trigger"),
        ("CREATE RULE r AS ON INSERT TO outbox.messages DO ALSO NOTIFY x", "0A000", "has a rule"),
        ("ALTER TABLE outbox.messages ADD EXCLUDE USING btree (id WITH =)", "0A000", "is an exclusion constraint"),
        ("ALTER TABLE outbox.messages ADD UNIQUE (id) DEFERRABLE", "0A000", "has a trigger"),
        ("CREATE INDEX ON outbox.messages (lower(key))", "0A000", "uses an expression or a predicate"),
        ("CREATE INDEX ON outbox.messages (key) WHERE key IS NOT NULL", "0A000", "uses an expression or a predicate"),
    ];
    for (ddl, code, fragment) in refused {
        // A publish first, so that the session has checked the table and kept what it found:
        // the change in the same transaction must still be seen.
        db.batch_execute(&format!(
            "BEGIN; SELECT outbox.publish('q', '1', '{{}}', 'k'); {ddl}"
        ))
        .await
        .unwrap();
        let (actual, message, hint) = expect_error(&db, "SELECT outbox.publish('q', '1')").await;
        db.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(actual, code, "{ddl}: {message}");
        assert!(message.contains(fragment), "{ddl}: {message}");
        assert!(!hint.is_empty(), "{ddl}: no hint");
    }
    // Honoured: a dropped column is skipped, a unique index is enforced, NOT NULL on a column
    // that always has a value is satisfied.
    db.batch_execute(
        "BEGIN;
         ALTER TABLE outbox.messages ADD COLUMN x int;
         ALTER TABLE outbox.messages DROP COLUMN x;
         ALTER TABLE outbox.messages ALTER COLUMN payload_bytes DROP NOT NULL;
         CREATE UNIQUE INDEX messages_id ON outbox.messages (id);
         SELECT outbox.publish('q', '1', '{}', 'after-drop');",
    )
    .await
    .unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE key = 'after-drop'"
        )
        .await,
        1
    );
    let (code, message, _) = expect_error(
        &db,
        "SELECT outbox._publish_message(id, 'q', NULL, '1', NULL, '{}') FROM outbox.messages WHERE key = 'after-drop'",
    )
    .await;
    assert_eq!(code, "23505", "{message}");
    db.batch_execute("ROLLBACK").await.unwrap();
    // The backend survived all of it.
    assert_eq!(count(&db, "SELECT 1::bigint").await, 1);
}

/// Private (anonymous) memory of a backend, from /proc: shared buffers are not counted.
fn rss_anon_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn a_million_element_batch_keeps_backend_memory_flat(install: Install) {
    const ELEMENTS: i64 = 1_000_000;
    const BUDGET_MB: u64 = 64;
    let pg = PgCluster::start_install(install).await;
    pg.superuser()
        .await
        .batch_execute(&format!(
            "CREATE TABLE batch AS SELECT array_agg(to_jsonb(g)) AS payloads FROM generate_series(1, {ELEMENTS}) g"
        ))
        .await
        .unwrap();
    let db = pg.superuser().await;
    let pid: i32 = db
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // Warm the backend (catalog caches, the library) before the baseline.
    db.batch_execute("SELECT outbox.publish_batch('warm', ARRAY['1']::jsonb[])")
        .await
        .unwrap();
    let baseline = rss_anon_kb(pid);
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_anon_kb(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let published = count(
        &db,
        "SELECT count(*) FROM outbox.publish_batch('bulk', (SELECT payloads FROM batch))",
    )
    .await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    assert_eq!(published, ELEMENTS);
    let growth_mb = peak.saturating_sub(baseline) / 1024;
    println!("publish_batch of {ELEMENTS}: backend private memory grew by {growth_mb} MB (baseline {} MB)", baseline / 1024);
    assert!(
        growth_mb <= BUDGET_MB,
        "backend memory grew by {growth_mb} MB for {ELEMENTS} elements (budget {BUDGET_MB} MB)"
    );
}

/// Fills `database` with what a dump must keep: messages (table form), consumer registrations
/// and marks, dead letters. Returns the counts of each.
async fn fill(db: &Client) -> [i64; 4] {
    db.batch_execute(
        "SELECT outbox.publish_batch('orders', array_agg(to_jsonb(g)), '{\"h\": \"v\"}', array_agg('k' || g))
           FROM generate_series(1, 25) g;
         SELECT outbox.publish_bytes('blobs', '\\x00ff');
         SELECT outbox.register_consumer('billing', current_user::regrole);
         SELECT outbox.try_mark_processed('billing', 'm-' || g) FROM generate_series(1, 7) g;
         INSERT INTO outbox.dead_letters (id, queue, payload, created_at, destination, error, attempts)
              VALUES ('018f0000-0000-7000-8000-000000000001', 'orders', '{}', now(), 'kafka:orders', 'too large', 5);",
    )
    .await
    .unwrap();
    table_counts(db).await
}

async fn table_counts(db: &Client) -> [i64; 4] {
    let mut counts = [0; 4];
    for (i, table) in [
        "messages",
        "processed_messages",
        "dead_letters",
        "consumers",
    ]
    .iter()
    .enumerate()
    {
        counts[i] = count(db, &format!("SELECT count(*) FROM outbox.{table}")).await;
    }
    counts
}

async fn pg_dump_and_restore_keep_messages_marks_and_dead_letters(install: Install) {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    admin.batch_execute("CREATE DATABASE source").await.unwrap();
    for database in ["plain", "custom"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
    }
    pg.install_in(install, "source").await;
    let source = pg.connect_to("postgres", "source").await;
    let expected = fill(&source).await;
    assert_eq!(expected, [26, 7, 1, 1]);

    let dir = tempfile::tempdir().unwrap();
    let (plain, custom) = (dir.path().join("dump.sql"), dir.path().join("dump.custom"));
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    pg.client_program("pg_dump", &["-d", "source", "-f", &path(&plain)]);
    pg.client_program("pg_dump", &["-Fc", "-d", "source", "-f", &path(&custom)]);
    pg.client_program(
        "psql",
        &[
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-1",
            "-d",
            "plain",
            "-f",
            &path(&plain),
        ],
    );
    pg.client_program(
        "pg_restore",
        &[
            "--single-transaction",
            "--exit-on-error",
            "-d",
            "custom",
            &path(&custom),
        ],
    );

    for database in ["plain", "custom"] {
        let db = pg.connect_to("postgres", database).await;
        assert_eq!(table_counts(&db).await, expected, "{database}");
        assert_eq!(
            count(
                &db,
                "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'pg_outbox' AND schemaname = 'outbox' AND tablename = 'messages'"
            )
            .await,
            1,
            "{database}: publication pg_outbox streams outbox.messages"
        );
        // De-duplication survived: a mark from before the dump is still a duplicate.
        let again: bool = db
            .query_one("SELECT outbox.try_mark_processed('billing', 'm-3')", &[])
            .await
            .unwrap()
            .get(0);
        assert!(!again, "{database}: a restored mark was forgotten");
    }

    // The worker streams from the restored database.
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("stdout.jsonl");
    let mut worker = Worker::start(
        &["run", "--postgres-url", &pg.url_of("postgres", "plain")],
        Some(&out),
    );
    let db = pg.connect_to("postgres", "plain").await;
    eventually(Duration::from_secs(30), "the worker's slot", || async {
        count(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE database = 'plain' AND active",
        )
        .await
            == 1
    })
    .await;
    // The wal form exists only with the extension.
    let second = match install {
        Install::Extension => "BEGIN; SET LOCAL pg_outbox.storage = 'wal'; SELECT outbox.publish('after-restore', '{\"n\": 2}'); COMMIT;",
        Install::Sql => "SELECT outbox.publish('after-restore', '{\"n\": 2}');",
    };
    db.batch_execute(&format!(
        "SELECT outbox.publish('after-restore', '{{\"n\": 1}}'); {second}"
    ))
    .await
    .unwrap();
    eventually(
        Duration::from_secs(30),
        "2 messages from the restored database",
        || async { read_json_lines(&out).len() >= 2 },
    )
    .await;
    assert_eq!(read_json_lines(&out).len(), 2, "{}", worker.log());
    worker.terminate(Duration::from_secs(10));
}

async fn one_consumer_cannot_mark_or_purge_for_another(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE billing_svc LOGIN IN ROLE outbox_consumer;
             CREATE ROLE shipping_svc LOGIN IN ROLE outbox_consumer;
             CREATE ROLE ops LOGIN IN ROLE outbox_operator;",
        )
        .await
        .unwrap();
    let ops = pg.connect_as("ops").await;
    ops.batch_execute(
        "SELECT outbox.register_consumer('billing', 'billing_svc');
         SELECT outbox.register_consumer('shipping', 'shipping_svc');",
    )
    .await
    .unwrap();
    let billing = pg.connect_as("billing_svc").await;
    let shipping = pg.connect_as("shipping_svc").await;
    for (db, name) in [(&billing, "billing"), (&shipping, "shipping")] {
        let marked: bool = db
            .query_one("SELECT outbox.try_mark_processed($1, 'm-1')", &[&name])
            .await
            .unwrap()
            .get(0);
        assert!(marked);
    }
    // billing may not act as shipping, by any route.
    for sql in [
        "SELECT outbox.try_mark_processed('shipping', 'm-2')",
        "SELECT outbox.is_processed('shipping', 'm-1')",
    ] {
        let (code, message, hint) = expect_error(&billing, sql).await;
        assert_eq!(code, "42501", "{sql}");
        assert!(
            message.contains("may not act as consumer \"shipping\""),
            "{message}"
        );
        assert!(hint.contains("registered for role shipping_svc"), "{hint}");
    }
    let (code, message, hint) =
        expect_error(&billing, "SELECT outbox.try_mark_processed('nobody', 'm')").await;
    assert_eq!(code, "42501");
    assert!(
        message.contains("consumer \"nobody\" is not registered"),
        "{message}"
    );
    assert!(
        hint.contains("outbox.register_consumer('nobody', 'billing_svc')"),
        "{hint}"
    );
    let (code, message, _) = expect_error(
        &billing,
        "INSERT INTO outbox.processed_messages (consumer, message_id) VALUES ('shipping', 'm-2')",
    )
    .await;
    assert_eq!(code, "42501", "{message}");
    let (code, _, _) = expect_error(
        &billing,
        "SELECT outbox.register_consumer('shipping', 'billing_svc')",
    )
    .await;
    assert_eq!(code, "42501");
    // Purging everything billing can see leaves shipping's mark alone.
    assert_eq!(
        count(&billing, "SELECT outbox.purge_processed('0 s')").await,
        1
    );
    assert_eq!(
        count(&billing, "SELECT outbox.purge_processed('0 s', 'shipping')").await,
        0
    );
    billing
        .batch_execute("DELETE FROM outbox.processed_messages")
        .await
        .unwrap();
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM outbox.processed_messages WHERE consumer = 'shipping'"
        )
        .await,
        1
    );
    // The operator sees and purges every consumer's marks.
    assert_eq!(count(&ops, "SELECT outbox.purge_processed('0 s')").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_extension_refuses_a_schema_it_cannot_trust() {
    let pg = PgCluster::start_without_extension();
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE mallory LOGIN;
             CREATE SCHEMA outbox AUTHORIZATION mallory;",
        )
        .await
        .unwrap();
    pg.connect_as("mallory")
        .await
        .batch_execute(
            "CREATE FUNCTION outbox.publish(queue text, payload text) RETURNS uuid
             LANGUAGE sql AS 'SELECT gen_random_uuid()'",
        )
        .await
        .unwrap();
    let (code, message, hint) = expect_error(&admin, "CREATE EXTENSION pg_outbox").await;
    assert_eq!(code, "42501", "{message}");
    assert!(
        message.contains("schema outbox belongs to role mallory"),
        "{message}"
    );
    assert!(hint.contains("drop it"), "{hint}");
    // Owned by the installer but not empty: refused too.
    admin
        .batch_execute("ALTER SCHEMA outbox OWNER TO postgres")
        .await
        .unwrap();
    let (code, message, _) = expect_error(&admin, "CREATE EXTENSION pg_outbox").await;
    assert_eq!(code, "42P06", "{message}");
    assert!(message.contains("already contains objects"), "{message}");
    admin
        .batch_execute("DROP SCHEMA outbox CASCADE; CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
}

async fn prune_works_beside_a_publication_for_all_tables(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let db = pg.superuser().await;
    // (It also makes UPDATE need a replica identity, so rows are aged by pruning with 0 s.)
    db.batch_execute(
        "CREATE PUBLICATION everything FOR ALL TABLES;
         SELECT outbox.publish_batch('q', ARRAY['1', '2', '3']::jsonb[]);",
    )
    .await
    .unwrap();
    assert_eq!(count(&db, "SELECT outbox.prune('0 s')").await, 3);
    db.batch_execute("SELECT outbox.publish('q', '4')")
        .await
        .unwrap();
    assert_eq!(count(&db, "SELECT outbox.prune('0 s')").await, 1);
}

/// `pg_outbox.retention` set per database with a value the setting does not accept: read the
/// same way by a session that has published (library loaded) and by one that has not.
async fn prune_reads_retention_the_same_way_in_every_session(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "SELECT outbox.publish_batch('q', ARRAY['1', '2', '3']::jsonb[]);
             UPDATE outbox.messages SET created_at = now() - interval '36 hours';",
        )
        .await
        .unwrap();
    // A fresh session has not loaded the library, so this is stored unchecked.
    pg.superuser()
        .await
        .batch_execute("ALTER DATABASE postgres SET pg_outbox.retention = '2 days'")
        .await
        .unwrap();
    let mut pruned = Vec::new();
    for loads_library_first in [false, true] {
        let db = pg.superuser().await;
        db.batch_execute("BEGIN").await.unwrap();
        if loads_library_first {
            db.batch_execute("SELECT outbox.publish('other', '1')")
                .await
                .unwrap();
        }
        pruned.push(count(&db, "SELECT outbox.prune()").await);
        db.batch_execute("ROLLBACK").await.unwrap();
    }
    assert_eq!(
        pruned[0], pruned[1],
        "prune read pg_outbox.retention two ways: {pruned:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_latin1_database_sends_utf8_envelopes() {
    let pg = PgCluster::start_without_extension();
    pg.superuser()
        .await
        .batch_execute(
            "CREATE DATABASE latin TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'",
        )
        .await
        .unwrap();
    let db = pg.connect_to("postgres", "latin").await;
    db.batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    db.batch_execute("SELECT pg_create_logical_replication_slot('probe', 'pgoutput')")
        .await
        .unwrap();
    db.batch_execute(
        "SET pg_outbox.storage = 'wal';
         SELECT outbox.publish('q', '{\"name\": \"café\"}', '{\"h\": \"é\"}', 'clé');
         RESET pg_outbox.storage;
         SELECT outbox.publish('q', '{\"name\": \"café\"}', '{\"h\": \"é\"}', 'clé');",
    )
    .await
    .unwrap();
    let changes: Vec<Vec<u8>> = column(
        &db,
        "SELECT data FROM pg_logical_slot_get_binary_changes('probe', NULL, NULL,
                 'proto_version', '1', 'publication_names', 'pg_outbox', 'messages', 'true')",
    )
    .await;
    let envelope = changes
        .iter()
        .find_map(|c| {
            let start = c.windows(6).position(|w| w == b"{\"v\":1")?;
            Some(c[start..].to_vec())
        })
        .expect("a pg_outbox message");
    let envelope: serde_json::Value =
        serde_json::from_slice(&envelope).expect("the envelope is UTF-8 JSON");
    assert_eq!(envelope["key"], "clé");
    assert_eq!(envelope["headers"]["h"], "é");
    assert_eq!(envelope["payload"]["name"], "café");
    // The table form stores the text as any column; the worker's session converts it.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM outbox.messages WHERE key = 'clé' AND payload->>'name' = 'café'"
        )
        .await,
        1
    );
}
