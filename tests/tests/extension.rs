//! The extension against a real PostgreSQL cluster: what a logical slot sees, concurrent
//! de-duplication, privileges, and the error catalogue (message and hint of every bad input).
//! The tests that do not depend on the wal form run on the SQL install too (`on_both_installs!`).

use outbox_tests::postgres::{bad_inputs, column, expect_error, Install};
use outbox_tests::{on_both_installs, PgCluster};
use std::time::Duration;
use tokio_postgres::Client;

on_both_installs!(
    committed_publishes_are_decoded_in_every_storage_form_aborted_ones_are_not,
    the_publication_streams_inserts_but_not_pruning,
    concurrent_marks_of_the_same_id_let_exactly_one_through,
    a_rolled_back_mark_is_forgotten,
    a_role_with_only_execute_can_publish_but_not_write_the_table,
);

/// Publishes in every storage form the install offers (the SQL install: the table form only),
/// commits some and rolls back others, and reads the slot with test_decoding: exactly the
/// committed messages are decoded, with the documented wal encoding.
async fn committed_publishes_are_decoded_in_every_storage_form_aborted_ones_are_not(
    install: Install,
) {
    let pg = PgCluster::start_install(install).await;
    let db = pg.superuser().await;
    db.batch_execute("SELECT pg_create_logical_replication_slot('probe', 'test_decoding')")
        .await
        .unwrap();
    let forms: &[&str] = match install {
        Install::Extension => &["table", "wal"],
        Install::Sql => &["table"],
    };

    let mut committed = Vec::new();
    let mut aborted = Vec::new();
    for storage in forms {
        for (commit, ids) in [(true, &mut committed), (false, &mut aborted)] {
            db.batch_execute(&format!("BEGIN; SET LOCAL pg_outbox.storage = '{storage}'"))
                .await
                .unwrap();
            let id: uuid::Uuid = db
                .query_one(
                    "SELECT outbox.publish('orders', $1::text::jsonb, '{\"traceparent\": \"00-1\"}', 'customer-7')",
                    &[&format!("{{\"storage\": \"{storage}\", \"commit\": {commit}}}")],
                )
                .await
                .unwrap()
                .get(0);
            let batch: Vec<uuid::Uuid> = column(
                &db,
                "SELECT outbox.publish_batch('orders', ARRAY['1','2']::jsonb[])",
            )
            .await;
            let bytes: uuid::Uuid = db
                .query_one(
                    "SELECT outbox.publish_bytes('blobs', '\\x00ff'::bytea)",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            db.batch_execute(if commit { "COMMIT" } else { "ROLLBACK" })
                .await
                .unwrap();
            ids.push(id);
            ids.extend(batch);
            ids.push(bytes);
        }
    }

    let changes: Vec<String> = column(
        &db,
        "SELECT data FROM pg_logical_slot_get_changes('probe', NULL, NULL)",
    )
    .await;
    let decoded = changes.join("\n");
    for id in &committed {
        assert!(
            decoded.contains(&id.to_string()),
            "committed {id} not decoded:\n{decoded}"
        );
    }
    for id in &aborted {
        assert!(
            !decoded.contains(&id.to_string()),
            "aborted {id} was decoded:\n{decoded}"
        );
    }
    // Table form: one INSERT per message; wal form: one transactional pg_outbox message each.
    let inserts = changes
        .iter()
        .filter(|c| c.starts_with("table outbox.messages: INSERT"))
        .count();
    let messages: Vec<&String> = changes
        .iter()
        .filter(|c| c.starts_with("message: transactional: 1 prefix: pg_outbox"))
        .collect();
    assert_eq!((inserts, messages.len()), (4, 4 * (forms.len() - 1)));
    if install == Install::Extension {
        check_wal_envelopes(&messages, &committed[4..]);
    }
}

/// The wal encoding is one JSON object: the jsonb payload verbatim, bytes as base64. `messages`
/// and `ids`: one publish, a batch of two and one publish_bytes, committed in the wal form.
fn check_wal_envelopes(messages: &[&String], ids: &[uuid::Uuid]) {
    let envelopes: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| {
            serde_json::from_str(&m[m.find("content:").unwrap() + "content:".len()..]).unwrap()
        })
        .collect();
    let first = &envelopes[0];
    assert_eq!(first["v"], 1);
    assert_eq!(first["id"], ids[0].to_string());
    assert_eq!(first["queue"], "orders");
    assert_eq!(first["key"], "customer-7");
    assert_eq!(first["headers"]["traceparent"], "00-1");
    assert_eq!(
        first["payload"],
        serde_json::json!({"storage": "wal", "commit": true})
    );
    assert!(first["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(envelopes[1]["payload"], 1);
    assert!(envelopes[1]["key"].is_null());
    assert_eq!(envelopes[3]["payload_base64"], "AP8=");
    assert!(
        messages[0].contains(r#""payload":{"commit": true, "storage": "wal"}"#),
        "{}",
        messages[0]
    );
}

/// The publication streams inserts only: pruning deletes are never sent to the worker.
async fn the_publication_streams_inserts_but_not_pruning(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let db = pg.superuser().await;
    db.batch_execute("SELECT pg_create_logical_replication_slot('probe', 'pgoutput')")
        .await
        .unwrap();
    db.batch_execute("SELECT outbox.publish('q', '1'); SELECT outbox.publish('q', '2')")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let pruned: i64 = db
        .query_one("SELECT outbox.prune(interval '1s')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pruned, 2);
    // pgoutput message types: B(egin), R(elation), I(nsert), D(elete), C(ommit).
    let kinds: Vec<u8> = db
        .query(
            "SELECT get_byte(data, 0) FROM pg_logical_slot_get_binary_changes('probe', NULL, NULL,
               'proto_version', '1', 'publication_names', 'pg_outbox', 'messages', 'true')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, i32>(0) as u8)
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == b'I').count(),
        2,
        "{:?}",
        String::from_utf8_lossy(&kinds)
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == b'D').count(),
        0,
        "{:?}",
        String::from_utf8_lossy(&kinds)
    );
}

async fn concurrent_marks_of_the_same_id_let_exactly_one_through(install: Install) {
    let pg = PgCluster::start_install(install).await;
    register_consumers(&pg.superuser().await, &["billing"]).await;
    for (first_commits, expected_second) in [(true, false), (false, true)] {
        let id = uuid::Uuid::now_v7().to_string();
        let a = pg.superuser().await;
        let b = pg.superuser().await;
        a.batch_execute("BEGIN").await.unwrap();
        let first: bool = a
            .query_one("SELECT outbox.try_mark_processed('billing', $1)", &[&id])
            .await
            .unwrap()
            .get(0);
        assert!(first);
        let second = {
            let id = id.clone();
            tokio::spawn(async move {
                b.batch_execute("BEGIN").await.unwrap();
                let marked: bool = b
                    .query_one("SELECT outbox.try_mark_processed('billing', $1)", &[&id])
                    .await
                    .unwrap()
                    .get(0);
                b.batch_execute("COMMIT").await.unwrap();
                marked
            })
        };
        // The second caller must wait for the first transaction to end.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !second.is_finished(),
            "the second mark did not wait for the first transaction"
        );
        a.batch_execute(if first_commits { "COMMIT" } else { "ROLLBACK" })
            .await
            .unwrap();
        assert_eq!(
            second.await.unwrap(),
            expected_second,
            "first transaction committed: {first_commits}"
        );
        let marks: i64 = a
            .query_one(
                "SELECT count(*) FROM outbox.processed_messages WHERE message_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(marks, 1);
    }
}

async fn a_rolled_back_mark_is_forgotten(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let db = pg.superuser().await;
    register_consumers(&db, &["c"]).await;
    db.batch_execute("BEGIN").await.unwrap();
    let marked: bool = db
        .query_one("SELECT outbox.try_mark_processed('c', 'm-1')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(marked);
    db.batch_execute("ROLLBACK").await.unwrap();
    let processed: bool = db
        .query_one("SELECT outbox.is_processed('c', 'm-1')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!processed);
    let again: bool = db
        .query_one("SELECT outbox.try_mark_processed('c', 'm-1')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(again);
}

/// A login role holding only outbox_publisher can publish, and can touch nothing else.
async fn a_role_with_only_execute_can_publish_but_not_write_the_table(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN; GRANT outbox_publisher TO app; CREATE ROLE nobody LOGIN",
        )
        .await
        .unwrap();
    let app = pg.connect_as("app").await;
    app.query_one("SELECT outbox.publish('orders', '{\"n\": 1}')", &[])
        .await
        .unwrap();
    app.query(
        "SELECT outbox.publish_batch('orders', ARRAY['1','2']::jsonb[])",
        &[],
    )
    .await
    .unwrap();
    for forbidden in [
        "INSERT INTO outbox.messages (id, queue) VALUES (gen_random_uuid(), 'orders')",
        "SELECT count(*) FROM outbox.messages",
        "DELETE FROM outbox.messages",
        "SELECT outbox.redrive('orders')",
        "SELECT outbox._publish_message(gen_random_uuid(), 'q', NULL, '1', NULL, '{}')",
    ] {
        let (_, message, _) = expect_error(&app, forbidden).await;
        assert!(
            message.contains("permission denied"),
            "{forbidden}: {message}"
        );
    }
    let nobody = pg.connect_as("nobody").await;
    let (_, message, _) = expect_error(&nobody, "SELECT outbox.publish('orders', '{}')").await;
    assert_eq!(message, "permission denied for schema outbox");
    let count: i64 = admin
        .query_one("SELECT count(*) FROM outbox.messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 3);
}

/// Every bad input gets an ERROR that names the problem, with a hint.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_rejected_with_a_clear_error_and_hint() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    // Shared with the SQL install's parity test; a bad retention is refused when it is set here.
    let mut cases = bad_inputs();
    cases.push((
        "SET pg_outbox.retention = '0'".into(),
        "0 s is outside the valid range for parameter \"pg_outbox.retention\"",
        "",
    ));
    assert!(cases.len() >= 15);
    for (sql, message, hint) in &cases {
        let (_, got_message, got_hint) = expect_error(&db, sql).await;
        assert!(
            got_message.contains(message),
            "{sql}\n  message: {got_message}\n  expected: {message}"
        );
        assert!(
            got_hint.contains(hint),
            "{sql}\n  hint: {got_hint}\n  expected: {hint}"
        );
    }
    let count: i64 = db
        .query_one("SELECT count(*) FROM outbox.messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "a rejected publish wrote nothing");
}

/// pg_outbox.storage = 'wal' needs logical decoding; on wal_level = replica it says so.
#[tokio::test(flavor = "multi_thread")]
async fn wal_storage_requires_wal_level_logical() {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    db.batch_execute("ALTER SYSTEM SET wal_level = 'replica'")
        .await
        .unwrap();
    drop(db);
    pg.restart();
    let db = pg.superuser().await;
    let (_, message, hint) = expect_error(
        &db,
        "SET pg_outbox.storage = 'wal'; SELECT outbox.publish('q', '{}')",
    )
    .await;
    assert_eq!(
        message,
        "pg_outbox.storage = 'wal' needs wal_level = logical"
    );
    assert!(hint.contains("wal_level = logical"), "{hint}");
}

/// Registers consumer names for the connected role (an operator's step before a consumer marks).
async fn register_consumers(db: &Client, names: &[&str]) {
    for name in names {
        db.execute(
            "SELECT outbox.register_consumer($1, current_user::regrole)",
            &[name],
        )
        .await
        .unwrap();
    }
}
