//! The worker delivering to a real RabbitMQ node (started hermetically), read back with pika: both
//! storage forms, an outage, poison messages into the dead letters and back, metrics and health,
//! and Kafka and RabbitMQ routes in one run.

use std::time::Duration;

use outbox_tests::publish::{
    check_delivery, only_dead_letter, publish_range, publish_rolled_back, Seen, Storage,
};
use outbox_tests::worker::config_args;
use outbox_tests::worker::{http_get, metric, run_once};
use outbox_tests::{eventually, KafkaBroker, PgCluster, RabbitMq, Worker};

use outbox_tests::rabbitmq::seen;

fn http_addr() -> String {
    format!("127.0.0.1:{}", outbox_tests::postgres::free_port())
}

/// RabbitMQ with a direct exchange `events` bound to queue `orders`, PostgreSQL, and a worker
/// routing every queue to `events` (routing key = queue) with `extra` flags, holding the slot.
async fn rabbit_and_worker(
    extra: &[&str],
) -> (RabbitMq, PgCluster, Worker, tokio_postgres::Client) {
    let rabbit = RabbitMq::start();
    rabbit.declare("events", "direct", "orders", "orders");
    worker_for(rabbit, extra).await
}

/// PostgreSQL and a worker routing every queue to exchange `events` of `rabbit` (declared by the
/// caller) with `extra` flags, holding the slot.
async fn worker_for(
    rabbit: RabbitMq,
    extra: &[&str],
) -> (RabbitMq, PgCluster, Worker, tokio_postgres::Client) {
    let pg = PgCluster::start().await;
    let url = pg.url();
    let amqp = rabbit.url();
    let mut args = vec![
        "run",
        "--postgres-url",
        &url,
        "--amqp-url",
        &amqp,
        "--amqp-exchange",
        "events",
    ];
    args.extend_from_slice(extra);
    let worker = Worker::start(&args, None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    (rabbit, pg, worker, db)
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_messages_reach_rabbitmq_with_ids_headers_and_metrics() {
    let http = http_addr();
    let (rabbit, _pg, worker, db) = rabbit_and_worker(&["--http-listen", &http]).await;

    const TOTAL: u64 = 10_000;
    publish_range(&db, "orders", 0, 5_000, 20, Storage::Table).await;
    publish_rolled_back(&db, "orders", Storage::Mixed).await;
    publish_range(&db, "orders", 5_000, 5_000, 20, Storage::Wal).await;

    let messages = rabbit.drain_queue("orders", TOTAL as usize, Duration::from_secs(120));
    let tally = check_delivery(&seen(&messages), TOTAL);
    assert_eq!(tally.duplicates, 0);
    let m = &messages[0];
    assert_eq!(m["headers"]["outbox-id"], m["message_id"]);
    assert_eq!(m["headers"]["outbox-queue"], "orders");
    assert_eq!(m["headers"]["test"], "yes", "user headers as an AMQP table");
    assert_eq!(m["content_type"], "application/json");
    assert_eq!(m["delivery_mode"], 2, "persistent");

    let (status, body) = http_get(&http, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &body,
            "outbox_messages_published_total{sink=\"amqp\",queue=\"orders\"}"
        ),
        Some(TOTAL as f64),
        "{body}"
    );
    assert!(
        body.contains("outbox_commit_to_ack_seconds_bucket"),
        "{body}"
    );
    assert_eq!(http_get(&http, "/health/ready").unwrap().0, 200);
    assert_eq!(http_get(&http, "/health/live").unwrap().0, 200);
    drop(worker);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rabbitmq_node_stopped_for_ten_seconds_loses_nothing_and_flips_readiness() {
    let http = http_addr();
    let (rabbit, _pg, worker, db) = rabbit_and_worker(&["--http-listen", &http]).await;

    const TOTAL: u64 = 10_000;
    publish_range(&db, "orders", 0, 3_000, 20, Storage::Mixed).await;
    rabbit.stop_node();
    publish_range(&db, "orders", 3_000, 4_000, 20, Storage::Mixed).await;
    let addr = http.as_str();
    eventually(
        Duration::from_secs(20),
        "/health/ready to say 503 during the outage",
        || async move {
            http_get(addr, "/health/ready")
                .map(|(s, _)| s == 503)
                .unwrap_or(false)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    rabbit.start_node();
    publish_range(&db, "orders", 7_000, 3_000, 20, Storage::Mixed).await;

    let messages = rabbit.drain_queue("orders", TOTAL as usize, Duration::from_secs(180));
    let tally = check_delivery(&seen(&messages), TOTAL);
    eprintln!("rabbitmq outage: {tally:?}");
    eventually(
        Duration::from_secs(20),
        "/health/ready to recover",
        || async move {
            http_get(addr, "/health/ready")
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
        },
    )
    .await;
    assert!(
        worker.log().contains("retrying this message alone"),
        "{}",
        worker.log()
    );
}

/// Pipelined, many messages of a key are unconfirmed at once, so their order on the wire is
/// the order the sink was called in: the sink must put each message's frames on the channel
/// before it takes the next, even though it awaits the socket write and the confirm elsewhere.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_messages_of_a_key_arrive_in_publish_order() {
    const TOTAL: u64 = 20_000;
    let config = Worker::config_file("[delivery]\nordering = \"pipelined\"\n");
    let (rabbit, _pg, worker, db) =
        rabbit_and_worker(&["--config", config.path().to_str().unwrap()]).await;
    publish_range(&db, "orders", 0, TOTAL, 4, Storage::Mixed).await;
    let messages = rabbit.drain_queue("orders", TOTAL as usize, Duration::from_secs(120));
    let tally = check_delivery(&seen(&messages), TOTAL);
    assert_eq!(tally.duplicates, 0, "no failure, so nothing is sent twice");
    drop(worker);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unroutable_message_is_dead_lettered_and_redriven_with_the_same_id() {
    let config = Worker::config_file(
        "[delivery]
max_attempts = 2
",
    );
    let (rabbit, pg, _worker, db) =
        rabbit_and_worker(&["--config", config.path().to_str().unwrap()]).await;

    // No queue is bound for routing key "nowhere": the broker returns it (mandatory).
    let poison: uuid::Uuid = db
        .query_one(
            "SELECT outbox.publish('nowhere', '{\"i\": 0, \"key\": \"k-0\"}', '{}', 'k-0')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    publish_range(&db, "orders", 0, 500, 5, Storage::Mixed).await;
    let later = rabbit.drain_queue("orders", 500, Duration::from_secs(60));
    check_delivery(&seen(&later), 500);

    let db_ref = &db;
    eventually(Duration::from_secs(30), "the dead letter", || async move {
        db_ref
            .query_opt("SELECT 1 FROM outbox.dead_letters", &[])
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let (id, destination, error, attempts) = only_dead_letter(&db).await;
    assert_eq!(id, poison);
    assert_eq!(destination, "amqp:events/nowhere");
    assert!(error.contains("unroutable"), "{error}");
    assert_eq!(attempts, 2);

    let listed = run_once(&["dlq", "list", "--postgres-url", &pg.url()], &[]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&poison.to_string()));
    let status = run_once(&["status", "--postgres-url", &pg.url()], &[]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let column = |name: &str| {
        let header: Vec<&str> = status.lines().next().unwrap().split('\t').collect();
        let row: Vec<&str> = status.lines().nth(1).unwrap().split('\t').collect();
        row[header.iter().position(|h| *h == name).unwrap()].to_owned()
    };
    assert_eq!(
        (column("slot"), column("active"), column("dead_letters")),
        ("pg_outbox".into(), "true".into(), "1".into()),
        "{status}"
    );

    // Fix the cause, then redrive: it arrives with the same id.
    rabbit.declare("events", "direct", "nowhere", "nowhere");
    let redriven = run_once(
        &[
            "dlq",
            "redrive",
            "--queue",
            "nowhere",
            "--postgres-url",
            &pg.url(),
        ],
        &[],
    );
    assert!(
        redriven.status.success(),
        "{}",
        String::from_utf8_lossy(&redriven.stderr)
    );
    let arrived = rabbit.drain_queue("nowhere", 1, Duration::from_secs(60));
    assert_eq!(arrived.len(), 1);
    assert_eq!(arrived[0]["message_id"], poison.to_string());
    let left: i64 = db
        .query_one("SELECT count(*) FROM outbox.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_and_rabbitmq_routes_in_one_run_deliver_each_message_once() {
    let rabbit = RabbitMq::start();
    rabbit.declare("events", "topic", "billing", "billing.#");
    let kafka = KafkaBroker::start(&[("orders", 2)]);
    let pg = PgCluster::start().await;
    let config = Worker::config_file(&format!(
        "[sinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\n\
         [sinks.rabbit]\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"events\"\n\
         [[routes]]\nqueues = \"orders\"\nsink = \"kafka\"\n\
         [[routes]]\nqueues = \"billing.*\"\nsink = \"rabbit\"\n",
        kafka.brokers(),
        rabbit.url()
    ));
    let _worker = Worker::start(&config_args(&pg.url(), config.path()), None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    publish_range(&db, "orders", 0, 2_000, 10, Storage::Mixed).await;
    publish_range(&db, "billing.invoices", 2_000, 2_000, 10, Storage::Mixed).await;

    let brokers = kafka.brokers();
    let kafka =
        outbox_tests::kafka::read(&brokers, "orders", 2_000, Duration::from_secs(120)).await;
    let amqp = rabbit.drain_queue("billing", 2_000, Duration::from_secs(120));
    let kafka_seen: Vec<Seen> = kafka.iter().map(|r| r.seen()).collect();
    let amqp_seen = seen(&amqp);
    assert!(
        kafka_seen
            .iter()
            .all(|s| s.payload["i"].as_u64().unwrap() < 2_000),
        "only queue orders on Kafka"
    );
    assert!(
        amqp_seen
            .iter()
            .all(|s| s.payload["i"].as_u64().unwrap() >= 2_000),
        "only billing.* on RabbitMQ"
    );
    let all: Vec<Seen> = kafka_seen.into_iter().chain(amqp_seen).collect();
    let tally = check_delivery(&all, 4_000);
    assert_eq!(
        tally.duplicates, 0,
        "each message on exactly one broker, once"
    );
}

/// A queue that refuses publishes once it holds 20 messages, read by a consumer taking 2 ms per
/// message, gets 2,000 messages of one key in one transaction. Refused messages are retried;
/// none may arrive after a later message of its key (0.2.0 delivered 156 of 383 out of order).
#[tokio::test(flavor = "multi_thread")]
async fn a_queue_refusing_some_messages_never_breaks_per_key_order() {
    let rabbit = RabbitMq::start();
    rabbit.declare_bounded("events", "orders", 20);
    let config =
        Worker::config_file("[delivery]\nretry_initial = \"10ms\"\nretry_max = \"100ms\"\n");
    let (rabbit, _pg, worker, db) =
        worker_for(rabbit, &["--config", config.path().to_str().unwrap()]).await;
    const TOTAL: u64 = 2_000;
    db.batch_execute(&format!(
        "SELECT count(outbox.publish('orders', jsonb_build_object('i', i, 'key', 'k'), '{{}}', 'k'))
           FROM generate_series(0, {}) AS i",
        TOTAL - 1
    ))
    .await
    .unwrap();

    let messages = tokio::task::spawn_blocking(move || {
        let messages = rabbit.drain_queue_slowly(
            "orders",
            TOTAL as usize,
            Duration::from_secs(180),
            Duration::from_millis(2),
        );
        (rabbit, messages)
    })
    .await
    .unwrap()
    .1;
    let tally = check_delivery(&seen(&messages), TOTAL);
    assert_eq!(tally.duplicates, 0, "a refused message is not stored");
    assert!(
        worker.log().contains("nacked"),
        "the queue must actually have refused messages: {}",
        worker.log()
    );
}

/// A publisher's `content-type` header becomes the AMQP `content_type` property, once (not also
/// in the headers table); without one, the payload form's.
#[tokio::test(flavor = "multi_thread")]
async fn the_publishers_content_type_is_the_amqp_content_type() {
    let (rabbit, _pg, _worker, db) = rabbit_and_worker(&[]).await;
    db.batch_execute(
        "SELECT outbox.publish('orders', '{\"n\": 1}', '{\"Content-Type\": \"application/cloudevents+json\"}');
         SELECT outbox.publish('orders', '{\"n\": 2}');",
    )
    .await
    .unwrap();
    let messages = rabbit.drain_queue("orders", 2, Duration::from_secs(60));
    let content_types: Vec<_> = messages.iter().map(|m| m["content_type"].clone()).collect();
    assert_eq!(
        content_types,
        ["application/cloudevents+json", "application/json"]
    );
    for m in &messages {
        let headers = m["headers"].as_object().unwrap();
        assert!(
            !headers
                .keys()
                .any(|k| k.eq_ignore_ascii_case("content-type")),
            "sent once: {m}"
        );
    }
}
