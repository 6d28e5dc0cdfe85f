//! worker-bench: how fast the worker delivers, end to end, on this machine.
//!
//! Throughput: a backlog of N messages (default 200k) is committed first, then drained by one
//! consumer per slot: `pg_recvlogical` (the walsender's raw decoding rate), the worker
//! with the `discard` sink, with `stdout`, and with Kafka (tansu). Time runs from the worker's start
//! until the slot is confirmed past the backlog, i.e. every message acknowledged. Per storage form.
//! RabbitMQ (a node started hermetically) is drained the same way.
//! Latency: 1 message per transaction at 1,000 msg/s for 10 s to Kafka and to RabbitMQ; commit → consumed.
//! Writes the table into BENCHMARKS.md between the `worker` markers. Run with bench/worker.sh.

use std::process::Command;
use std::time::{Duration, Instant};

use outbox_tests::publish::{publish_range, Storage};
use outbox_tests::worker::config_args;
use outbox_tests::{PgCluster, RabbitMq, Tansu, Worker};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use tokio_postgres::Client;

const SLOTS: [&str; 5] = ["ceiling", "discard", "stdout", "kafka", "amqp"];

#[tokio::main]
async fn main() {
    let backlog: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("backlog size"))
        .unwrap_or(200_000);
    let tansu = Tansu::start(&[("orders", 3), ("latency", 1)]);
    let rabbit = RabbitMq::start();
    rabbit.declare("bench", "direct", "orders", "orders");
    rabbit.declare("bench", "direct", "latency", "latency");
    let mut table = String::new();
    table.push_str(&format!(
        "Drain a committed backlog of {backlog} messages (transactions of 1–50, 100 keys), messages/s:\n\n\
         | storage | pg_recvlogical (decoding only) | worker → discard | worker → stdout | worker → Kafka (tansu) | worker → RabbitMQ | Kafka / decoding rate |\n\
         |---|---|---|---|---|---|---|\n"
    ));
    for (name, storage) in [("table", Storage::Table), ("wal", Storage::Wal)] {
        let pg = PgCluster::start().await;
        let db = pg.superuser().await;
        for slot in SLOTS {
            db.query_one(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .unwrap();
        }
        eprintln!("==> {name}: publishing {backlog} messages");
        publish_range(&db, "orders", 0, backlog, 100, storage).await;
        let end: String = db
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);

        let started = Instant::now();
        let status = Command::new(outbox_tests::postgres::program("pg_recvlogical"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args([
                "--slot",
                "ceiling",
                "--start",
                "--no-loop",
                "--endpos",
                &end,
                "-f",
                "/dev/null",
            ])
            .args([
                "-o",
                "proto_version=1",
                "-o",
                "publication_names=pg_outbox",
                "-o",
                "messages=true",
            ])
            .status()
            .expect("pg_recvlogical");
        assert!(status.success());
        let ceiling = backlog as f64 / started.elapsed().as_secs_f64();

        let mut rates = Vec::new();
        for (slot, sink) in [
            ("discard", "[sinks.d]\ntype = \"discard\"\n".to_owned()),
            ("stdout", "[sinks.s]\ntype = \"stdout\"\n".to_owned()),
            (
                "amqp",
                format!(
                    "[sinks.a]\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"bench\"\n",
                    rabbit.url()
                ),
            ),
            (
                "kafka",
                format!(
                    "[sinks.k]\ntype = \"kafka\"\nbrokers = \"{}\"\n",
                    tansu.brokers()
                ),
            ),
        ] {
            let config = Worker::config_file(&format!(
                "[postgres]\nstatus_interval = \"10ms\"\nsetup = false\n{sink}"
            ));
            let started = Instant::now();
            let mut worker = Worker::start(
                &[
                    "run",
                    "--postgres-url",
                    &pg.url(),
                    "--slot",
                    slot,
                    "--config",
                    config.path().to_str().unwrap(),
                ],
                None,
            );
            wait_confirmed(&db, slot, &end).await;
            let rate = backlog as f64 / started.elapsed().as_secs_f64();
            eprintln!("    {slot}: {rate:.0} msg/s");
            worker.terminate(Duration::from_secs(60));
            rates.push(rate);
        }
        eprintln!("    pg_recvlogical: {ceiling:.0} msg/s");
        table.push_str(&format!(
            "| {name} | {ceiling:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}% |\n",
            rates[0],
            rates[1],
            rates[3],
            rates[2],
            // The discard sink also only decodes: the faster of the two is the slot's real rate.
            100.0 * rates[3] / ceiling.max(rates[0])
        ));
    }

    table.push_str(
        "\nCommit → consumed, 1 message per transaction at 1,000 msg/s for 10 s, the first second \
         excluded as warm-up (table storage):\n\n| sink | messages measured | p50 | p99 |\n|---|---|---|---|\n",
    );
    for target in [Target::Kafka(&tansu), Target::Amqp(&rabbit)] {
        let name = match target {
            Target::Kafka(_) => "Kafka (tansu)",
            Target::Amqp(_) => "RabbitMQ",
        };
        let (p50, p99, count) = latency(target).await;
        eprintln!("    latency {name}: p50 {p50:.1} ms, p99 {p99:.1} ms");
        table.push_str(&format!(
            "| {name} | {count} | {p50:.1} ms | {p99:.1} ms |\n"
        ));
    }
    println!("{table}");
    write_section(&table);
}

async fn wait_confirmed(db: &Client, slot: &str, end: &str) {
    loop {
        let done: bool = db
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &end],
            )
            .await
            .unwrap()
            .get(0);
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[derive(Clone, Copy)]
enum Target<'a> {
    Kafka(&'a Tansu),
    Amqp(&'a RabbitMq),
}

/// Publishes at a fixed rate while a consumer measures now − the commit for every message
/// (`outbox-created-at`, the publishing transaction's start, a few µs before its commit).
async fn latency(target: Target<'_>) -> (f64, f64, usize) {
    const RATE: u64 = 1000;
    const SECONDS: u64 = 10;
    let total = (RATE * SECONDS) as usize;
    let pg = PgCluster::start().await;
    let sink = match target {
        Target::Kafka(tansu) => format!(
            "[sinks.k]\ntype = \"kafka\"\nbrokers = \"{}\"\n[sinks.k.properties]\n\"linger.ms\" = 1\n",
            tansu.brokers()
        ),
        Target::Amqp(rabbit) => format!("[sinks.a]\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"bench\"\n", rabbit.url()),
    };
    let config = Worker::config_file(&sink);
    let _worker = Worker::start(&config_args(&pg.url(), config.path()), None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    let consumer = match target {
        Target::Kafka(tansu) => {
            let brokers = tansu.brokers();
            tokio::task::spawn_blocking(move || kafka_latencies(&brokers, total))
        }
        Target::Amqp(rabbit) => {
            let url = rabbit.url();
            tokio::spawn(async move { amqp_latencies(&url, total).await })
        }
    };
    let started = tokio::time::Instant::now();
    for i in 0..RATE * SECONDS {
        tokio::time::sleep_until(started + Duration::from_micros(i * 1_000_000 / RATE)).await;
        db.execute(
            "SELECT outbox.publish('latency', '{\"n\": 1}', '{}', 'k')",
            &[],
        )
        .await
        .unwrap();
    }
    let latencies = consumer.await.unwrap();
    assert_eq!(latencies.len(), total, "every latency message arrived");
    // The first second warms up connections and metadata on both ends: not steady state.
    let mut latencies = latencies[RATE as usize..].to_vec();
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    (pick(0.50), pick(0.99), latencies.len())
}

fn millis_since(created_at: &str) -> f64 {
    let created = chrono::DateTime::parse_from_rfc3339(created_at).unwrap();
    (chrono::Utc::now() - created.to_utc())
        .num_microseconds()
        .unwrap() as f64
        / 1000.0
}

fn kafka_latencies(brokers: &str, total: usize) -> Vec<f64> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench")
        .set("fetch.wait.max.ms", "1")
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment
        .add_partition_offset("latency", 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let mut latencies = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(120);
    while latencies.len() < total && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let created = m
                .headers()
                .and_then(|hs| hs.iter().find(|h| h.key == "outbox-created-at"))
                .and_then(|h| std::str::from_utf8(h.value?).ok().map(str::to_owned))
                .expect("outbox-created-at header");
            latencies.push(millis_since(&created));
        }
    }
    latencies
}

async fn amqp_latencies(url: &str, total: usize) -> Vec<f64> {
    use futures::StreamExt;
    use lapin::options::BasicConsumeOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = channel
        .basic_consume("latency", "bench", options, FieldTable::default())
        .await
        .unwrap();
    let mut latencies = Vec::with_capacity(total);
    while latencies.len() < total {
        let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_secs(60), consumer.next()).await
        else {
            break;
        };
        let created = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("outbox-created-at").cloned())
            .and_then(|v| match v {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                _ => None,
            })
            .expect("outbox-created-at header");
        latencies.push(millis_since(&created));
    }
    latencies
}

fn write_section(table: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md");
    let text = std::fs::read_to_string(path).expect("BENCHMARKS.md");
    let (begin, end) = (
        "<!-- worker:begin (written by bench/worker.sh) -->",
        "<!-- worker:end -->",
    );
    let section = format!("{begin}\n{table}{end}");
    let updated = match (text.find(begin), text.find(end)) {
        (Some(b), Some(e)) => format!("{}{section}{}", &text[..b], &text[e + end.len()..]),
        _ => format!("{text}\n## Worker: end-to-end delivery\n\n{section}\n"),
    };
    std::fs::write(path, updated).expect("write BENCHMARKS.md");
}
