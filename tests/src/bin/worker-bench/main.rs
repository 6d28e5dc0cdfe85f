//! worker-bench: how fast the worker delivers, end to end, on this machine, against what the
//! slot's decoding and each broker's bare client reach on the same machine.
//!
//! Throughput: a backlog of N messages (default 200k) is committed first, then drained by one
//! consumer per slot: `pg_recvlogical` (the walsender's raw decoding rate), the worker with the
//! `discard` sink, with `stdout`, with Kafka (kafka) and with RabbitMQ (per-key order, the default,
//! and pipelined). Time runs from the worker's start until the slot is confirmed past the backlog,
//! i.e. every message acknowledged; the worker's peak RSS (`VmHWM`) is read at that point.
//! Per storage form. Beside them, without PostgreSQL: a bare rdkafka producer with the worker's
//! client properties, records, headers and keys against the same kafka, and a bare lapin publisher
//! with publisher confirms and one unconfirmed message per key against the same RabbitMQ.
//! Latency (`latency.rs`): commit → consumed at 1,000 and 10,000 msg/s.
//! Writes the tables into BENCHMARKS.md between the `worker` and `worker-latency` markers. Run
//! with bench/worker.sh.
//! `worker-bench N --memory`: only the table-storage drains of discard, Kafka and RabbitMQ with
//! their peak RSS, written between the `worker-memory` markers (for the 1M-message backlog).
//! `worker-bench 0 --latency`: only the latency tables.
//! `worker-bench N --debezium`: only Debezium beside the worker (`debezium.rs`), a backlog of N
//! (100k in the full run), written between the `versus-debezium` markers.
//! `worker-bench N --tracing`: only the cost of trace export (`traces.rs`), written between the
//! `worker-tracing` markers.
//! `worker-bench N --slots`: only what one more slot costs (`slots.rs`), on the primary and on a
//! standby, written between the `worker-slots` markers.
//! `worker-bench N --split`: only one worker against two on disjoint queue sets (`split.rs`),
//! written between the `worker-split` markers.

mod debezium;
mod latency;
mod slots;
mod split;
mod traces;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use outbox_tests::publish::{publish_range_with, Storage};
use outbox_tests::{KafkaBroker, PgCluster, RabbitMq, Worker};
use outbox_worker::config::KafkaSinkConfig;
use outbox_worker::sink::kafka::client_config;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use tokio_postgres::Client;

/// Keys of the backlog, `k-0..k-99`, as `publish_range` publishes them.
const KEYS: u64 = 100;
/// The worker's default `delivery.max_in_flight`: the bare producer's window too.
const MAX_IN_FLIGHT: usize = 10_000;
struct Brokers {
    kafka: KafkaBroker,
    /// librdkafka's in-process broker: the latency runs' second Kafka.
    mock: MockCluster<'static, DefaultProducerContext>,
    rabbit: RabbitMq,
}

/// One drain of the backlog by one consumer.
struct Drain {
    rate: f64,
    /// The rate from the worker's first "streaming" log line (after its start-up: an
    /// exactly-once Kafka sink fences and reads its progress first), when known.
    streaming_rate: Option<f64>,
    /// Peak RSS of the worker process, kB (none for `pg_recvlogical`).
    peak_kb: Option<u64>,
    /// CPU time the worker process used, user + system, seconds (none for `pg_recvlogical`).
    cpu_seconds: Option<f64>,
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let backlog: u64 = args
        .next()
        .map(|a| a.parse().expect("backlog size"))
        .unwrap_or(200_000);
    let mode = args.next();
    let brokers = Brokers {
        kafka: KafkaBroker::start(&[("orders", 3)]),
        mock: MockCluster::new(1).expect("mock cluster"),
        rabbit: RabbitMq::start(),
    };
    brokers
        .rabbit
        .declare("bench", "direct", "orders", "orders");
    brokers
        .rabbit
        .declare("bench", "direct", "latency", "latency");
    let latency = || latency::latency_table(&brokers.kafka, &brokers.mock, &brokers.rabbit);
    match mode.as_deref() {
        Some("--memory") => {
            let table = memory_table(&brokers, backlog).await;
            println!("{table}");
            write_section("worker-memory", &table);
        }
        Some("--debezium") => {
            let table = debezium::versus_table(&brokers.kafka, backlog).await;
            println!("{table}");
            write_section("versus-debezium", &table);
        }
        Some("--throughput") => {
            let table = throughput_table(&brokers, backlog).await;
            println!("{table}");
            write_section("worker", &table);
        }
        Some("--tracing") => {
            let table = traces::tracing_table(&brokers.kafka, backlog).await;
            println!("{table}");
            write_section("worker-tracing", &table);
        }
        Some("--slots") => {
            let table = slots::slots_table(backlog).await;
            println!("{table}");
            write_section("worker-slots", &table);
        }
        Some("--split") => {
            let table = split::split_table(&brokers.rabbit, backlog).await;
            println!("{table}");
            write_section("worker-split", &table);
        }
        Some("--latency") => {
            let table = latency().await;
            println!("{table}");
            write_section("worker-latency", &table);
        }
        _ => {
            let table = throughput_table(&brokers, backlog).await;
            println!("{table}");
            write_section("worker", &table);
            let table = latency().await;
            println!("{table}");
            write_section("worker-latency", &table);
            let table = debezium::versus_table(&brokers.kafka, 100_000).await;
            println!("{table}");
            write_section("versus-debezium", &table);
            let table = traces::tracing_table(&brokers.kafka, backlog).await;
            println!("{table}");
            write_section("worker-tracing", &table);
            let table = slots::slots_table(backlog).await;
            println!("{table}");
            write_section("worker-slots", &table);
            let table = split::split_table(&brokers.rabbit, backlog).await;
            println!("{table}");
            write_section("worker-split", &table);
        }
    }
}

/// The worker's sink configurations, by slot name.
fn sinks(brokers: &Brokers) -> Vec<(&'static str, String)> {
    let amqp = format!(
        "[sinks.a]\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"bench\"\n",
        brokers.rabbit.url()
    );
    vec![
        ("discard", "[sinks.d]\ntype = \"discard\"\n".to_owned()),
        ("stdout", "[sinks.s]\ntype = \"stdout\"\n".to_owned()),
        (
            "kafka",
            format!(
                "[sinks.k]\ntype = \"kafka\"\nbrokers = \"{}\"\n",
                brokers.kafka.brokers()
            ),
        ),
        (
            "kafka_at_least_once",
            format!(
                "[sinks.k]\ntype = \"kafka\"\nbrokers = \"{}\"\nexactly_once = false\n",
                brokers.kafka.brokers()
            ),
        ),
        ("amqp", amqp.clone()),
        (
            "amqp_pipelined",
            format!("[delivery]\nordering = \"pipelined\"\n{amqp}"),
        ),
    ]
}

async fn throughput_table(brokers: &Brokers, backlog: u64) -> String {
    eprintln!("==> bare clients: {backlog} messages");
    let bare_kafka = bare_kafka(&brokers.kafka.brokers(), backlog).await;
    eprintln!("    bare rdkafka: {bare_kafka:.0} msg/s");
    purge(&brokers.rabbit).await;
    let bare_amqp = bare_amqp(&brokers.rabbit.url(), backlog).await;
    eprintln!("    bare lapin, one unconfirmed per key: {bare_amqp:.0} msg/s");
    purge(&brokers.rabbit).await;
    let mut table = format!(
        "Drain a committed backlog of {backlog} messages (transactions of 1–50, {KEYS} keys), messages/s. \
         Decoding = the faster of `pg_recvlogical` and the `discard` sink. Bare clients, without \
         PostgreSQL, same broker, records, headers and keys: rdkafka {bare_kafka:.0} msg/s \
         (the worker's client properties, {MAX_IN_FLIGHT} in flight); lapin {bare_amqp:.0} msg/s \
         (publisher confirms, persistent, mandatory, one unconfirmed message per key).\n\n\
         In brackets: from the worker's \"streaming\" log line, after its start-up (an exactly-once \
         Kafka sink first fences earlier writers and reads its progress).\n\n\
         | storage | consumer | msg/s | ceiling | worker / ceiling | peak RSS |\n\
         |---|---|---|---|---|---|\n"
    );
    for (name, storage) in [("table", Storage::Table), ("wal", Storage::Wal)] {
        let mut slots = vec!["ceiling"];
        slots.extend(sinks(brokers).iter().map(|(slot, _)| *slot));
        let (pg, db, end) = backlog_cluster(&slots, backlog, storage).await;
        let recvlogical = recvlogical(&pg, &end, backlog);
        let mut drains = Vec::new();
        for (slot, sink) in sinks(brokers) {
            drains.push((slot, drain(&pg, &db, slot, &sink, &end, backlog).await));
            if slot.starts_with("amqp") {
                purge(&brokers.rabbit).await;
            }
        }
        let decoding = recvlogical.rate.max(drains[0].1.rate);
        table.push_str(&row(name, "pg_recvlogical", &recvlogical, None));
        for (slot, drain) in &drains {
            let ceiling = match *slot {
                "kafka" | "kafka_at_least_once" => Some(decoding.min(bare_kafka)),
                "amqp" | "amqp_pipelined" => Some(decoding.min(bare_amqp)),
                _ => None,
            };
            table.push_str(&row(name, &format!("worker → {slot}"), drain, ceiling));
        }
    }
    table
}

/// The 1M-message memory rows: table storage, the discard, Kafka and RabbitMQ sinks.
async fn memory_table(brokers: &Brokers, backlog: u64) -> String {
    let chosen = ["discard", "kafka", "amqp", "amqp_pipelined"];
    let (pg, db, end) = backlog_cluster(&chosen, backlog, Storage::Table).await;
    let mut table = format!(
        "Peak RSS of the worker draining a committed backlog of {backlog} messages (table storage, \
         `worker-bench {backlog} --memory`):\n\n\
         | storage | consumer | msg/s | ceiling | worker / ceiling | peak RSS |\n\
         |---|---|---|---|---|---|\n"
    );
    for (slot, sink) in sinks(brokers) {
        if chosen.contains(&slot) {
            let drain = drain(&pg, &db, slot, &sink, &end, backlog).await;
            table.push_str(&row("table", &format!("worker → {slot}"), &drain, None));
            purge(&brokers.rabbit).await;
        }
    }
    table
}

fn row(storage: &str, consumer: &str, drain: &Drain, ceiling: Option<f64>) -> String {
    let (ceiling, ratio) = match ceiling {
        Some(c) => (format!("{c:.0}"), format!("{:.0}%", 100.0 * drain.rate / c)),
        None => ("".into(), "".into()),
    };
    let rss = drain
        .peak_kb
        .map(|kb| format!("{:.0} MiB", kb as f64 / 1024.0))
        .unwrap_or_default();
    let streaming = drain
        .streaming_rate
        .map(|r| format!(" ({r:.0})"))
        .unwrap_or_default();
    format!(
        "| {storage} | {consumer} | {:.0}{streaming} | {ceiling} | {ratio} | {rss} |\n",
        drain.rate
    )
}

/// A cluster with one slot per consumer and the backlog committed; returns the end LSN.
async fn backlog_cluster(
    slots: &[&str],
    backlog: u64,
    storage: Storage,
) -> (PgCluster, Client, String) {
    backlog_cluster_with(slots, backlog, storage, r#"'{"test": "yes"}'"#).await
}

/// [`backlog_cluster`] with each message's headers an SQL expression of its index `i`.
async fn backlog_cluster_with(
    slots: &[&str],
    backlog: u64,
    storage: Storage,
    headers: &str,
) -> (PgCluster, Client, String) {
    let pg = PgCluster::start_with_conf("max_replication_slots = 20\nmax_wal_senders = 20\n").await;
    let db = pg.superuser().await;
    for slot in slots {
        db.query_one(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[slot],
        )
        .await
        .unwrap();
    }
    eprintln!("==> {storage:?}: publishing {backlog} messages");
    publish_range_with(&db, "orders", 0, backlog, KEYS, storage, headers).await;
    let end: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    (pg, db, end)
}

fn recvlogical(pg: &PgCluster, end: &str, backlog: u64) -> Drain {
    let started = Instant::now();
    let port = pg.port.to_string();
    let status = Command::new(outbox_tests::postgres::program("pg_recvlogical"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["--slot", "ceiling", "--start", "--no-loop", "--endpos", end])
        .args(["-f", "/dev/null", "-o", "proto_version=1"])
        .args(["-o", "publication_names=pg_outbox", "-o", "messages=true"])
        .status()
        .expect("pg_recvlogical");
    assert!(status.success());
    let rate = backlog as f64 / started.elapsed().as_secs_f64();
    eprintln!("    pg_recvlogical: {rate:.0} msg/s");
    Drain {
        rate,
        streaming_rate: None,
        peak_kb: None,
        cpu_seconds: None,
    }
}

async fn drain(
    pg: &PgCluster,
    db: &Client,
    slot: &str,
    sink: &str,
    end: &str,
    backlog: u64,
) -> Drain {
    let config = Worker::config_file(&format!(
        "[postgres]\nstatus_interval = \"10ms\"\nsetup = false\n{sink}"
    ));
    let started = Instant::now();
    let url = pg.url();
    let path = config.path().to_str().unwrap();
    let args = [
        "run",
        "--postgres-url",
        &url,
        "--slot",
        slot,
        "--config",
        path,
    ];
    let mut worker = Worker::start(&args, None);
    let mut streaming = None;
    while !is_confirmed(db, slot, end).await {
        if streaming.is_none() && worker.log().contains("streaming") {
            streaming = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = backlog as f64 / started.elapsed().as_secs_f64();
    let streaming_rate = streaming.map(|at| backlog as f64 / at.elapsed().as_secs_f64());
    let peak_kb = peak_rss_kb(worker.pid());
    let cpu_seconds = debezium::cpu_seconds(worker.pid());
    eprintln!("    {slot}: {rate:.0} msg/s, peak RSS {peak_kb} kB");
    worker.terminate(Duration::from_secs(60));
    Drain {
        rate,
        streaming_rate,
        peak_kb: Some(peak_kb),
        cpu_seconds: Some(cpu_seconds),
    }
}

/// `VmHWM` of a process: its peak resident set, kB.
fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

async fn is_confirmed(db: &Client, slot: &str, end: &str) -> bool {
    db.query_one(
        "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot, &end],
    )
    .await
    .unwrap()
    .get(0)
}

/// What the worker sends for message `i` of the backlog: key, payload, and its headers (the
/// publisher's `test: yes` and the four outbox headers), fresh per message as the worker builds them.
struct Record {
    key: String,
    payload: String,
    headers: [(&'static str, String); 5],
}

fn record(i: u64) -> Record {
    let key = format!("k-{}", i % KEYS);
    Record {
        payload: format!("{{\"i\": {i}, \"key\": \"{key}\"}}"),
        key,
        headers: [
            ("test", "yes".into()),
            ("outbox-id", uuid::Uuid::now_v7().to_string()),
            ("outbox-queue", "orders".into()),
            (
                "outbox-created-at",
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
            ("content-type", "application/json".into()),
        ],
    }
}

/// A bare rdkafka producer with the worker's client properties (its own `client_config`, for a
/// sink without properties), at most [`MAX_IN_FLIGHT`] unacknowledged, from its creation
/// until every message is acknowledged.
async fn bare_kafka(brokers: &str, count: u64) -> f64 {
    let started = Instant::now();
    let config = KafkaSinkConfig {
        brokers: brokers.to_owned(),
        records: "outbox".into(),
        properties: Default::default(),
        exactly_once: false,
        progress_topic: "pg_outbox-progress".into(),
    };
    let producer: FutureProducer = client_config(&config, MAX_IN_FLIGHT)
        .create()
        .expect("producer");
    let mut in_flight = FuturesUnordered::new();
    for i in 0..count {
        if in_flight.len() >= MAX_IN_FLIGHT {
            in_flight.next().await;
        }
        let r = record(i);
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
        for (key, value) in &r.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        let sent = FutureRecord::to("orders")
            .key(&r.key)
            .payload(&r.payload)
            .headers(headers)
            .timestamp(chrono::Utc::now().timestamp_millis());
        let delivery = producer
            .send_result(sent)
            .map_err(|(e, _)| e)
            .expect("queued");
        in_flight.push(async move { delivery.await.expect("delivered").expect("acked") });
    }
    while in_flight.next().await.is_some() {}
    count as f64 / started.elapsed().as_secs_f64()
}

/// A bare lapin publisher, publisher confirms, the worker's properties (persistent, mandatory,
/// the same headers), one task per key with one unconfirmed message at a time; from the connection
/// until the last confirm.
async fn bare_amqp(url: &str, count: u64) -> f64 {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    use lapin::BasicProperties;
    let started = Instant::now();
    let (_connection, channel) = amqp_channel(url).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let channel = Arc::new(channel);
    let tasks = (0..KEYS).map(|key| {
        let channel = channel.clone();
        tokio::spawn(async move {
            for i in (key..count).step_by(KEYS as usize) {
                let r = record(i);
                let mut headers = FieldTable::default();
                for (k, v) in &r.headers[..4] {
                    headers.insert(
                        ShortString::from(k.to_string()),
                        AMQPValue::LongString(LongString::from(v.clone())),
                    );
                }
                let properties = BasicProperties::default()
                    .with_message_id(ShortString::from(r.headers[1].1.clone()))
                    .with_content_type(ShortString::from("application/json"))
                    .with_timestamp(chrono::Utc::now().timestamp() as u64)
                    .with_delivery_mode(2)
                    .with_headers(headers);
                let options = BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                };
                let confirm = channel
                    .basic_publish("bench", "orders", options, r.payload.as_bytes(), properties)
                    .await
                    .unwrap();
                assert!(confirm.await.unwrap().is_ack());
            }
        })
    });
    for task in tasks.collect::<Vec<_>>() {
        task.await.unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

async fn amqp_channel(url: &str) -> (lapin::Connection, lapin::Channel) {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Empties the backlog's queue, so that runs do not pile up in the broker.
async fn purge(rabbit: &RabbitMq) {
    let (_connection, channel) = amqp_channel(&rabbit.url()).await;
    channel
        .queue_purge("orders", Default::default())
        .await
        .unwrap();
}

/// Replaces the text between `<!-- {marker}:begin … -->` and `<!-- {marker}:end -->`.
fn write_section(marker: &str, table: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md");
    let text = std::fs::read_to_string(path).expect("BENCHMARKS.md");
    let begin = format!("<!-- {marker}:begin (written by bench/worker.sh) -->");
    let end = format!("<!-- {marker}:end -->");
    let section = format!("{begin}\n{table}{end}");
    let updated = match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) => format!("{}{section}{}", &text[..b], &text[e + end.len()..]),
        _ => format!("{text}\n{section}\n"),
    };
    std::fs::write(path, updated).expect("write BENCHMARKS.md");
}
