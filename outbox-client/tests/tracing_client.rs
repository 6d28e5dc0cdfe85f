//! The client's trace context (feature `otel`) on its own, without a worker: batches, a caller's
//! own `traceparent` in another case, a garbage creation context, an ambient consumer span, a
//! failing handler. Spans are exported by OTLP to an in-test receiver.

mod otel;

use std::time::Duration;

use otel::{ids, telemetry};
use outbox_client::received::Received;
use outbox_client::{Headers, Inbox, Outbox, ProcessError, Processed};
use outbox_tests::otlp::{Receiver, Span};
use outbox_tests::{eventually, PgCluster};
use tracing::Instrument;

const ERROR: i32 = 2;

/// The `traceparent` (any case) stored with each message, in id order given.
async fn stored_traceparents(
    db: &tokio_postgres::Client,
    ids: &[outbox_client::Uuid],
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for id in ids {
        let headers: serde_json::Value = db
            .query_one("SELECT headers FROM outbox.messages WHERE id = $1", &[id])
            .await
            .unwrap()
            .get(0);
        out.push(headers);
    }
    out
}

fn received(queue: &str, traceparent: &str) -> Received {
    Received {
        id: outbox_client::Uuid::now_v7(),
        queue: Some(queue.into()),
        created_at: None,
        headers: Headers::new().with("traceparent", traceparent),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_own_headers_garbage_contexts_ambient_spans_and_failures() {
    let receiver = Receiver::start().await;
    let provider = telemetry(&receiver.endpoint);
    let pg = PgCluster::start().await;
    let mut db = pg.superuser().await;
    db.batch_execute("SELECT outbox.register_consumer('billing', 'postgres')")
        .await
        .unwrap();
    let outbox = Outbox::new();
    let payloads = ["a", "b", "c"];

    // A batch inside a span: every message carries that span's context.
    let parent = tracing::info_span!("batch parent");
    let (trace, span_id) = ids(&parent);
    let in_span = outbox
        .publish_batch(&db, "orders", &payloads, &Headers::new(), None)
        .instrument(parent.clone())
        .await
        .unwrap();
    drop(parent);
    let expected = format!("00-{trace}-{span_id}-01");
    for headers in stored_traceparents(&db, &in_span).await {
        assert_eq!(headers["traceparent"], expected.as_str(), "{headers}");
    }

    // A batch without a span: one `create orders` span for the three.
    let alone = outbox
        .publish_batch(&db, "orders", &payloads, &Headers::new(), None)
        .await
        .unwrap();
    let stored = stored_traceparents(&db, &alone).await;
    let created = stored[0]["traceparent"].as_str().unwrap().to_owned();
    assert!(stored.iter().all(|h| h["traceparent"] == created.as_str()));

    // The caller's own header, in another case, is kept and not doubled.
    let own = "00-11111111111111111111111111111111-2222222222222222-01";
    let kept = outbox
        .publish(
            &db,
            "orders",
            &"own",
            &Headers::new().with("TRACEPARENT", own),
            None,
        )
        .instrument(tracing::info_span!("ignored for the context"))
        .await
        .unwrap();
    let headers = &stored_traceparents(&db, &[kept]).await[0];
    assert_eq!(headers, &serde_json::json!({ "TRACEPARENT": own }));

    let inbox = Inbox::new("billing");
    // A garbage creation context: processed all the same, as a root span without a link.
    let garbage = received("orders", "00-not-a-trace-01");
    let done = inbox
        .process_once(
            &mut db,
            &garbage,
            async |_tx: &tokio_postgres::Transaction<'_>| Ok::<_, tokio_postgres::Error>(()),
        )
        .await
        .unwrap();
    assert_eq!(done, Processed::Done(()));

    // Inside the consumer's own span: that span is the parent, the creation context a link.
    let creation = "00-33333333333333333333333333333333-4444444444444444-01";
    let ambient = tracing::info_span!("consumer loop");
    let (ambient_trace, ambient_id) = ids(&ambient);
    let linked = received("orders", creation);
    inbox
        .process_once(
            &mut db,
            &linked,
            async |_tx: &tokio_postgres::Transaction<'_>| Ok::<_, tokio_postgres::Error>(()),
        )
        .instrument(ambient.clone())
        .await
        .unwrap();
    drop(ambient);

    // A failing handler: an ERROR span, and the mark rolled back (the retry runs it).
    let failing = received("orders", creation);
    let outcome = inbox
        .process_once(
            &mut db,
            &failing,
            async |_tx: &tokio_postgres::Transaction<'_>| Err::<(), _>("the ledger is closed"),
        )
        .await;
    assert!(matches!(outcome, Err(ProcessError::Handler(_))));
    let retried = inbox
        .process_once(
            &mut db,
            &failing,
            async |_tx: &tokio_postgres::Transaction<'_>| Ok::<_, &str>(()),
        )
        .await
        .unwrap();
    assert_eq!(retried, Processed::Done(()));

    let flushed = provider.clone();
    tokio::task::spawn_blocking(move || flushed.force_flush())
        .await
        .unwrap()
        .unwrap();
    let r = &receiver;
    eventually(Duration::from_secs(30), "the spans", || async move {
        let spans = r.spans();
        spans.iter().filter(|s| s.name == "process orders").count() >= 4
            && spans.iter().any(|s| s.name == "create orders")
    })
    .await;
    let spans = receiver.spans();
    let with = |pick: &dyn Fn(&Span) -> bool| -> Vec<Span> {
        spans.iter().filter(|s| pick(s)).cloned().collect()
    };

    let creates = with(&|s| s.name == "create orders");
    assert_eq!(
        creates.len(),
        1,
        "one create span, for the batch without a span: {spans:#?}"
    );
    let create = &creates[0];
    assert_eq!(
        created,
        format!("00-{}-{}-01", create.trace_id, create.span_id)
    );
    assert_eq!(create.attribute("messaging.batch.message_count"), Some("3"));
    assert_eq!(
        create.attribute("messaging.message.id"),
        None,
        "three ids, not one"
    );

    let by_id = |id: &outbox_client::Uuid| {
        let found = with(&|s| s.attribute("messaging.message.id") == Some(id.to_string().as_str()));
        assert!(!found.is_empty(), "a span for {id}: {spans:#?}");
        found
    };
    let root = &by_id(&garbage.id)[0];
    assert_eq!(root.parent_span_id, "", "no creation context to continue");
    assert!(root.links.is_empty());

    let child = &by_id(&linked.id)[0];
    assert_eq!(
        (child.trace_id.as_str(), child.parent_span_id.as_str()),
        (ambient_trace.as_str(), ambient_id.as_str())
    );
    assert_eq!(
        child.links,
        vec![(
            "33333333333333333333333333333333".to_owned(),
            "4444444444444444".to_owned()
        )]
    );

    let attempts = by_id(&failing.id);
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(
        attempts.iter().filter(|s| s.status_code == ERROR).count(),
        1,
        "the failed attempt, and only it, is an error: {attempts:#?}"
    );
}
