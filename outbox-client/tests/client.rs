//! outbox-client against a real PostgreSQL, with the extension and with the SQL install: the
//! client works unchanged on either.

use outbox_client::{Event, Headers, Inbox, Outbox, ProcessError, Processed};
use outbox_tests::postgres::Install;
use outbox_tests::{on_both_installs, PgCluster};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

on_both_installs!(
    publishes_with_the_callers_transaction,
    typed_events_bytes_and_batches_round_trip,
    process_once_skips_duplicates_and_forgets_failed_attempts,
    eight_concurrent_deliveries_run_the_handler_once,
    bad_input_is_a_typed_error_with_the_servers_message,
    no_client_statement_calls_a_function_planted_in_public,
);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct OrderPlaced {
    order_id: i64,
    customer: String,
}

impl Event for OrderPlaced {
    const QUEUE: &'static str = "orders";
    fn key(&self) -> Option<String> {
        Some(self.customer.clone())
    }
    fn headers(&self) -> Headers {
        Headers::new().with("event-type", "OrderPlaced")
    }
}

async fn decoded_changes(db: &tokio_postgres::Client) -> String {
    db.query(
        "SELECT data FROM pg_logical_slot_get_changes('probe', NULL, NULL)",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect::<Vec<_>>()
    .join("\n")
}

async fn publishes_with_the_callers_transaction(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let mut db = pg.superuser().await;
    db.batch_execute("CREATE TABLE orders (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    db.batch_execute("SELECT pg_create_logical_replication_slot('probe', 'test_decoding')")
        .await
        .unwrap();
    let outbox = Outbox::new();

    let tx = db.transaction().await.unwrap();
    tx.execute("INSERT INTO orders VALUES (1)", &[])
        .await
        .unwrap();
    let committed = outbox
        .publish_event(
            &tx,
            &OrderPlaced {
                order_id: 1,
                customer: "c-1".into(),
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let tx = db.transaction().await.unwrap();
    tx.execute("INSERT INTO orders VALUES (2)", &[])
        .await
        .unwrap();
    let rolled_back = outbox
        .publish_event(
            &tx,
            &OrderPlaced {
                order_id: 2,
                customer: "c-2".into(),
            },
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let changes = decoded_changes(&db).await;
    assert!(changes.contains(&committed.to_string()), "{changes}");
    assert!(!changes.contains(&rolled_back.to_string()), "{changes}");
    assert!(
        changes.contains("table public.orders: INSERT: id[bigint]:1"),
        "{changes}"
    );
    assert!(!changes.contains("id[bigint]:2"), "{changes}");
}

async fn typed_events_bytes_and_batches_round_trip(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let db = pg.superuser().await;
    let outbox = Outbox::new();
    let event = OrderPlaced {
        order_id: 7,
        customer: "c-7".into(),
    };
    let id = outbox.publish_event(&db, &event).await.unwrap();
    let row = db
        .query_one(
            "SELECT queue, key, payload, headers FROM outbox.messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "orders");
    assert_eq!(row.get::<_, String>(1), "c-7");
    assert_eq!(
        serde_json::from_value::<OrderPlaced>(row.get(2)).unwrap(),
        event
    );
    assert_eq!(
        row.get::<_, serde_json::Value>(3),
        serde_json::json!({"event-type": "OrderPlaced"})
    );

    let payloads: Vec<serde_json::Value> = (0..50).map(|n| serde_json::json!({ "n": n })).collect();
    let keys: Vec<Option<&str>> = (0..50)
        .map(|n| if n % 2 == 0 { Some("even") } else { None })
        .collect();
    let ids = outbox
        .publish_batch(
            &db,
            "numbers",
            &payloads,
            &Headers::new().with_traceparent("00-1-2-01"),
            Some(&keys),
        )
        .await
        .unwrap();
    assert_eq!(ids.len(), 50);
    let stored = db
        .query("SELECT id, (payload->>'n')::int, key, headers->>'traceparent' FROM outbox.messages WHERE queue = 'numbers' ORDER BY id", &[])
        .await
        .unwrap();
    for (n, row) in stored.iter().enumerate() {
        assert_eq!(
            row.get::<_, uuid::Uuid>(0),
            ids[n],
            "ids come back in payload order"
        );
        assert_eq!(
            row.get::<_, i32>(1),
            n as i32,
            "UUIDv7 order is publish order"
        );
        assert_eq!(row.get::<_, Option<String>>(2).as_deref(), keys[n]);
        assert_eq!(row.get::<_, String>(3), "00-1-2-01");
    }

    let bytes_id = outbox
        .publish_bytes(
            &db,
            "blobs",
            &[0, 159, 255],
            &Headers::new().with_content_type("application/x-protobuf"),
            Some("k"),
        )
        .await
        .unwrap();
    let row = db
        .query_one(
            "SELECT payload_bytes, headers->>'content-type' FROM outbox.messages WHERE id = $1",
            &[&bytes_id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), vec![0, 159, 255]);
    assert_eq!(row.get::<_, String>(1), "application/x-protobuf");
}

async fn process_once_skips_duplicates_and_forgets_failed_attempts(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let mut db = pg.superuser().await;
    db.batch_execute(
        "CREATE TABLE effects (message_id text);
         SELECT outbox.register_consumer('billing', current_user::regrole);
         SELECT outbox.register_consumer('audit', current_user::regrole);",
    )
    .await
    .unwrap();
    let inbox = Inbox::new("billing");

    let handler = async |tx: &tokio_postgres::Transaction<'_>| {
        tx.execute("INSERT INTO effects VALUES ('m-1')", &[])
            .await?;
        Ok::<_, tokio_postgres::Error>("charged")
    };
    assert_eq!(
        inbox.process_once(&mut db, "m-1", handler).await.unwrap(),
        Processed::Done("charged")
    );
    assert_eq!(
        inbox.process_once(&mut db, "m-1", handler).await.unwrap(),
        Processed::Duplicate
    );

    // A failing handler rolls back its writes and the mark: the redelivery runs it again.
    let failing = async |tx: &tokio_postgres::Transaction<'_>| {
        tx.execute("INSERT INTO effects VALUES ('m-2')", &[])
            .await
            .unwrap();
        Err::<(), _>("payment provider down")
    };
    match inbox.process_once(&mut db, "m-2", failing).await {
        Err(ProcessError::Handler(e)) => assert_eq!(e, "payment provider down"),
        other => panic!("expected the handler error, got {other:?}"),
    }
    let marked: bool = db
        .query_one("SELECT outbox.is_processed('billing', 'm-2')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!marked);
    let retried = inbox
        .process_once(
            &mut db,
            "m-2",
            async |tx: &tokio_postgres::Transaction<'_>| {
                tx.execute("INSERT INTO effects VALUES ('m-2')", &[])
                    .await
                    .map(|_| ())
            },
        )
        .await
        .unwrap();
    assert_eq!(retried, Processed::Done(()));
    let effects: Vec<String> = db
        .query("SELECT message_id FROM effects ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(effects, ["m-1", "m-2"]);

    // Another consumer processes the same id independently; purge forgets old marks.
    assert_eq!(
        Inbox::new("audit")
            .process_once(&mut db, "m-1", handler)
            .await
            .unwrap(),
        Processed::Done("charged")
    );
    db.batch_execute("UPDATE outbox.processed_messages SET processed_at = now() - interval '2 days' WHERE consumer = 'billing'")
        .await
        .unwrap();
    assert_eq!(
        inbox
            .purge(&db, std::time::Duration::from_secs(86_400))
            .await
            .unwrap(),
        2
    );
}

async fn eight_concurrent_deliveries_run_the_handler_once(install: Install) {
    let pg = Arc::new(PgCluster::start_install(install).await);
    let db = pg.superuser().await;
    db.batch_execute(
        "CREATE TABLE counter (n int); INSERT INTO counter VALUES (0);
         SELECT outbox.register_consumer('counter', current_user::regrole);",
    )
    .await
    .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let pg = pg.clone();
            tokio::spawn(async move {
                let mut client = pg.superuser().await;
                Inbox::new("counter")
                    .process_once(
                        &mut client,
                        "same-id",
                        async |tx: &tokio_postgres::Transaction<'_>| {
                            tx.execute("UPDATE counter SET n = n + 1", &[]).await?;
                            // Hold the transaction open so the others really overlap with it.
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            Ok::<_, tokio_postgres::Error>(())
                        },
                    )
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut done = 0;
    for task in tasks {
        if task.await.unwrap() == Processed::Done(()) {
            done += 1;
        }
    }
    assert_eq!(done, 1);
    let n: i32 = db
        .query_one("SELECT n FROM counter", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

async fn bad_input_is_a_typed_error_with_the_servers_message(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let db = pg.superuser().await;
    let outbox = Outbox::new();
    let cases = [
        (
            outbox
                .publish(&db, "bad queue", &1, &Headers::new(), None)
                .await
                .unwrap_err(),
            "outbox.publish: invalid queue name \"bad queue\": character ' ' is not allowed",
        ),
        (
            outbox
                .publish(&db, "q", &1, &Headers::new().with("outbox-id", "x"), None)
                .await
                .unwrap_err(),
            "outbox.publish: header \"outbox-id\" uses the reserved prefix \"outbox-\"",
        ),
        (
            outbox
                .publish(&db, "q", &1, &Headers::new().with("", "x"), None)
                .await
                .unwrap_err(),
            "outbox.publish: a header name is empty",
        ),
        (
            outbox
                .publish_batch(&db, "q", &[1, 2], &Headers::new(), Some(&[Some("a")]))
                .await
                .unwrap_err(),
            "outbox.publish_batch: payloads has 2 elements but keys has 1",
        ),
        (
            outbox
                .publish_bytes(&db, "", &[1], &Headers::new(), None)
                .await
                .unwrap_err(),
            "outbox.publish_bytes: invalid queue name \"\": it is empty",
        ),
    ];
    for (error, message) in cases {
        assert!(error.is_invalid_input(), "{error:?}");
        let outbox_client::Error::Server(server) = &error else {
            panic!("{error:?}")
        };
        assert_eq!(server.message, message);
        assert!(
            server.hint.as_deref().is_some_and(|h| !h.is_empty()),
            "{server:?}"
        );
        assert_eq!(server.code.code(), "22023");
    }
}

/// The client's statements run in the application's session, whose search_path it must not
/// change: they qualify every function. A role with CREATE on `public` plants a
/// `make_interval(secs text)`: 0.2.1's unqualified call in `purge` resolved to it (its parameter
/// then typed text, so every purge failed), and it would have run as the consumer (issue 34).
async fn no_client_statement_calls_a_function_planted_in_public(install: Install) {
    let pg = PgCluster::start_install(install).await;
    let mut db = pg.superuser().await;
    db.batch_execute(
        "CREATE ROLE mallory LOGIN;
         GRANT CREATE ON SCHEMA public TO mallory;
         SELECT outbox.register_consumer('billing', current_user::regrole);",
    )
    .await
    .unwrap();
    pg.connect_as("mallory")
        .await
        .batch_execute(
            "CREATE TABLE public.hijacked (via text);
             GRANT INSERT, SELECT ON public.hijacked TO PUBLIC;
             CREATE FUNCTION public.make_interval(secs text) RETURNS interval
               LANGUAGE sql AS $$ INSERT INTO public.hijacked VALUES ('make_interval');
                                  SELECT pg_catalog.make_interval(secs => secs::float8) $$;",
        )
        .await
        .unwrap();
    let outbox = Outbox::new();
    let tx = db.transaction().await.unwrap();
    let event = OrderPlaced {
        order_id: 1,
        customer: "c".into(),
    };
    outbox.publish_event(&tx, &event).await.unwrap();
    outbox
        .publish(&tx, "orders", &event, &Headers::new(), Some("c"))
        .await
        .unwrap();
    outbox
        .publish_batch(&tx, "orders", &[&event], &Headers::new(), None)
        .await
        .unwrap();
    outbox
        .publish_bytes(&tx, "raw", b"x", &Headers::new(), None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let inbox = Inbox::new("billing");
    inbox
        .process_once(
            &mut db,
            "m-1",
            async |_tx: &tokio_postgres::Transaction<'_>| Ok::<_, tokio_postgres::Error>(()),
        )
        .await
        .unwrap();
    inbox
        .purge(&db, std::time::Duration::from_secs(3600))
        .await
        .unwrap();
    let calls: i64 = db
        .query_one("SELECT count(*) FROM public.hijacked", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        calls, 0,
        "a function planted in public ran in the client's statements"
    );
}
