//! One trace from the business transaction to the consumer (feature `otel`): a service span
//! publishes in its transaction, the worker delivers to Apache Kafka and RabbitMQ and dead-letters
//! a message without a topic, consumers process with `Inbox::process_once`; the test process and
//! the worker both export over OTLP/HTTP to an in-test receiver, which checks the span tree.

mod otel;

use std::time::Duration;

use futures::StreamExt;
use otel::{ids, telemetry};
use outbox_client::received::{from_amqp, from_kafka, Received};
use outbox_client::{Headers, Inbox, Outbox, Processed};
use outbox_tests::otlp::{Receiver, Span};
use outbox_tests::worker::config_args;
use outbox_tests::{eventually, KafkaBroker, PgCluster, RabbitMq, Worker};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message as _;
use tracing::Instrument;

const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;
const ERROR: i32 = 2;

fn one<'a>(spans: &'a [Span], what: &str, pick: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "one span {what}, in {spans:#?}");
    found[0]
}

/// Reads `count` records of `topic` from the beginning; blocking.
fn kafka_records(brokers: &str, topic: &str, count: usize) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tracing-test")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while records.len() < count && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            records.push(message.detach());
        }
    }
    assert_eq!(records.len(), count, "records on {topic}");
    records
}

async fn amqp_received(url: &str, queue: &str) -> Received {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            queue,
            "tracing-test",
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .expect("a message on RabbitMQ")
        .unwrap()
        .unwrap();
    from_amqp(&delivery.properties).unwrap()
}

/// Processes `received` once with a handler that writes nothing.
async fn process(
    inbox: &Inbox,
    db: &mut tokio_postgres::Client,
    received: &Received,
) -> Processed<()> {
    inbox
        .process_once(
            db,
            received,
            async |_tx: &tokio_postgres::Transaction<'_>| Ok::<_, tokio_postgres::Error>(()),
        )
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_runs_from_the_business_transaction_through_the_worker_to_the_consumer() {
    let receiver = Receiver::start().await;
    let provider = telemetry(&receiver.endpoint);
    let kafka = KafkaBroker::start(&[("orders", 1)]);
    let rabbit = RabbitMq::start();
    rabbit.declare("events", "topic", "billing", "billing.#");
    let pg = PgCluster::start().await;
    let config = Worker::config_file(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\n\
         [delivery]\nmax_attempts = 1\n\
         [sinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\n\
         [sinks.rabbit]\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"events\"\n\
         [[routes]]\nqueues = \"orders\"\nsink = \"kafka\"\n\
         [[routes]]\nqueues = \"billing.*\"\nsink = \"rabbit\"\n\
         [[routes]]\nqueues = \"lost\"\nsink = \"kafka\"\ntopic = \"no-such-topic\"\n",
        receiver.endpoint,
        kafka.brokers(),
        rabbit.url()
    ));
    let _worker = Worker::start_with(
        &config_args(&pg.url(), config.path()),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
        None,
    );
    let mut db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    db.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY);
         SELECT outbox.register_consumer('billing', 'postgres');
         SELECT outbox.register_consumer('ledger', 'postgres');",
    )
    .await
    .unwrap();
    let outbox = Outbox::new();

    // 1. A service span: the order and its three events commit together.
    let service = tracing::info_span!("place order");
    let (trace, service_span) = ids(&service);
    let (order_id, invoice_id, lost_id) = async {
        let tx = db.transaction().await.unwrap();
        tx.execute("INSERT INTO orders VALUES (1)", &[])
            .await
            .unwrap();
        let order = outbox
            .publish(&tx, "orders", &"order 1", &Headers::new(), Some("c-1"))
            .await
            .unwrap();
        let invoice = outbox
            .publish(&tx, "billing.invoices", &"invoice 1", &Headers::new(), None)
            .await
            .unwrap();
        let lost = outbox
            .publish(&tx, "lost", &"nowhere", &Headers::new(), None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        (order, invoice, lost)
    }
    .instrument(service.clone())
    .await;
    drop(service);

    // 2. No current span: the client makes a `create orders` span of its own.
    let created_id = outbox
        .publish(&db, "orders", &"order 2", &Headers::new(), None)
        .await
        .unwrap();

    // 3. A creation context not sampled: the worker makes no span for it.
    let unsampled_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let unsampled_id = outbox
        .publish(
            &db,
            "orders",
            &"order 3",
            &Headers::new().with_traceparent(format!("00-{unsampled_trace}-00f067aa0ba902b7-00")),
            None,
        )
        .await
        .unwrap();

    // The consumers: Kafka and RabbitMQ, each processing once.
    let brokers = kafka.brokers();
    let records = tokio::task::spawn_blocking(move || kafka_records(&brokers, "orders", 3))
        .await
        .unwrap();
    let order_record = records
        .iter()
        .find(|r| from_kafka(*r).unwrap().id == order_id)
        .expect("order 1 on Kafka");
    let order = from_kafka(order_record).unwrap();
    assert_eq!(
        order.headers.get("traceparent"),
        Some(format!("00-{trace}-{service_span}-01").as_str()),
        "the creation context reaches Kafka unchanged"
    );
    let billing = Inbox::new("billing");
    assert_eq!(
        process(&billing, &mut db, &order).await,
        Processed::Done(())
    );
    assert_eq!(
        process(&billing, &mut db, &order).await,
        Processed::Duplicate,
        "a redelivery"
    );
    let invoice = amqp_received(&rabbit.url(), "billing").await;
    assert_eq!(invoice.id, invoice_id);
    process(&Inbox::new("ledger"), &mut db, &invoice).await;
    let flushed = provider.clone();
    tokio::task::spawn_blocking(move || flushed.force_flush())
        .await
        .unwrap()
        .unwrap();

    // Everything arrives: 4 worker spans (2 to Kafka, 1 to RabbitMQ, 1 dead letter), and the
    // service's place order, create orders and three process spans (one a redelivery).
    let r = &receiver;
    eventually(Duration::from_secs(30), "the spans", || async move {
        let spans = r.spans();
        let named = |prefix: &str| spans.iter().filter(|s| s.name.starts_with(prefix)).count();
        // (lapin's own tracing spans arrive too: counted by name, not in all.)
        named("send ") >= 4 && named("process ") >= 3 && named("create ") >= 1
    })
    .await;
    let spans = receiver.spans();
    let of_trace: Vec<Span> = spans
        .iter()
        .filter(|s| s.trace_id == trace)
        .cloned()
        .collect();
    let root = one(&of_trace, "place order", |s| s.name == "place order");
    assert_eq!(root.service, "shop");
    assert_eq!(root.span_id, service_span);
    let created_by = (trace.clone(), service_span.clone());

    let to_kafka = one(&of_trace, "send orders", |s| s.name == "send orders");
    assert_eq!(to_kafka.service, "outbox-worker");
    assert_eq!(to_kafka.kind, PRODUCER);
    assert_eq!(
        to_kafka.parent_span_id, service_span,
        "child of the creation context"
    );
    assert_eq!(
        to_kafka.links,
        vec![created_by.clone()],
        "linked to the creation context"
    );
    for (key, value) in [
        ("messaging.system", "kafka"),
        ("messaging.operation.type", "send"),
        ("messaging.operation.name", "send"),
        ("messaging.destination.name", "orders"),
        ("messaging.destination.partition.id", "0"),
        ("messaging.kafka.message.key", "c-1"),
        ("pg_outbox.outcome", "delivered"),
        ("pg_outbox.queue", "orders"),
    ] {
        assert_eq!(
            to_kafka.attribute(key),
            Some(value),
            "{key} in {to_kafka:#?}"
        );
    }
    assert_eq!(
        to_kafka.attribute("messaging.message.id"),
        Some(order_id.to_string().as_str())
    );
    assert_eq!(
        to_kafka.attribute("messaging.kafka.offset"),
        Some(order_record.offset().to_string().as_str()),
        "the offset the broker gave"
    );
    assert!(to_kafka.attribute("pg_outbox.committed_at").is_some());
    // The dead letter's refusal aborts the Kafka transaction it shared: then 2 attempts.
    let attempts: u32 = to_kafka
        .attribute("pg_outbox.attempts")
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&attempts), "{to_kafka:#?}");
    assert!(
        to_kafka.schema_url.ends_with("/1.45.0"),
        "{}",
        to_kafka.schema_url
    );
    assert!(to_kafka.end_unix_nano >= to_kafka.start_unix_nano);

    let to_rabbit = one(&of_trace, "send events", |s| s.name == "send events");
    assert_eq!(to_rabbit.parent_span_id, service_span);
    assert_eq!(to_rabbit.links, vec![created_by.clone()]);
    assert_eq!(to_rabbit.attribute("messaging.system"), Some("rabbitmq"));
    assert_eq!(
        to_rabbit.attribute("messaging.destination.name"),
        Some("events")
    );
    assert_eq!(
        to_rabbit.attribute("messaging.rabbitmq.destination.routing_key"),
        Some("billing.invoices")
    );
    assert_eq!(
        to_rabbit.attribute("messaging.message.id"),
        Some(invoice_id.to_string().as_str())
    );

    let lost = one(&of_trace, "the dead letter", |s| {
        s.attribute("messaging.message.id") == Some(lost_id.to_string().as_str())
    });
    assert_eq!(lost.name, "send no-such-topic");
    assert_eq!(lost.attribute("pg_outbox.outcome"), Some("dead_lettered"));
    assert_eq!(lost.status_code, ERROR, "{lost:#?}");
    assert!(lost.status_message.contains("dead-lettered"), "{lost:#?}");

    for (consumer, id, queue) in [
        ("billing", order_id, "orders"),
        ("ledger", invoice_id, "billing.invoices"),
    ] {
        let process = one(&of_trace, consumer, |s| {
            s.attribute("messaging.consumer.group.name") == Some(consumer)
                && s.attribute("pg_outbox.duplicate") == Some("false")
        });
        assert_eq!(process.name, format!("process {queue}"));
        assert_eq!(process.kind, CONSUMER);
        assert_eq!(process.service, "shop");
        assert_eq!(process.parent_span_id, service_span);
        assert_eq!(process.links, vec![created_by.clone()]);
        assert_eq!(
            process.attribute("messaging.message.id"),
            Some(id.to_string().as_str())
        );
        assert_eq!(
            process.attribute("messaging.operation.type"),
            Some("process")
        );
        assert_eq!(process.attribute("pg_outbox.duplicate"), Some("false"));
    }

    let redelivery = one(&of_trace, "the redelivery", |s| {
        s.attribute("pg_outbox.duplicate") == Some("true")
    });
    assert_eq!(redelivery.name, "process orders");
    assert_eq!(redelivery.links, vec![created_by]);

    // 2: the create span is the creation context, and the worker's span its child.
    let create = one(&spans, "create orders", |s| s.name == "create orders");
    assert_eq!(create.kind, PRODUCER);
    assert_eq!(
        create.parent_span_id, "",
        "a root: there was no current span"
    );
    assert_eq!(
        create.attribute("messaging.message.id"),
        Some(created_id.to_string().as_str())
    );
    let sent = one(&spans, "the created message's send", |s| {
        s.service == "outbox-worker"
            && s.attribute("messaging.message.id") == Some(created_id.to_string().as_str())
    });
    assert_eq!(sent.trace_id, create.trace_id);
    assert_eq!(sent.parent_span_id, create.span_id);

    // 3: nothing for the unsampled message.
    assert!(
        !spans.iter().any(|s| s.trace_id == unsampled_trace
            || s.attribute("messaging.message.id") == Some(unsampled_id.to_string().as_str())),
        "a span of an unsampled message: {spans:#?}"
    );
    let worker_spans = spans.iter().filter(|s| s.service == "outbox-worker");
    assert_eq!(worker_spans.count(), 4, "{spans:#?}");
}
