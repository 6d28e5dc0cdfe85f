//! `records = "debezium"`: the worker's Kafka records are those Debezium's Outbox Event Router
//! writes with its defaults, so consumers written against Debezium keep working after the switch.
//! Debezium 3.6.1 (Kafka Connect standalone) and the worker run side by side on one database and
//! one Apache Kafka; each event is written both ways in one transaction with the same id, and the
//! records are compared one by one: topic, partition, key, value bytes, the `id` header, and the
//! order of each key's events. And the cut-over from Debezium the README describes, done with
//! publishers running.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_tests::debezium::{self, Connect};
use outbox_tests::kafka::{read_until, Record};
use outbox_tests::worker::config_args;
use outbox_tests::{KafkaBroker, PgCluster, Worker};

const TOPIC: &str = "outbox.event.orders";

/// Payloads whose text jsonb normalizes (spacing, key order, duplicate keys, numbers, escapes),
/// so that equal bytes mean the same rendering, not the same input.
const PAYLOADS: &[&str] = &[
    r#"{"order_id":1,"total":"9.99"}"#,
    r#"{ "b" : [1 , 2.50, -0.0, 1e3], "a" : {"nested": {"deep": true}} }"#,
    r#"{"text": "ünïcødé ✓ \u00e9 \ud83d\ude00", "escapes": "\"quoted\" \\ \n \t \u0001"}"#,
    r#"{"big": 123456789012345678901234567890.123456789, "tiny": 1e-30, "dup": 1, "dup": 2}"#,
    r#"[1, "two", null, false, {"three": 3}]"#,
    r#"{}"#,
    r#"{"long": "0123456789012345678901234567890123456789012345678901234567890123456789"}"#,
];
const KEYS: &[&str] = &["order-1", "order-2", "ключ-3", "order 4", "o5"];

#[tokio::test(flavor = "multi_thread")]
async fn the_workers_records_are_those_of_debeziums_outbox_event_router() {
    let kafka = KafkaBroker::start(&[(TOPIC, 3)]);
    let pg = PgCluster::start().await;
    debezium::create_outbox_table(&pg).await;
    let config = Worker::config_file(&format!(
        "[delivery]\nmax_attempts = 2\nretry_initial = \"50ms\"\n\
         [sinks.k]\ntype = \"kafka\"\nbrokers = \"{}\"\nrecords = \"debezium\"\n",
        kafka.brokers()
    ));
    let worker = Worker::start(&config_args(&pg.url(), config.path()), None);
    let mut db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    let connect = Connect::start(&pg, &kafka, "", "");

    // Each event twice in one transaction, both storage forms in turn: the worker's through
    // outbox.publish, Debezium's into its outbox table with the id outbox.publish returned.
    let mut events = 0;
    for round in 0..6 {
        for (i, payload) in PAYLOADS.iter().enumerate() {
            let key = KEYS[(round + i) % KEYS.len()];
            let form = if (round + i) % 2 == 0 { "table" } else { "wal" };
            let tx = db.transaction().await.unwrap();
            tx.batch_execute(&format!("SET LOCAL pg_outbox.storage = '{form}'"))
                .await
                .unwrap();
            // A publisher's own `id` header, once: kept, but not the one consumers read.
            let headers = if round == 0 && i == 0 {
                r#"{"id": "publisher-own"}"#
            } else {
                "{}"
            };
            tx.execute(
                "INSERT INTO public.outbox_event
                 SELECT outbox.publish('orders', $1::text::jsonb, $3::text::jsonb, $2), 'orders',
                        $2, 'OrderCreated', $1::text::jsonb",
                &[payload, &key, &headers],
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
            events += 1;
        }
    }

    let brokers = kafka.brokers();
    let records = tokio::task::spawn_blocking(move || read_all(&brokers, 2 * events))
        .await
        .unwrap();
    let is_debeziums = |r: &Record| r.headers.keys().any(|k| k.starts_with("__debezium"));
    let (theirs, ours): (Vec<&Record>, Vec<&Record>) =
        records.iter().partition(|r| is_debeziums(r));
    assert_eq!(
        (theirs.len(), ours.len()),
        (events, events),
        "each event once from each relay\nworker:\n{}\nKafka Connect:\n{}",
        worker.log(),
        connect.log_tail()
    );
    let id = |r: &Record| -> String {
        // What a Debezium consumer reads: the last `id` header.
        let ids: Vec<&String> = r
            .header_list
            .iter()
            .filter(|(k, _)| k == "id")
            .map(|(_, v)| v)
            .collect();
        ids.last()
            .map(|v| (*v).clone())
            .unwrap_or_else(|| panic!("no id header: {r:?}"))
    };
    let theirs_by_id: BTreeMap<String, &Record> = theirs.iter().map(|r| (id(r), *r)).collect();
    for our in &ours {
        let their = theirs_by_id
            .get(&id(our))
            .unwrap_or_else(|| panic!("Debezium has no record with id {}", id(our)));
        assert_eq!(our.topic, their.topic);
        assert_eq!(
            our.partition, their.partition,
            "same key, same partition: {our:?}"
        );
        assert_eq!(our.key, their.key);
        assert_eq!(
            String::from_utf8_lossy(&our.payload),
            String::from_utf8_lossy(&their.payload),
            "value bytes"
        );
        assert_eq!(id(our), our.headers["outbox-id"], "the id is the message's");
    }
    // Per key, both relays wrote the events in the same order.
    let order = |records: &[&Record]| -> BTreeMap<Option<String>, Vec<String>> {
        let mut by_key: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
        for r in records {
            by_key.entry(r.key.clone()).or_default().push(id(r));
        }
        by_key
    };
    assert_eq!(order(&ours), order(&theirs));
    let own: Vec<&&Record> = ours
        .iter()
        .filter(|r| {
            r.header_list
                .contains(&("id".into(), "publisher-own".into()))
        })
        .collect();
    assert_eq!(own.len(), 1, "the publisher's own id header is sent");

    // A queue whose `outbox.event.` topic is over Kafka's 249 characters: dead-lettered, saying
    // so (librdkafka alone says "Unknown topic", as if it were to be created).
    let long = "q".repeat(240);
    db.execute("SELECT outbox.publish($1, '{}', '{}', 'k')", &[&long])
        .await
        .unwrap();
    let db = &db;
    outbox_tests::eventually(
        Duration::from_secs(60),
        "the long topic's dead letter",
        || async move {
            outbox_tests::postgres::count(db, "SELECT count(*) FROM outbox.dead_letters").await == 1
        },
    )
    .await;
    let error: String = db
        .query_one("SELECT error FROM outbox.dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        error.contains("253 characters, over Kafka's limit of 249"),
        "{error}"
    );
    // The headers differ only by each relay's own: Debezium's context, the outbox headers.
    let names = |records: &[&Record]| -> BTreeSet<String> {
        records
            .iter()
            .flat_map(|r| r.headers.keys().cloned())
            .collect()
    };
    let (our_names, their_names) = (names(&ours), names(&theirs));
    let only_ours: Vec<&String> = our_names.difference(&their_names).collect();
    let only_theirs: Vec<&String> = their_names.difference(&our_names).collect();
    assert_eq!(
        only_ours,
        [
            "content-type",
            "outbox-created-at",
            "outbox-id",
            "outbox-queue"
        ]
    );
    assert!(
        only_theirs
            .iter()
            .all(|k| k.starts_with("__debezium.context.")),
        "{only_theirs:?}"
    );
}

/// Every record of the topic, once `want` are there.
fn read_all(brokers: &str, want: usize) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        // Read until the topic is idle: Debezium's records carry no outbox-id to count.
        let records = read_until(brokers, &[TOPIC], 1, Duration::from_secs(30));
        if records.len() >= want || Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The README's cut-over: the worker starts beside Debezium, the publishers switch from the outbox
/// table to outbox.publish one after the other while they publish, a fence row tells when
/// Debezium has read the last row, Debezium is stopped gracefully and its slot dropped. Every
/// event arrives once.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_over_from_debezium_under_traffic_loses_nothing() {
    const PUBLISHERS: usize = 4;
    const EACH: usize = 500;
    let kafka = KafkaBroker::start(&[(TOPIC, 3)]);
    let pg = PgCluster::start().await;
    // Debezium as many run it, capturing every table (the publication it would make itself with
    // `publication.autocreate.mode=all_tables`, made before its slot as it would be).
    pg.superuser()
        .await
        .batch_execute("CREATE PUBLICATION dbz_all FOR ALL TABLES")
        .await
        .unwrap();
    debezium::create_outbox_table(&pg).await;
    // pg_outbox's schema excluded (step 1 of the README), so that the worker's table-form rows
    // are not captured too.
    let connect = Connect::start(
        &pg,
        &kafka,
        "",
        "table.include.list=\n\
         publication.name=dbz_all\n\
         publication.autocreate.mode=all_tables\n\
         schema.exclude.list=outbox\n",
    );
    let db = pg.superuser().await;

    let mut publishers = Vec::new();
    let switch: Vec<Arc<AtomicBool>> = (0..PUBLISHERS).map(|_| Arc::default()).collect();
    for (p, switched) in switch.iter().enumerate() {
        let (db, switched) = (pg.superuser().await, switched.clone());
        publishers.push(tokio::spawn(async move {
            let old = db
                .prepare(
                    "INSERT INTO public.outbox_event \
                     VALUES (gen_random_uuid(), 'orders', $2, 'OrderCreated', $1::text::jsonb)",
                )
                .await
                .unwrap();
            let new = db
                .prepare("SELECT outbox.publish('orders', $1::text::jsonb, '{}', $2)")
                .await
                .unwrap();
            for n in 0..EACH {
                let payload = format!("{{\"publisher\": {p}, \"n\": {n}}}");
                let key = format!("k-{p}-{}", n % 5);
                let statement = if switched.load(Ordering::Relaxed) {
                    &new
                } else {
                    &old
                };
                db.execute(statement, &[&payload, &key]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    // 1. The worker beside Debezium, traffic still going through Debezium.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let config = Worker::config_file(&format!(
        "[sinks.k]\ntype = \"kafka\"\nbrokers = \"{}\"\nrecords = \"debezium\"\n",
        kafka.brokers()
    ));
    let worker = Worker::start(&config_args(&pg.url(), config.path()), None);
    pg.wait_for_slot(&db).await;
    // 2. The rollout: one publisher after the other.
    for switched in &switch {
        tokio::time::sleep(Duration::from_millis(150)).await;
        switched.store(true, Ordering::Relaxed);
    }
    for publisher in publishers {
        publisher.await.unwrap();
    }
    // 3. A last row as a fence: once it arrived, Debezium has read every row before it; its
    // graceful stop flushes what it sent; then its slot is dropped.
    db.execute(
        "INSERT INTO public.outbox_event \
         VALUES (gen_random_uuid(), 'orders', 'fence', 'Fence', '{\"fence\": true}')",
        &[],
    )
    .await
    .unwrap();
    let brokers = kafka.brokers();
    let fence_seen = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let records = read_until(&brokers, &[TOPIC], 1, Duration::from_secs(30));
            if records.iter().any(|r| r.key.as_deref() == Some("fence")) {
                return true;
            }
        }
        false
    });
    assert!(
        fence_seen.await.unwrap(),
        "the fence arrived:\n{}",
        connect.log_tail()
    );
    let log = connect.log_tail();
    tokio::task::spawn_blocking(move || connect.stop())
        .await
        .unwrap();
    db.execute("SELECT pg_drop_replication_slot('debezium')", &[])
        .await
        .unwrap();

    let brokers = kafka.brokers();
    let records = tokio::task::spawn_blocking(move || read_all(&brokers, PUBLISHERS * EACH + 1))
        .await
        .unwrap();
    let mut arrived: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    let mut through_debezium = 0;
    for r in records.iter().filter(|r| r.key.as_deref() != Some("fence")) {
        let value: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        *arrived
            .entry((
                value["publisher"].as_u64().unwrap(),
                value["n"].as_u64().unwrap(),
            ))
            .or_default() += 1;
        through_debezium += usize::from(!r.headers.contains_key("outbox-id"));
    }
    let missing = PUBLISHERS * EACH - arrived.len();
    let twice = arrived.values().filter(|c| **c > 1).count();
    eprintln!(
        "{} events, {through_debezium} through Debezium, {missing} missing, {twice} twice",
        PUBLISHERS * EACH
    );
    assert_eq!(
        (missing, twice),
        (0, 0),
        "worker:\n{}\nKafka Connect:\n{log}",
        worker.log()
    );
    assert!(
        through_debezium > 0 && through_debezium < PUBLISHERS * EACH,
        "both relays carried part of the traffic ({through_debezium} through Debezium)"
    );
}
