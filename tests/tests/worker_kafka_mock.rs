//! Broker faults injected with librdkafka's mock cluster (in this process; the worker subprocess
//! connects to it over TCP): produce errors, then every broker down for 10 s. Nothing is lost.

use std::time::Duration;

use outbox_tests::kafka::read_until;
use outbox_tests::publish::{check_delivery, publish_range, Storage};
use outbox_tests::worker::kafka_args;
use outbox_tests::{PgCluster, Worker};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

#[tokio::test(flavor = "multi_thread")]
async fn produce_errors_and_brokers_down_for_ten_seconds_lose_nothing() {
    const TOTAL: u64 = 15_000;
    let mock = MockCluster::new(3).expect("mock cluster");
    mock.create_topic("orders", 3, 3).unwrap();
    let brokers = mock.bootstrap_servers();
    let pg = PgCluster::start().await;
    let config = Worker::config_file("[sinks.kafka.properties]\n\"message.timeout.ms\" = 3000\n");
    let worker = Worker::start(&kafka_args(&pg.url(), &brokers, config.path()), None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    // Retriable errors on the next produce requests; librdkafka retries them itself, in order.
    // (A permanent one is not injected here: unlike Kafka, the mock broker accepts the batches
    // after a refused one instead of rejecting them as out of sequence, so the re-sent batch lands
    // behind them. The permanent path is tested against tansu with an oversize message.)
    use RDKafkaRespErr::*;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RD_KAFKA_RESP_ERR__TRANSPORT,
        ],
    );
    publish_range(&db, "orders", 0, 5_000, 30, Storage::Mixed).await;

    mock.broker_down(-1).unwrap();
    publish_range(&db, "orders", 5_000, 5_000, 30, Storage::Mixed).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    mock.broker_up(-1).unwrap();
    publish_range(&db, "orders", 10_000, 5_000, 30, Storage::Mixed).await;

    let records = tokio::task::spawn_blocking(move || {
        read_until(
            &brokers,
            &["orders"],
            TOTAL as usize,
            Duration::from_secs(180),
        )
    })
    .await
    .unwrap();
    let seen: Vec<_> = records.iter().map(|r| r.seen()).collect();
    let tally = check_delivery(&seen, TOTAL);
    eprintln!("mock cluster faults: {tally:?}");
    assert!(
        worker.log().contains("retrying them in order"),
        "the worker's retry path ran:\n{}",
        worker.log()
    );
}
