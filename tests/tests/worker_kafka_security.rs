//! The worker against Apache Kafka's secured listeners, for real: SASL/SCRAM-SHA-256 and TLS with
//! a test CA, and a topic its user is denied by an ACL (issue 29). Read back through the plain
//! listener.

use std::time::Duration;

use outbox_tests::kafka::{self, Record};
use outbox_tests::kafka_broker::SCRAM_USER;
use outbox_tests::postgres::count;
use outbox_tests::publish::{check_delivery, only_dead_letter, publish_range, Seen, Storage};
use outbox_tests::worker::config_args;
use outbox_tests::{eventually, KafkaBroker, KafkaOptions, PgCluster, Worker};

fn seen(records: &[Record]) -> Vec<Seen> {
    records.iter().map(Record::seen).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn scram_and_tls_listeners_deliver_and_an_acl_refusal_is_dead_lettered_alone() {
    let kafka = tokio::task::spawn_blocking(|| {
        KafkaBroker::start_with(
            KafkaOptions {
                secured: true,
                ..Default::default()
            },
            &[("orders", 2), ("billing", 2), ("forbidden", 1)],
        )
    });
    let pg = PgCluster::start().await;
    let kafka = kafka.await.unwrap();
    let (user, password) = SCRAM_USER;
    kafka.add_acl(&[
        "--deny-principal",
        &format!("User:{user}"),
        "--operation",
        "Write",
        "--topic",
        "forbidden",
    ]);
    let config = Worker::config_file(&format!(
        "[delivery]\nmax_attempts = 2\nretry_initial = \"50ms\"\n\
         [sinks.scram]\ntype = \"kafka\"\nbrokers = \"{sasl}\"\n\
         [sinks.scram.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\
         \"sasl.mechanism\" = \"SCRAM-SHA-256\"\n\"sasl.username\" = \"{user}\"\n\
         \"sasl.password\" = \"{password}\"\n\
         [sinks.tls]\ntype = \"kafka\"\nbrokers = \"{ssl}\"\n\
         [sinks.tls.properties]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{ca}\"\n\
         [[routes]]\nqueues = [\"orders\", \"forbidden\"]\nsink = \"scram\"\n\
         [[routes]]\nqueues = \"billing\"\nsink = \"tls\"\n",
        sasl = kafka.sasl_brokers(),
        ssl = kafka.ssl_brokers(),
        ca = kafka.ca_pem().display(),
    ));
    let worker = Worker::start(&config_args(&pg.url(), config.path()), None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    publish_range(&db, "orders", 0, 100, 5, Storage::Mixed).await;
    db.batch_execute("SELECT outbox.publish('forbidden', '{\"denied\": 1}', '{}', 'f-0')")
        .await
        .unwrap();
    publish_range(&db, "billing", 1_000, 100, 5, Storage::Mixed).await;
    publish_range(&db, "orders", 100, 100, 5, Storage::Mixed).await;

    let orders = kafka::read(&kafka.brokers(), "orders", 200, Duration::from_secs(120)).await;
    check_delivery(&seen(&orders), 200);
    let billing = kafka::read(&kafka.brokers(), "billing", 100, Duration::from_secs(120)).await;
    assert_eq!(
        seen(&billing)
            .iter()
            .map(|s| s.id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        100,
        "the TLS listener delivered every billing message:\n{}",
        worker.log()
    );
    let db = &db;
    eventually(
        Duration::from_secs(60),
        "the denied message dead-lettered",
        || async move { count(db, "SELECT count(*) FROM outbox.dead_letters").await == 1 },
    )
    .await;
    let (_, destination, error, _) = only_dead_letter(db).await;
    assert_eq!(destination, "scram:forbidden");
    assert!(error.contains("TopicAuthorizationFailed"), "{error}");
}
