//! Calls a careless or hostile database user makes (issue 30, item 4): each gets pg_outbox's own
//! error naming the problem, or does what it says, where 0.2.1 gave a raw PostgreSQL error, a
//! silent false, a forged record or ids out of order.

use outbox_tests::postgres::{column, count, expect_error, Install};
use outbox_tests::{on_both_installs, PgCluster};

on_both_installs!(
    only_workers_write_dead_letters_and_redrive_sends_only_theirs_naming_who_redrove,
    written_by_holds_under_session_replication_role_replica,
    over_long_names_and_ids_empty_names_and_huge_ages_get_clear_answers,
);

/// Issue 30, item 5: in 0.2.1 every operator could INSERT a dead letter and redrive it, so publish
/// anything, delivered as genuine. Now only members of outbox_relay (workers' roles) write dead
/// letters; redrive publishes only rows a worker wrote (or the table's owner vouched for), and
/// the message carries `outbox-redriven-by`, a reserved header no publisher can set, naming the
/// operator who redrove it.
async fn only_workers_write_dead_letters_and_redrive_sends_only_theirs_naming_who_redrove(
    install: Install,
) {
    let pg = PgCluster::start_install(install).await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE ops LOGIN IN ROLE outbox_operator;
             CREATE ROLE relay LOGIN IN ROLE outbox_relay;
             CREATE ROLE app LOGIN IN ROLE outbox_publisher;",
        )
        .await
        .unwrap();
    const LETTER: &str = "INSERT INTO outbox.dead_letters (id, queue, payload, headers, created_at, destination, error, attempts) VALUES";
    let ops = pg.connect_as("ops").await;
    let (code, message, _) = expect_error(
        &ops,
        &format!("{LETTER} ('018f0000-0000-7000-8000-000000000001', 'payments', '{{\"refund\": 1000000}}', '{{}}', now(), 'kafka:payments', 'x', 1)"),
    )
    .await;
    assert_eq!(
        code, "42501",
        "an operator writes no dead letter: {message}"
    );
    let relay = pg.connect_as("relay").await;
    // With a forged spelling of the redrive header (hostile review): it does not survive.
    relay
        .batch_execute(&format!(
            "{LETTER} ('018f0000-0000-7000-8000-000000000002', 'orders', '{{\"n\": 2}}', '{{\"trace\": \"t\", \"OUTBOX-REDRIVEN-BY\": \"ceo\"}}', now(), 'kafka:orders', 'x', 1)"
        ))
        .await
        .unwrap();
    // Rows from before (written_by NULL, or a person's role in 0.2.1), as the table's owner can
    // still write them: refused, and the hint says how to vouch for one.
    admin
        .batch_execute(&format!(
            "{LETTER} ('018f0000-0000-7000-8000-000000000003', 'orders', '{{\"n\": 3}}', '{{}}', now(), 'kafka:orders', 'x', 1);
             UPDATE outbox.dead_letters SET written_by = NULL WHERE id = '018f0000-0000-7000-8000-000000000003';
             {LETTER} ('018f0000-0000-7000-8000-000000000004', 'orders', '{{\"n\": 4}}', '{{}}', now(), 'kafka:orders', 'x', 1);
             UPDATE outbox.dead_letters SET written_by = 'ops' WHERE id = '018f0000-0000-7000-8000-000000000004';"
        ))
        .await
        .unwrap();
    for id in [
        "018f0000-0000-7000-8000-000000000003",
        "018f0000-0000-7000-8000-000000000004",
    ] {
        let (code, message, hint) =
            expect_error(&ops, &format!("SELECT outbox.redrive('{id}'::uuid)")).await;
        assert_eq!(code, "42501", "{message}");
        assert!(message.contains("not by a worker"), "{message}");
        assert!(hint.contains("vouch"), "{hint}");
    }
    let (code, _, _) = expect_error(&ops, "SELECT outbox.redrive('orders')").await;
    assert_eq!(
        code, "42501",
        "by queue too, and nothing of the queue is redriven"
    );
    admin
        .batch_execute(
            "DELETE FROM outbox.dead_letters WHERE id <> '018f0000-0000-7000-8000-000000000002'",
        )
        .await
        .unwrap();
    ops.batch_execute("SELECT outbox.redrive('orders')")
        .await
        .unwrap();
    let headers: Vec<serde_json::Value> = column(
        &admin,
        "SELECT headers FROM outbox.messages WHERE id = '018f0000-0000-7000-8000-000000000002'",
    )
    .await;
    assert_eq!(
        headers,
        [serde_json::json!({"trace": "t", "outbox-redriven-by": "ops"})]
    );
    // No publisher can set it.
    let app = pg.connect_as("app").await;
    let (code, message, _) = expect_error(
        &app,
        "SELECT outbox.publish('orders', '{}', '{\"outbox-redriven-by\": \"ops\"}')",
    )
    .await;
    assert_eq!(code, "22023", "{message}");
}

/// 0.2.1's trigger fired in the default mode only: a role allowed to SET
/// session_replication_role = replica (and to write dead letters) wrote one in another's name.
async fn written_by_holds_under_session_replication_role_replica(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE op LOGIN IN ROLE outbox_relay;
             GRANT SET ON PARAMETER session_replication_role TO op;",
        )
        .await
        .unwrap();
    let op = pg.connect_as("op").await;
    let (code, message, _) = expect_error(
        &op,
        "SET session_replication_role = replica;
         INSERT INTO outbox.dead_letters (id, queue, payload, created_at, destination, error, attempts, written_by)
              VALUES ('018f0000-0000-7000-8000-000000000001', 'orders', '{}', now(), 'kafka:orders', 'x', 1, 'worker')",
    )
    .await;
    assert_eq!(code, "42501", "{message}");
    assert!(message.contains("written_by"), "{message}");
    assert_eq!(
        count(&admin, "SELECT count(*) FROM outbox.dead_letters").await,
        0
    );
}

async fn over_long_names_and_ids_empty_names_and_huge_ages_get_clear_answers(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN IN ROLE outbox_consumer;
             SELECT outbox.register_consumer('billing', 'app');",
        )
        .await
        .unwrap();
    let app = pg.connect_as("app").await;
    // 0.2.1: 54000 "index row size ... exceeds btree version 4 maximum", naming neither.
    for (db, sql, argument) in [
        (
            &admin,
            "SELECT outbox.register_consumer(repeat('c', 4000), 'app')",
            "consumer",
        ),
        (
            &app,
            "SELECT outbox.try_mark_processed('billing', repeat('m', 4000))",
            "message_id",
        ),
        (
            &app,
            "SELECT outbox.is_processed('billing', repeat('m', 4000))",
            "message_id",
        ),
        (
            &app,
            "SELECT outbox.try_mark_processed(repeat('c', 4000), 'm')",
            "consumer",
        ),
    ] {
        let (code, message, hint) = expect_error(db, sql).await;
        assert_eq!(code, "22001", "{sql}: {message}");
        assert!(
            message.contains(&format!("{argument} is 4000 bytes, over 1000")),
            "{sql}: {message}"
        );
        assert!(!hint.is_empty(), "{sql}");
    }
    // 0.2.1 stored "unknown (OID=0)" for '-' (hostile review).
    let (code, message, _) =
        expect_error(&admin, "SELECT outbox.register_consumer('ghost', '-')").await;
    assert_eq!(code, "22023", "{message}");
    // 0.2.1 returned false, as for a name that was not registered.
    let (code, message, _) = expect_error(&admin, "SELECT outbox.unregister_consumer(NULL)").await;
    assert_eq!(code, "22004", "{message}");
    let (code, message, _) = expect_error(&admin, "SELECT outbox.unregister_consumer('')").await;
    assert_eq!(code, "22023", "{message}");
    // 0.2.1: 22008 "timestamp out of range". Nothing is that old: nothing goes.
    admin
        .batch_execute(
            "SELECT outbox.publish('orders', '{}');
             INSERT INTO outbox.processed_messages (consumer, message_id) VALUES ('billing', 'm-1');",
        )
        .await
        .unwrap();
    assert_eq!(
        count(&admin, "SELECT outbox.prune(interval '10000 years')").await,
        0
    );
    assert_eq!(
        count(
            &app,
            "SELECT outbox.purge_processed(interval '10000 years')"
        )
        .await,
        0
    );
    assert_eq!(
        count(&app, "SELECT outbox.purge_processed(interval '0')").await,
        1
    );
}

/// The SQL install's own settings and id clock (the extension has neither).
#[tokio::test(flavor = "multi_thread")]
async fn the_sql_installs_settings_and_id_clock_hold_against_careless_operators() {
    let pg = PgCluster::start_sql_install().await;
    let admin = pg.superuser().await;
    admin
        .batch_execute("CREATE ROLE op LOGIN IN ROLE outbox_operator, outbox_publisher")
        .await
        .unwrap();
    let op = pg.connect_as("op").await;
    // 0.2.1: 22003 "numeric value out of range" from pg_size_bytes.
    let (code, message, hint) = expect_error(
        &op,
        "SELECT outbox.set_setting('pg_outbox.max_message_size', '1e30')",
    )
    .await;
    assert_eq!(code, "22023", "{message}");
    assert!(message.contains("pg_outbox.max_message_size"), "{message}");
    assert!(hint.contains("64MB"), "{hint}");
    // 0.2.1 recorded the function's owner, the installer, whoever called.
    op.batch_execute("SELECT outbox.set_setting('pg_outbox.max_message_size', '2kB')")
        .await
        .unwrap();
    assert_eq!(
        column::<String>(&admin, "SELECT set_by::text FROM outbox.settings").await,
        ["op"]
    );
    // The size hint names the SQL install's way to raise the limit (0.2.1: "superuser").
    let (_, _, hint) = expect_error(
        &op,
        "SELECT outbox.publish('orders', jsonb_build_object('p', repeat('x', 4000)))",
    )
    .await;
    assert!(hint.contains("outbox.set_setting"), "{hint}");
    // Two operators at once: 0.2.1 gave the second a raw 23505 (both deleted, both inserted).
    let first = pg.connect_as("op").await;
    first
        .batch_execute("BEGIN; SELECT outbox.set_setting('pg_outbox.retention', '2d')")
        .await
        .unwrap();
    let second = tokio::spawn(async move {
        op.batch_execute("SELECT outbox.set_setting('pg_outbox.retention', '3d')")
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    first.batch_execute("COMMIT").await.unwrap();
    second
        .await
        .unwrap()
        .expect("the second set_setting waits, then wins");
    assert_eq!(
        column::<String>(
            &admin,
            "SELECT value FROM outbox.settings WHERE name = 'pg_outbox.retention'"
        )
        .await,
        ["3d"]
    );
    // A session that set its id clock two days ahead: 0.2.1 capped it at a day ahead of the
    // transaction's start, so every id after it in the transaction had the same time (their order
    // random). It is ignored now.
    admin
        .batch_execute(
            "SELECT set_config('pg_outbox._last_micros',
                 ((extract(epoch FROM now()) + 2 * 86400) * 1000000)::bigint::text, false)",
        )
        .await
        .unwrap();
    let ids: Vec<uuid::Uuid> = column(
        &admin,
        "SELECT outbox.publish('orders', jsonb_build_object('n', n)) FROM generate_series(1, 50) n",
    )
    .await;
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids ascend: {ids:?}");
}

/// The extension keeps the table it checked for the transaction; 0.2.1 opened it by that oid after
/// another session had dropped it and made another in its place (the extension dropped and
/// created again while the transaction's savepoint had released its lock): XX000 "could not open
/// relation with OID". It finds the new table by name now,
/// and checks it as any other.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_publishes_into_a_table_made_again_after_its_last_publish() {
    let pg = PgCluster::start().await;
    let admin = pg.superuser().await;
    let session = pg.superuser().await;
    // Its lock released with the savepoint: nothing holds the other session back.
    session
        .batch_execute(
            "BEGIN; SAVEPOINT s; SELECT outbox.publish('orders', '{\"n\": 1}'); ROLLBACK TO s",
        )
        .await
        .unwrap();
    admin
        .batch_execute("DROP EXTENSION pg_outbox CASCADE; CREATE EXTENSION pg_outbox;")
        .await
        .unwrap();
    match session
        .batch_execute("SELECT outbox.publish('orders', '{\"n\": 2}'); COMMIT")
        .await
    {
        Ok(()) => assert_eq!(
            count(&admin, "SELECT count(*) FROM outbox.messages").await,
            1
        ),
        Err(e) => {
            let e = e.as_db_error().expect("a server error");
            assert_ne!(e.code().code(), "XX000", "{}", e.message());
            assert!(e.message().contains("outbox.messages"), "{}", e.message());
        }
    }
}
