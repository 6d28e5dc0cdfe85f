//! Exactly once into Apache Kafka (`sinks.NAME.exactly_once`, on by default): SIGKILLs at random
//! moments under concurrent publishers, a standby taking over from a frozen worker, a replay.
//! Every test reads back with kafka-python at `read_committed` and counts each message.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_tests::kafka::{self, Isolation};
use outbox_tests::kafka_broker::signal;
use outbox_tests::kafka_broker::KafkaOptions;
use outbox_tests::publish::{check_delivery, publish_rolled_back, Seen, Storage, Tally};
use outbox_tests::worker::kafka_args;
use outbox_tests::{eventually, KafkaBroker, PgCluster, Worker};
use tokio_postgres::Client;

/// Global message indexes, handed out in ranges to the publishers.
type Counter = Arc<AtomicU64>;

/// Publishes messages `first..first+count` on `orders` in one transaction, keys `{prefix}-0` to
/// `{prefix}-{keys-1}`: each publisher has keys of its own, so each key's commit order is its
/// index order.
async fn publish(db: &Client, first: u64, count: u64, prefix: &str, keys: u64, wal: bool) {
    let form = if wal { "wal" } else { "table" };
    db.batch_execute(&format!(
        "BEGIN; SET LOCAL pg_outbox.storage = '{form}';
         SELECT count(outbox.publish('orders',
                    jsonb_build_object('i', i, 'key', '{prefix}-' || i % {keys}),
                    '{{}}', '{prefix}-' || i % {keys}))
           FROM generate_series({first}::bigint, {last}::bigint) AS i;
         COMMIT;",
        last = first + count - 1
    ))
    .await
    .expect("publish");
}

/// A publisher of its own connection: transactions of 1 to 20 messages, both storage forms in
/// turn, until `stop`.
fn spawn_publisher(
    pg: &PgCluster,
    number: u64,
    next: Counter,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let url = pg.url();
    tokio::spawn(async move {
        let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        let mut txs = 0u64;
        while !stop.load(Ordering::Acquire) {
            let size = 1 + (txs * 7919 + number) % 20;
            let first = next.fetch_add(size, Ordering::AcqRel);
            publish(
                &db,
                first,
                size,
                &format!("p{number}"),
                10,
                txs.is_multiple_of(2),
            )
            .await;
            txs += 1;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    })
}

/// kafka-python at `read_committed`: every committed record of `orders`.
async fn read_committed(kafka: &KafkaBroker, expected: u64) -> Vec<Seen> {
    let brokers = kafka.brokers();
    let records = tokio::task::spawn_blocking(move || {
        kafka::kafka_python(
            &brokers,
            "orders",
            expected as usize,
            Duration::from_secs(240),
            Isolation::ReadCommitted,
        )
    })
    .await
    .unwrap();
    records.iter().map(kafka::python_seen).collect()
}

/// `kills` SIGKILLs of the worker at random moments (0.1 to 1.5 s into a run, most once it
/// streams) under four publishers,
/// with one transaction of `big` messages among them, then a last run that delivers the rest.
/// Returns what a `read_committed` reader got, and how many runs resumed from Kafka's progress.
async fn kill_under_publishers(exactly_once: bool, kills: usize, big: u64) -> (Tally, usize) {
    let kafka = KafkaBroker::start(&[("orders", 3)]);
    let pg = PgCluster::start().await;
    let config = Worker::config_file(&format!(
        "[postgres]\nstatus_interval = \"10ms\"\n\
         [delivery]\nmax_in_flight = 2000\n\
         [sinks.kafka]\ntype = \"kafka\"\nbrokers = \"{}\"\nexactly_once = {exactly_once}\n",
        kafka.brokers()
    ));
    let args = kafka_args(&pg.url(), &kafka.brokers(), config.path());
    let mut worker = Worker::start(&args, None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    let next: Counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..4)
        .map(|n| spawn_publisher(&pg, n, next.clone(), stop.clone()))
        .collect();
    if big > 0 {
        let first = next.fetch_add(big, Ordering::AcqRel);
        let db = pg.superuser().await;
        publish(&db, first, big, "big", 7, false).await;
    }
    publish_rolled_back(&db, "orders", Storage::Table).await;
    publish_rolled_back(&db, "orders", Storage::Wal).await;

    let mut resumed = 0;
    let mut seed = 0x2545_f491_u64;
    for kill in 0..kills {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Four kills in five land while the run streams, the fifth wherever it is (often while
        // it fences and reads the progress).
        if kill % 5 != 4 {
            let log = || worker.log();
            eventually(Duration::from_secs(30), "the run streams", || {
                let streaming = log().contains("streaming");
                async move { streaming }
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100 + seed % 1400)).await;
        resumed += usize::from(worker.log().contains("resuming after the last committed"));
        if std::env::var_os("SHOW_LOGS").is_some() {
            eprintln!("=== run log\n{}", worker.log());
        }
        worker.kill();
        worker = Worker::start(&args, None);
    }
    stop.store(true, Ordering::Release);
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let total = next.load(Ordering::Acquire);

    let seen = read_committed(&kafka, total).await;
    if seen.len() < total as usize {
        eprintln!("worker log:\n{}", worker.log());
    }
    let tally = check_delivery(&seen, total);
    eprintln!(
        "exactly_once = {exactly_once}: {total} messages, {kills} SIGKILLs: {tally:?}, \
         {resumed} runs resumed from Kafka's progress"
    );
    (tally, resumed)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkills_under_four_publishers_deliver_each_committed_message_exactly_once() {
    let (tally, resumed) = kill_under_publishers(true, 22, 100_000).await;
    assert_eq!(tally.duplicates, 0, "{tally:?}");
    assert!(resumed > 0, "no run resumed from Kafka's progress");
}

/// The same crashes at least once: duplicates, so the exactly-once test can fail.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_sigkills_at_least_once_duplicate() {
    let (tally, resumed) = kill_under_publishers(false, 10, 0).await;
    assert!(tally.duplicates > 0, "{tally:?}");
    assert_eq!(resumed, 0);
}

/// A standby started beside a running worker leaves it alone; once that worker is frozen
/// (SIGSTOP) the standby takes the slot over and fences it in Kafka, and when it wakes up it stops,
/// saying so, without writing anything.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_fences_a_frozen_worker_which_stops_when_it_wakes() {
    let kafka = KafkaBroker::start(&[("orders", 3)]);
    // The server drops a frozen worker's replication connection after 2 s, freeing the slot.
    let pg = PgCluster::start_with_conf("wal_sender_timeout = '2s'\n").await;
    let config = Worker::config_file("[postgres]\nstatus_interval = \"100ms\"\n");
    let args = kafka_args(&pg.url(), &kafka.brokers(), config.path());
    let mut old = Worker::start(&args, None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    let next: Counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..2)
        .map(|n| spawn_publisher(&pg, n, next.clone(), stop.clone()))
        .collect();
    // A standby waits for the slot without touching Kafka: the worker it stands by for goes on.
    let mut standby = Worker::start(&args, None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(old.exited().is_none(), "{}", old.log());
    assert!(
        !standby.log().contains("exactly once;"),
        "{}",
        standby.log()
    );
    signal(old.pid(), "STOP");
    eventually(Duration::from_secs(30), "the standby resumed", || {
        let log = standby.log();
        async move { log.contains("exactly once;") }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(old.pid(), "CONT");
    let status = old.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", old.log());
    let fenced: Vec<String> = old
        .log()
        .lines()
        .filter(|l| l.contains("fenced") && !l.contains("librdkafka"))
        .map(str::to_owned)
        .collect();
    assert!(!fenced.is_empty(), "{}", old.log());
    eprintln!("the old worker said: {}", fenced.join("\n"));

    stop.store(true, Ordering::Release);
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let total = next.load(Ordering::Acquire);
    let seen = read_committed(&kafka, total).await;
    let tally = check_delivery(&seen, total);
    eprintln!("takeover: {total} messages: {tally:?}");
    assert_eq!(tally.duplicates, 0, "{tally:?}");
    assert!(standby.exited().is_none(), "{}", standby.log());
}

/// `replay` sends again on purpose, exactly-once sink or not, and marks what it sent.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_is_a_new_delivery_marked_as_such() {
    let kafka = KafkaBroker::start(&[("orders", 3)]);
    let pg = PgCluster::start().await;
    let config = Worker::config_file("");
    let args = kafka_args(&pg.url(), &kafka.brokers(), config.path());
    let mut worker = Worker::start(&args, None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    publish(&db, 0, 100, "r", 5, false).await;
    let first = read_committed(&kafka, 100).await;
    assert_eq!(check_delivery(&first, 100).duplicates, 0);
    worker.terminate(Duration::from_secs(10));

    let mut replay = vec!["replay".to_owned(), "--since".to_owned(), "1h".to_owned()];
    replay.extend(args[1..].iter().cloned());
    let out =
        outbox_tests::worker::run_once(&replay.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let brokers = kafka.brokers();
    let records = tokio::task::spawn_blocking(move || {
        kafka::kafka_python(
            &brokers,
            "orders",
            100,
            Duration::from_secs(60),
            Isolation::ReadCommitted,
        )
    })
    .await
    .unwrap();
    assert_eq!(
        records.len(),
        200,
        "each message twice: first, then replayed"
    );
    let replayed = records
        .iter()
        .filter(|r| r["headers"]["outbox-replayed-at"].is_string())
        .count();
    assert_eq!(replayed, 100);
}

/// A queue routed to another sink while the worker was stopped: Kafka's progress says nothing of
/// its messages, so they are sent, not skipped. The first run sends queue `b` to a sink whose
/// brokers never answer (its messages hold the slot back) and commits queue `a`'s later messages
/// in Kafka; the second routes both to Kafka.
#[tokio::test(flavor = "multi_thread")]
async fn a_queue_routed_to_kafka_while_stopped_is_sent_not_skipped() {
    let kafka = KafkaBroker::start(&[("a", 1), ("b", 1)]);
    let pg = PgCluster::start().await;
    let unreachable = format!("127.0.0.1:{}", outbox_tests::postgres::free_port());
    let first = Worker::config_file(&format!(
        "[sinks.k1]\ntype = \"kafka\"\nbrokers = \"{}\"\n\
         [sinks.k2]\ntype = \"kafka\"\nbrokers = \"{unreachable}\"\nexactly_once = false\n\
         [[routes]]\nqueues = \"b\"\nsink = \"k2\"\n\
         [[routes]]\nqueues = \"a\"\nsink = \"k1\"\n",
        kafka.brokers()
    ));
    let mut worker = Worker::start(
        &outbox_tests::worker::config_args(&pg.url(), first.path()),
        None,
    );
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    for queue in ["b", "a"] {
        db.batch_execute(&format!(
            "SELECT count(outbox.publish('{queue}', jsonb_build_object('i', i), '{{}}', 'k'))
               FROM generate_series(0, 9) AS i"
        ))
        .await
        .unwrap();
    }
    kafka::read(&kafka.brokers(), "a", 10, Duration::from_secs(60)).await;
    worker.kill();

    let second = Worker::config_file(&format!(
        "[sinks.k1]\ntype = \"kafka\"\nbrokers = \"{}\"\n\
         [[routes]]\nqueues = [\"a\", \"b\"]\nsink = \"k1\"\n",
        kafka.brokers()
    ));
    let worker = Worker::start(
        &outbox_tests::worker::config_args(&pg.url(), second.path()),
        None,
    );
    let b = kafka::read(&kafka.brokers(), "b", 10, Duration::from_secs(60)).await;
    let distinct: std::collections::HashSet<_> =
        b.iter().map(|r| r.headers["outbox-id"].clone()).collect();
    assert_eq!(distinct.len(), 10, "{}", worker.log());
    assert!(
        worker.log().contains("the routes changed"),
        "{}",
        worker.log()
    );
}

/// The progress topic deleted while the worker was stopped: the next run says so and goes on at
/// least once for that start (here nothing was unconfirmed, so nothing comes twice); its metrics
/// count the transactions.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_progress_topic_is_reported_and_delivery_goes_on() {
    let kafka = KafkaBroker::start(&[("orders", 3)]);
    let pg = PgCluster::start().await;
    let config = Worker::config_file("");
    let listen = format!("127.0.0.1:{}", outbox_tests::postgres::free_port());
    let mut args = kafka_args(&pg.url(), &kafka.brokers(), config.path());
    args.extend(["--http-listen".to_owned(), listen.clone()]);
    let mut worker = Worker::start(&args, None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    publish(&db, 0, 100, "d", 5, false).await;
    kafka::read(&kafka.brokers(), "orders", 100, Duration::from_secs(60)).await;
    let (_, metrics) = outbox_tests::worker::http_get(&listen, "/metrics").unwrap();
    let committed = outbox_tests::worker::metric(
        &metrics,
        "outbox_kafka_transactions_total{sink=\"kafka\",outcome=\"committed\"}",
    );
    assert!(committed.is_some_and(|n| n >= 1.0), "{metrics}");
    worker.terminate(Duration::from_secs(10));

    kafka.delete_topic("pg_outbox-progress");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let worker = Worker::start(&args, None);
    publish(&db, 100, 100, "d", 5, true).await;
    let seen = read_committed(&kafka, 200).await;
    let tally = check_delivery(&seen, 200);
    assert_eq!(tally.duplicates, 0, "{tally:?}");
    let log = worker.log();
    assert!(
        log.contains("created the progress topic") || log.contains("has no position"),
        "{log}"
    );
}

/// Another stream's transaction left open on the shared progress topic (a worker of another
/// database crashed between its progress record and its commit): `read_committed` readers stop
/// before it, so the progress read must wait for it instead of taking that stop for the end.
/// (Found by a hostile review: the restarted worker resumed from a stale position, 100
/// duplicates.)
#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_transaction_open_on_the_progress_topic_is_waited_for() {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let kafka = KafkaBroker::start(&[("orders", 3)]);
    let pg = PgCluster::start().await;
    // The slot is not confirmed before the kill: the restart must rely on Kafka's progress.
    let config = Worker::config_file("[postgres]\nstatus_interval = \"60s\"\n");
    let args = kafka_args(&pg.url(), &kafka.brokers(), config.path());
    let mut worker = Worker::start(&args, None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    publish(&db, 0, 100, "f", 7, false).await;
    read_committed(&kafka, 100).await;

    let foreign: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("transactional.id", "pg_outbox-other-db-slot-kafka")
        .create()
        .unwrap();
    foreign.init_transactions(Duration::from_secs(30)).unwrap();
    foreign.begin_transaction().unwrap();
    foreign
        .send(
            BaseRecord::to("pg_outbox-progress")
                .partition(0)
                .key("pg_outbox-other-db-slot-kafka")
                .payload(r#"{"commit_lsn":"0/1","index":0,"routes":"x","written_at":"now"}"#),
        )
        .unwrap();
    foreign.flush(Duration::from_secs(10)).unwrap();

    publish(&db, 100, 100, "f", 7, true).await;
    read_committed(&kafka, 200).await;
    worker.kill();
    let worker = Worker::start(&args, None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !worker.log().contains("resuming after"),
        "resumed past an open transaction: {}",
        worker.log()
    );
    // The other stream's next run ends it.
    foreign.abort_transaction(Duration::from_secs(30)).unwrap();
    publish(&db, 200, 100, "f", 7, false).await;
    let seen = read_committed(&kafka, 300).await;
    let tally = check_delivery(&seen, 300);
    assert_eq!(tally.duplicates, 0, "{tally:?}\n{}", worker.log());
}

/// The broker refuses a whole batch when one message of it is over the topic's
/// `max.message.bytes`: only that message is dead-lettered, its batch-mates are sent again alone
/// and delivered. (Found by a hostile review: all 50 of the batch were dead-lettered.)
#[tokio::test(flavor = "multi_thread")]
async fn only_the_oversize_message_of_a_refused_batch_is_dead_lettered() {
    let kafka = KafkaBroker::start(&[("orders", 1)]);
    kafka.alter_topic("orders", "max.message.bytes", "100000");
    let pg = PgCluster::start().await;
    let config = Worker::config_file("[delivery]\nmax_attempts = 2\n");
    let args = kafka_args(&pg.url(), &kafka.brokers(), config.path());
    let worker = Worker::start(&args, None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    db.batch_execute(
        "BEGIN;
         SELECT count(outbox.publish('orders', jsonb_build_object('i', i, 'key', 'k-' || i % 3,
                'pad', repeat('y', 300)), '{}', 'k-' || i % 3)) FROM generate_series(0, 49) i;
         SELECT outbox.publish('orders', jsonb_build_object('i', 50, 'blob', repeat('x', 120000)),
                '{}', 'k-2');
         SELECT count(outbox.publish('orders', jsonb_build_object('i', i, 'key', 'k-' || i % 3,
                'pad', repeat('y', 300)), '{}', 'k-' || i % 3)) FROM generate_series(51, 99) i;
         COMMIT;",
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(60),
        "the oversize message dead-lettered",
        || async {
            outbox_tests::postgres::count(&db, "SELECT count(*) FROM outbox.dead_letters").await
                >= 1
        },
    )
    .await;
    let seen: Vec<Seen> = read_committed(&kafka, 99).await;
    let ids: std::collections::BTreeSet<u64> = seen
        .iter()
        .map(|s| s.payload["i"].as_u64().unwrap())
        .collect();
    let missing: Vec<u64> = (0..100).filter(|i| *i != 50 && !ids.contains(i)).collect();
    assert!(missing.is_empty(), "missing {missing:?}\n{}", worker.log());
    assert_eq!(seen.len(), 99, "no duplicates");
    let dead: Vec<String> =
        outbox_tests::postgres::column(&db, "SELECT payload->>'i' FROM outbox.dead_letters").await;
    assert_eq!(dead, ["50"]);
}

/// A worker paused (SIGSTOP: a VM stall, a starved CPU) past `transaction.timeout.ms` with a
/// transaction open, and no other worker: the coordinator aborts the transaction and bumps the
/// producer's epoch meanwhile, so on waking its producer is fenced (librdkafka cannot tell this
/// from a takeover, and a worker that fenced a new holder back would break exactly once). It
/// exits 1 naming both causes (0.2.2 blamed another worker only), and the next run delivers every
/// committed message once.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_paused_past_its_transaction_timeout_stops_and_its_next_run_loses_nothing() {
    let kafka = KafkaBroker::start_with(
        KafkaOptions {
            properties: vec![
                "transaction.abort.timed.out.transaction.cleanup.interval.ms=500".into(),
            ],
            ..Default::default()
        },
        &[("orders", 3)],
    );
    let pg = PgCluster::start().await;
    let config =
        Worker::config_file("[sinks.kafka.properties]\n\"transaction.timeout.ms\" = 3000\n");
    let args = kafka_args(&pg.url(), &kafka.brokers(), config.path());
    let mut worker = Worker::start(&args, None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    let next: Counter = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = (0..2)
        .map(|n| spawn_publisher(&pg, n, next.clone(), stop.clone()))
        .collect();
    // A pause between two Kafka transactions harms nothing: pause while the worker streams a
    // large one (its Kafka transactions follow each other without a gap), until one is caught.
    let mut status = None;
    for _ in 0..5 {
        let first = next.fetch_add(20_000, Ordering::AcqRel);
        publish(&db, first, 20_000, "big", 10, false).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        signal(worker.pid(), "STOP");
        tokio::time::sleep(Duration::from_secs(6)).await;
        signal(worker.pid(), "CONT");
        status = eventually_exited(&mut worker, Duration::from_secs(15)).await;
        if status.is_some() {
            break;
        }
    }
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", worker.log());
    // Fenced (the coordinator bumped the epoch), or librdkafka's own INVALID_TXN_STATE when it
    // aborts the timed-out transaction itself (its issue #3297): either way it stops, saying so.
    let log = worker.log();
    assert!(
        log.contains("outlived transaction.timeout.ms")
            || log.contains("the transactional producer failed for good"),
        "{log}"
    );
    let _next_run = Worker::start(&args, None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);
    for publisher in publishers {
        publisher.await.unwrap();
    }
    let total = next.load(Ordering::Acquire);
    let seen = read_committed(&kafka, total).await;
    let tally = check_delivery(&seen, total);
    eprintln!("paused past the transaction timeout: {total} messages: {tally:?}");
    assert_eq!(tally.duplicates, 0, "{tally:?}");
}

/// The worker's exit status once it exited, if within `timeout`.
async fn eventually_exited(
    worker: &mut Worker,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Some(status) = worker.exited() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
