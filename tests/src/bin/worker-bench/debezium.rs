//! pg_outbox beside Debezium, one run, one machine: Debezium 3.6.1's PostgreSQL connector with the
//! Outbox Event Router in Kafka Connect standalone (what a user runs instead of outbox-worker),
//! and outbox-worker with each storage form, on the same PostgreSQL build and the same Apache
//! Kafka broker, each with a cluster and a topic of its own; Debezium at its defaults and tuned.
//!
//! Per contender: the drain of a committed backlog (from the process's start until the topic
//! holds every message), its peak RSS and CPU seconds, the WAL its slot retains while the outbox
//! is idle and the rest of the database is not, and commit → consumed latency at 1k and 10k
//! msg/s (one message per transaction, from the start of the publishing call to the consumer).
//! Debezium runs as `outbox_tests::debezium` sets it up (the test of `records = "debezium"` too).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outbox_tests::debezium::{self, Connect};
use outbox_tests::publish::{publish_range, Storage};
use outbox_tests::worker::config_args;
use outbox_tests::{KafkaBroker, PgCluster, Worker};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
use tokio_postgres::Client;

use crate::latency::{ms, now_micros, partition_zero_consumer, payload_n, stamps, Percentiles};
use crate::KEYS;

/// Seconds of each latency run; the first is warm-up.
const SECONDS: u64 = 10;
/// Unrelated writes while the outbox is idle, and how long the relays then stay idle: longer than
/// Kafka Connect's default offset flush interval (60 s), when Debezium confirms its slot.
const IDLE_WRITES_ROWS: u64 = 300_000;
const IDLE_SECONDS: u64 = 75;

#[derive(Clone, Copy, PartialEq)]
enum Contender {
    /// Tuned: the settings a user would turn for latency and WAL ([`TUNED_CONNECT`], [`TUNED_CONNECTOR`]).
    Debezium {
        tuned: bool,
    },
    Worker(Storage),
}

/// Debezium's settings for latency and WAL: the slot confirmed every second (Kafka Connect's
/// offset flush, default 60 s); a batch as soon as events are there (default 500 ms), and
/// heartbeats (to `__debezium-heartbeat.bench`), which let it confirm past WAL it has no event for.
const TUNED_CONNECT: &str = "offset.flush.interval.ms=1000\n";
const TUNED_CONNECTOR: &str = "poll.interval.ms=10\nheartbeat.interval.ms=1000\n";

impl Contender {
    const ALL: [Contender; 4] = [
        Contender::Debezium { tuned: false },
        Contender::Debezium { tuned: true },
        Contender::Worker(Storage::Table),
        Contender::Worker(Storage::Wal),
    ];

    fn name(self) -> &'static str {
        match self {
            Contender::Debezium { tuned: false } => "Debezium 3.6.1, defaults",
            Contender::Debezium { tuned: true } => "Debezium 3.6.1, tuned",
            Contender::Worker(Storage::Wal) => "outbox-worker, wal form",
            Contender::Worker(_) => "outbox-worker, table form",
        }
    }
}

/// A relay running against one cluster: Debezium's Kafka Connect or outbox-worker.
enum Relay {
    Connect(Connect),
    Worker {
        worker: Worker,
        _config: tempfile::NamedTempFile,
    },
}

impl Relay {
    fn start(contender: Contender, pg: &PgCluster, kafka: &KafkaBroker, topic: &str) -> Relay {
        match contender {
            Contender::Debezium { tuned } => {
                let (connect, connector) = match tuned {
                    true => (TUNED_CONNECT, TUNED_CONNECTOR),
                    false => ("", ""),
                };
                let route = format!("transforms.outbox.route.topic.replacement={topic}\n");
                Relay::Connect(Connect::start(
                    pg,
                    kafka,
                    connect,
                    &format!("{route}{connector}"),
                ))
            }
            Contender::Worker(_) => {
                let config = Worker::config_file(&format!(
                    "[postgres]\nsetup = false\n[sinks.k]\ntype = \"kafka\"\nbrokers = \"{}\"\n",
                    kafka.brokers()
                ));
                let worker = Worker::start(&config_args(&pg.url(), config.path()), None);
                Relay::Worker {
                    worker,
                    _config: config,
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Relay::Connect(connect) => connect.pid(),
            Relay::Worker { worker, .. } => worker.pid(),
        }
    }
}

/// A cluster holding the contender's outbox and slot (Debezium: its documented outbox table, a
/// publication of it and the slot `debezium`; the worker: the extension and the slot `pg_outbox`).
async fn cluster(contender: Contender) -> (PgCluster, Client) {
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    if matches!(contender, Contender::Debezium { .. }) {
        debezium::create_outbox_table(&pg).await;
        return (pg, db);
    }
    db.execute(
        "SELECT pg_create_logical_replication_slot('pg_outbox', 'pgoutput')",
        &[],
    )
    .await
    .unwrap();
    (pg, db)
}

fn slot(contender: Contender) -> &'static str {
    match contender {
        Contender::Debezium { .. } => "debezium",
        Contender::Worker(_) => "pg_outbox",
    }
}

/// The backlog the worker drains (`publish_range`: transactions of 1–50, 100 keys) written the
/// Debezium way: the same payloads, keys and transaction sizes into `outbox_event`.
async fn commit_backlog(db: &Client, contender: Contender, queue: &str, backlog: u64) {
    let Contender::Worker(storage) = contender else {
        let mut i = 0;
        while i < backlog {
            let size = (1 + (i * 7919) % 50).min(backlog - i);
            db.batch_execute(&format!(
                "INSERT INTO outbox_event
                 SELECT gen_random_uuid(), '{queue}', 'k-' || i % {KEYS}, 'OrderCreated',
                        jsonb_build_object('i', i, 'key', 'k-' || i % {KEYS})
                   FROM generate_series({i}::bigint, {last}::bigint) AS i",
                last = i + size - 1
            ))
            .await
            .unwrap();
            i += size;
        }
        return;
    };
    publish_range(db, queue, 0, backlog, KEYS, storage).await;
}

/// One message per transaction, the contender's way.
fn publish_statement(contender: Contender) -> &'static str {
    match contender {
        Contender::Debezium { .. } => {
            "INSERT INTO outbox_event VALUES (gen_random_uuid(), $1, 'k', 'OrderCreated', $2::text::jsonb)"
        }
        Contender::Worker(_) => "SELECT outbox.publish($1, $2::text::jsonb, '{}', 'k')",
    }
}

/// Messages in `topic` so far: the sum of its partitions' high watermarks.
fn messages_in(consumer: &BaseConsumer, topic: &str, partitions: i32) -> i64 {
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .map(|(_, high)| high)
                .unwrap_or(0)
        })
        .sum()
}

fn watermark_reader(kafka: &KafkaBroker) -> BaseConsumer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()
        .unwrap()
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime: the 12th and 13th fields after the command's closing parenthesis.
    stat_seconds(pid, 11)
}

/// Fields `first` and `first + 1` (0-based, after the command's closing parenthesis) of
/// `/proc/{pid}/stat`, clock ticks summed, in seconds.
pub fn stat_seconds(pid: u32, first: usize) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[first].parse::<u64>().unwrap() + fields[first + 1].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

struct DrainResult {
    first_ms: f64,
    rate: f64,
    /// From the first message in the topic to the last: without the start-up.
    streaming_rate: f64,
    peak_mib: f64,
    cpu_per_100k: f64,
    idle_wal_mib: f64,
}

/// Drains the backlog, then writes unrelated WAL and leaves the relay idle: how much WAL its
/// slot then holds back (`pg_current_wal_lsn() - restart_lsn`).
async fn drain(contender: Contender, kafka: &KafkaBroker, backlog: u64, run: usize) -> DrainResult {
    const PARTITIONS: i32 = 3;
    let topic = format!("versus-{run}");
    kafka.create_topic(&topic, PARTITIONS as u32);
    let (pg, db) = cluster(contender).await;
    eprintln!("==> {}: committing {backlog} messages", contender.name());
    commit_backlog(&db, contender, &topic, backlog).await;
    let reader = watermark_reader(kafka);
    let started = Instant::now();
    let relay = Relay::start(contender, &pg, kafka, &topic);
    let mut first = None;
    loop {
        let n = messages_in(&reader, &topic, PARTITIONS);
        if n > 0 && first.is_none() {
            first = Some(started.elapsed());
        }
        if n >= backlog as i64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "{}: {n} of {backlog} after 900 s",
            contender.name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = backlog as f64 / started.elapsed().as_secs_f64();
    let first = first.unwrap_or_default();
    let streaming_rate = backlog as f64 / (started.elapsed() - first).as_secs_f64();
    let cpu = cpu_seconds(relay.pid());
    let peak_mib = crate::peak_rss_kb(relay.pid()) as f64 / 1024.0;
    db.batch_execute(&format!(
        "CREATE TABLE unrelated AS SELECT g, repeat('x', 100) AS filler \
           FROM generate_series(1, {IDLE_WRITES_ROWS}) AS g"
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(IDLE_SECONDS)).await;
    let retained: i64 = db
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot(contender)],
        )
        .await
        .unwrap()
        .get(0);
    drop(relay);
    let result = DrainResult {
        first_ms: first.as_secs_f64() * 1000.0,
        rate,
        streaming_rate,
        peak_mib,
        cpu_per_100k: cpu * 100_000.0 / backlog as f64,
        idle_wal_mib: retained as f64 / (1024.0 * 1024.0),
    };
    eprintln!(
        "    {}: first after {:.0} ms, {:.0} msg/s ({:.0} after the first), peak RSS {:.0} MiB, {:.1} CPU s/100k, idle WAL retained {:.1} MiB",
        contender.name(),
        result.first_ms,
        result.rate,
        result.streaming_rate,
        result.peak_mib,
        result.cpu_per_100k,
        result.idle_wal_mib
    );
    result
}

/// Commit → consumed at `rate` msg/s for SECONDS, one message per transaction, the first second
/// left out; timed from the start of each publishing call, for every contender alike.
async fn latency(contender: Contender, kafka: &KafkaBroker, rate: u64, run: usize) -> Percentiles {
    let total = (rate * SECONDS) as usize;
    let topic = format!("versus-latency-{run}");
    kafka.create_topic(&topic, 1);
    let (pg, db) = cluster(contender).await;
    let relay = Relay::start(contender, &pg, kafka, &topic);
    // Streaming once a first message went through.
    let consumer = partition_zero_consumer(&kafka.brokers(), &topic);
    db.execute(publish_statement(contender), &[&topic, &"{\"n\": -1}"])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while consumer.poll(Duration::from_millis(100)).is_none() {
        assert!(
            Instant::now() < deadline,
            "{}: not streaming",
            contender.name()
        );
    }
    let arrivals = tokio::task::spawn_blocking(move || arrivals(consumer, total));
    let started_at = stamps(total);
    let publishers = rate.div_ceil(2500);
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (db, topic, started_at) = (pg.superuser().await, topic.clone(), started_at.clone());
        tasks.push(tokio::spawn(async move {
            let statement = db.prepare(publish_statement(contender)).await.unwrap();
            for n in (p..rate * SECONDS).step_by(publishers as usize) {
                tokio::time::sleep_until(started + Duration::from_micros(n * 1_000_000 / rate))
                    .await;
                started_at[n as usize].store(now_micros(), Ordering::Relaxed);
                let payload = format!("{{\"n\": {n}}}");
                db.execute(&statement, &[&topic, &payload]).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let seen = arrivals.await.unwrap();
    assert_eq!(
        seen.len(),
        total,
        "{}: every message arrived",
        contender.name()
    );
    drop(relay);
    Percentiles::of(
        seen.iter()
            .filter(|(n, _)| *n >= rate as usize)
            .map(|(n, consumed)| ms(consumed - started_at[*n].load(Ordering::Relaxed)))
            .collect(),
    )
}

/// `(n, consumed at)` for each of `total` messages after the warm-up message.
fn arrivals(consumer: BaseConsumer, total: usize) -> Vec<(usize, i64)> {
    let mut seen = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(180);
    while seen.len() < total && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let consumed = now_micros();
            let payload = m.payload().expect("payload");
            if payload != b"{\"n\": -1}" {
                seen.push((payload_n(payload), consumed));
            }
        }
    }
    seen
}

/// The side-by-side table.
pub async fn versus_table(kafka: &KafkaBroker, backlog: u64) -> String {
    let mut table = format!(
        "Debezium beside outbox-worker, one run of `bench/worker.sh`, the same PostgreSQL 15 build \
         and Apache Kafka 4.4 broker (Debezium: Kafka Connect 4.3 standalone, PostgreSQL \
         connector with `pgoutput`, Outbox Event Router, text converters; at its defaults, then \
         tuned: `poll.interval.ms=10`, `heartbeat.interval.ms=1000`, \
         `offset.flush.interval.ms=1000`; outbox-worker at its defaults). Drain: a committed \
         backlog of {backlog} messages (transactions of 1–50, {KEYS} keys, 3 partitions), timed from the relay's start until the topic holds every \
         message; CPU is the relay process's user + system time over that drain (start-up \
         included). Idle WAL: {IDLE_WRITES_ROWS} rows written to an unrelated table after the \
         drain, then {IDLE_SECONDS} s idle, the WAL the slot still holds back. Latency: one \
         message per transaction, from the start of the publishing call to the consumer, \
         {SECONDS} s, the first second left out.\n\n\
         | relay | start → first message | drain msg/s | after the first | peak RSS | CPU s per 100k | idle WAL retained | \
         1k msg/s p50 / p99 | 10k msg/s p50 / p99 |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    // Where the tuned Debezium sends its heartbeats (the broker creates no topic by itself).
    kafka.create_topic("__debezium-heartbeat.bench", 1);
    let mut run = 0;
    for contender in Contender::ALL {
        run += 1;
        let d = drain(contender, kafka, backlog, run).await;
        let mut cells = Vec::new();
        for rate in [1000, 10_000] {
            run += 1;
            let l = latency(contender, kafka, rate, run).await;
            eprintln!(
                "    {} at {rate} msg/s: p50 {:.1} ms, p99 {:.1} ms",
                contender.name(),
                l.p50,
                l.p99
            );
            cells.push(format!("{:.1} / {:.1} ms", l.p50, l.p99));
        }
        table.push_str(&format!(
            "| {} | {:.1} s | {:.0} | {:.0} | {:.0} MiB | {:.1} | {:.1} MiB | {} | {} |\n",
            contender.name(),
            d.first_ms / 1000.0,
            d.rate,
            d.streaming_rate,
            d.peak_mib,
            d.cpu_per_100k,
            d.idle_wal_mib,
            cells[0],
            cells[1]
        ));
    }
    table
}
