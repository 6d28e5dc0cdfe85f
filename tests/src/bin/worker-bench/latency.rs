//! Commit → consumed: one message per transaction at a fixed rate for 10 s, a consumer timing
//! every arrival, and the total split where it can be measured: the publishing call (the
//! transaction and its WAL flush), from the call's return to the consumer, and the worker's own
//! commit → broker acknowledgement (its histogram). The same Kafka runs go to two brokers: Apache
//! Kafka, a separate process, and librdkafka's MockCluster, in this process. Beside them a bare rdkafka
//! producer, without PostgreSQL or the worker, shows what each broker alone adds between its
//! acknowledgement and the consumer.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use outbox_tests::worker::{config_args, http_get};
use outbox_tests::{KafkaBroker, PgCluster, RabbitMq, Worker};
use outbox_worker::config::KafkaSinkConfig;
use outbox_worker::sink::kafka::client_config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};

/// Runs at 1k msg/s per Kafka broker.
const RUNS: usize = 5;
const SECONDS: u64 = 10;

/// A Kafka-protocol broker of the latency runs; each run gets a topic of its own.
pub enum Broker<'a> {
    Apache(&'a KafkaBroker),
    Mock(&'a MockCluster<'static, DefaultProducerContext>),
}

impl Broker<'_> {
    fn name(&self) -> &'static str {
        match self {
            Broker::Apache(_) => "Apache Kafka",
            Broker::Mock(_) => "MockCluster",
        }
    }

    fn bootstrap(&self) -> String {
        match self {
            Broker::Apache(kafka) => kafka.brokers(),
            Broker::Mock(mock) => mock.bootstrap_servers(),
        }
    }

    fn new_topic(&self, topic: &str) {
        match self {
            Broker::Apache(kafka) => kafka.create_topic(topic, 1),
            Broker::Mock(mock) => mock.create_topic(topic, 1, 1).expect("mock topic"),
        }
    }
}

#[derive(Clone, Copy)]
enum Target<'a> {
    /// A Kafka broker, and whether the sink delivers exactly once (Kafka transactions; the
    /// MockCluster cannot) or at least once.
    Kafka(&'a Broker<'a>, bool),
    Amqp(&'a RabbitMq),
}

struct Latency {
    achieved: f64,
    count: usize,
    /// From the transaction's start (`outbox-created-at`) to the consumer.
    total: Percentiles,
    /// The publishing call seen by the client: the transaction, its commit and WAL flush.
    call: Percentiles,
    /// From the publishing call's return to the consumer.
    after: Percentiles,
    /// The bucket of the worker's commit → ack histogram holding its 99th percentile.
    worker_ack_p99: String,
}

/// A bare producer's run: produce → broker ack, ack → consumed, per steady second.
struct BareLatency {
    ack: Percentiles,
    after: Percentiles,
    total: Percentiles,
    /// ack → consumed p99 in the first and in the last steady second.
    after_p99_first_last: (f64, f64),
}

pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(mut values: Vec<f64>) -> Percentiles {
        values.sort_by(f64::total_cmp);
        let pick = |q: f64| values[((values.len() as f64 * q) as usize).min(values.len() - 1)];
        Percentiles {
            p50: pick(0.50),
            p99: pick(0.99),
        }
    }
}

/// One consumed message: its number (from the payload `{"n": n}`), `outbox-created-at` and
/// when it was consumed, µs since the epoch.
struct Seen {
    n: usize,
    created: i64,
    consumed: i64,
}

/// One timestamp per message, written by whichever task sees that moment.
pub type Stamps = Arc<Vec<AtomicI64>>;

pub fn stamps(total: usize) -> Stamps {
    Arc::new((0..total).map(|_| AtomicI64::new(0)).collect())
}

pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

pub fn ms(micros: i64) -> f64 {
    micros as f64 / 1000.0
}

pub async fn latency_table(
    kafka: &KafkaBroker,
    mock: &MockCluster<'static, DefaultProducerContext>,
    rabbit: &RabbitMq,
) -> String {
    let kafka = [Broker::Apache(kafka), Broker::Mock(mock)];
    let mut table = format!(
        "Commit → consumed, 1 message per transaction for {SECONDS} s, the first second excluded \
         as warm-up (table storage; Kafka with `linger.ms = 1`). The total runs from the \
         transaction's start (`outbox-created-at`); beside it the publishing call (its commit \
         waits for the WAL flush), from the call's return to the consumer, and the worker's own \
         commit → broker acknowledgement (its `outbox_commit_to_ack_seconds` histogram, the \
         bucket holding the 99th percentile). Apache Kafka runs as a separate process; MockCluster is \
         librdkafka's in-process broker.\n\n\
         | sink | rate (msg/s, achieved) | messages measured | p50 | p99 | publish call p99 | \
         returned → consumed p50 / p99 | worker commit → ack p99 |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    let mut runs: Vec<(Target<'_>, u64)> = Vec::new();
    for broker in &kafka {
        let modes: &[bool] = match broker {
            Broker::Apache(_) => &[true, false],
            Broker::Mock(_) => &[false],
        };
        for &exactly_once in modes {
            runs.extend((0..RUNS).map(|_| (Target::Kafka(broker, exactly_once), 1000)));
            runs.push((Target::Kafka(broker, exactly_once), 10_000));
        }
    }
    runs.push((Target::Amqp(rabbit), 1000));
    for (run, (target, rate)) in runs.into_iter().enumerate() {
        let name = match target {
            Target::Kafka(broker, true) => format!("Kafka ({}), exactly once", broker.name()),
            Target::Kafka(broker, false) => format!("Kafka ({}), at least once", broker.name()),
            Target::Amqp(_) => "RabbitMQ".to_owned(),
        };
        let l = worker_latency(target, rate, &format!("latency-{run}")).await;
        let line = format!(
            "| {name} | {rate} ({:.0}) | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | ≤ {} |\n",
            l.achieved,
            l.count,
            l.total.p50,
            l.total.p99,
            l.call.p99,
            l.after.p50,
            l.after.p99,
            l.worker_ack_p99
        );
        eprint!("    latency {line}");
        table.push_str(&line);
    }
    table.push_str(
        "\nThe brokers alone: a bare rdkafka producer with the worker's client properties and \
         `linger.ms = 1`, 1,000 msg/s for 10 s, no PostgreSQL and no worker, the same consumer \
         (`fetch.wait.max.ms = 1`):\n\n\
         | broker | produce → ack p50 / p99 | ack → consumed p50 / p99 | produce → consumed p50 / p99 | \
         ack → consumed p99, second 2 / second 10 |\n|---|---|---|---|---|\n",
    );
    for (i, broker) in kafka.iter().enumerate() {
        let b = bare_latency(broker, &format!("bare-{i}")).await;
        let line = format!(
            "| {} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms |\n",
            broker.name(),
            b.ack.p50,
            b.ack.p99,
            b.after.p50,
            b.after.p99,
            b.total.p50,
            b.total.p99,
            b.after_p99_first_last.0,
            b.after_p99_first_last.1
        );
        eprint!("    bare {line}");
        table.push_str(&line);
    }
    table
}

/// Publishes at `rate` (one connection per 2,500 msg/s) through the worker while a consumer
/// records each arrival; message `n` carries `{"n": n}`, which matches its arrival with the
/// moment its publishing call returned.
async fn worker_latency(target: Target<'_>, rate: u64, topic: &str) -> Latency {
    let total = (rate * SECONDS) as usize;
    let pg = PgCluster::start().await;
    let (sink, queue) = match target {
        Target::Kafka(broker, exactly_once) => {
            broker.new_topic(topic);
            let sink = format!(
                "[sinks.k]\ntype = \"kafka\"\nbrokers = \"{}\"\nexactly_once = {exactly_once}\n\
                 [sinks.k.properties]\n\"linger.ms\" = 1\n",
                broker.bootstrap()
            );
            (sink, topic.to_owned())
        }
        Target::Amqp(rabbit) => {
            let sink = format!(
                "[sinks.a]\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"bench\"\n",
                rabbit.url()
            );
            (sink, "latency".to_owned())
        }
    };
    let http = format!("127.0.0.1:{}", outbox_tests::postgres::free_port());
    let config = Worker::config_file(&format!("[http]\nlisten = \"{http}\"\n{sink}"));
    let _worker = Worker::start(&config_args(&pg.url(), config.path()), None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    let consumer = match target {
        Target::Kafka(broker, _) => {
            let (bootstrap, topic) = (broker.bootstrap(), topic.to_owned());
            tokio::task::spawn_blocking(move || kafka_arrivals(&bootstrap, &topic, total))
        }
        Target::Amqp(rabbit) => {
            let url = rabbit.url();
            tokio::spawn(async move { amqp_arrivals(&url, total).await })
        }
    };
    let returned = stamps(total);
    let publishers = rate.div_ceil(2500);
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (db, queue, returned) = (pg.superuser().await, queue.clone(), returned.clone());
        tasks.push(tokio::spawn(async move {
            let publish = db
                .prepare("SELECT outbox.publish($1, $2::text::jsonb, '{}', 'k')")
                .await
                .unwrap();
            for n in (p..rate * SECONDS).step_by(publishers as usize) {
                tokio::time::sleep_until(started + Duration::from_micros(n * 1_000_000 / rate))
                    .await;
                let payload = format!("{{\"n\": {n}}}");
                db.execute(&publish, &[&queue, &payload]).await.unwrap();
                returned[n as usize].store(now_micros(), Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let seen = consumer.await.unwrap();
    assert_eq!(seen.len(), total, "every latency message arrived");
    // The first second warms up connections and metadata on both ends: not steady state.
    let steady: Vec<&Seen> = seen.iter().filter(|s| s.n >= rate as usize).collect();
    let returned_at = |s: &Seen| returned[s.n].load(Ordering::Relaxed);
    Latency {
        achieved,
        count: steady.len(),
        total: Percentiles::of(steady.iter().map(|s| ms(s.consumed - s.created)).collect()),
        call: Percentiles::of(
            steady
                .iter()
                .map(|s| ms(returned_at(s) - s.created))
                .collect(),
        ),
        after: Percentiles::of(
            steady
                .iter()
                .map(|s| ms(s.consumed - returned_at(s)))
                .collect(),
        ),
        worker_ack_p99: worker_ack_p99(&http),
    }
}

/// A bare rdkafka producer with the worker's client properties and `linger.ms = 1`, one message
/// per millisecond, against the same consumer as the worker's runs.
async fn bare_latency(broker: &Broker<'_>, topic: &str) -> BareLatency {
    const RATE: u64 = 1000;
    let total = (RATE * SECONDS) as usize;
    broker.new_topic(topic);
    let config = KafkaSinkConfig {
        brokers: broker.bootstrap(),
        records: "outbox".into(),
        properties: Default::default(),
        exactly_once: false,
        progress_topic: "pg_outbox-progress".into(),
    };
    let producer: FutureProducer = client_config(&config, crate::MAX_IN_FLIGHT)
        .set("linger.ms", "1")
        .create()
        .expect("producer");
    let consumer = {
        let (bootstrap, topic) = (broker.bootstrap(), topic.to_owned());
        tokio::task::spawn_blocking(move || kafka_arrivals(&bootstrap, &topic, total))
    };
    let acked = stamps(total);
    let started = tokio::time::Instant::now();
    let mut in_flight = FuturesUnordered::new();
    for n in 0..total {
        let due = started + Duration::from_micros(n as u64 * 1_000_000 / RATE);
        // Acknowledgements are stamped while waiting for the next message's turn.
        while tokio::time::Instant::now() < due {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            }
        }
        let payload = format!("{{\"n\": {n}}}");
        let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let headers = OwnedHeaders::new().insert(Header {
            key: "outbox-created-at",
            value: Some(created.as_str()),
        });
        let record = FutureRecord::to(topic)
            .key("k")
            .payload(&payload)
            .headers(headers);
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| e)
            .expect("queued");
        let acked = acked.clone();
        in_flight.push(async move {
            delivery.await.expect("delivered").expect("acked");
            acked[n].store(now_micros(), Ordering::Relaxed);
        });
    }
    while in_flight.next().await.is_some() {}
    let seen = consumer.await.unwrap();
    assert_eq!(seen.len(), total, "every bare latency message arrived");
    let acked_at = |s: &Seen| acked[s.n].load(Ordering::Relaxed);
    let after_in = |second: usize| {
        let range = second * RATE as usize..(second + 1) * RATE as usize;
        Percentiles::of(
            seen.iter()
                .filter(|s| range.contains(&s.n))
                .map(|s| ms(s.consumed - acked_at(s)))
                .collect(),
        )
        .p99
    };
    let steady: Vec<&Seen> = seen.iter().filter(|s| s.n >= RATE as usize).collect();
    BareLatency {
        ack: Percentiles::of(steady.iter().map(|s| ms(acked_at(s) - s.created)).collect()),
        after: Percentiles::of(
            steady
                .iter()
                .map(|s| ms(s.consumed - acked_at(s)))
                .collect(),
        ),
        total: Percentiles::of(steady.iter().map(|s| ms(s.consumed - s.created)).collect()),
        after_p99_first_last: (after_in(1), after_in(SECONDS as usize - 1)),
    }
}

/// The upper bound of the bucket of `outbox_commit_to_ack_seconds` holding the 99th percentile.
fn worker_ack_p99(http: &str) -> String {
    let (_, body) = http_get(http, "/metrics").expect("worker /metrics");
    let buckets: Vec<(String, f64)> = body
        .lines()
        .filter(|l| l.starts_with("outbox_commit_to_ack_seconds_bucket{"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?.to_owned();
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let count = buckets.last().map(|(_, c)| *c).unwrap_or(0.0);
    buckets
        .iter()
        .find(|(_, c)| *c >= 0.99 * count)
        .map(|(le, _)| match le.parse::<f64>() {
            Ok(seconds) => format!("{} ms", seconds * 1000.0),
            Err(_) => le.clone(),
        })
        .unwrap_or_else(|| "?".into())
}

fn parse_created(created_at: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(created_at)
        .expect("outbox-created-at is RFC 3339")
        .timestamp_micros()
}

pub fn payload_n(payload: &[u8]) -> usize {
    let value: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
    value["n"].as_u64().expect("payload {\"n\": n}") as usize
}

/// A consumer of `topic`'s partition 0 from its beginning, fetching as soon as a message is there
/// (`fetch.wait.max.ms = 1`): what every latency run reads with.
pub fn partition_zero_consumer(bootstrap: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench")
        .set("fetch.wait.max.ms", "1")
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    consumer
}

fn kafka_arrivals(bootstrap: &str, topic: &str, total: usize) -> Vec<Seen> {
    let consumer = partition_zero_consumer(bootstrap, topic);
    let mut seen = Vec::with_capacity(total);
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < total && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let consumed = now_micros();
            let created = m
                .headers()
                .and_then(|hs| hs.iter().find(|h| h.key == "outbox-created-at"))
                .and_then(|h| std::str::from_utf8(h.value?).ok().map(parse_created))
                .expect("outbox-created-at header");
            seen.push(Seen {
                n: payload_n(m.payload().expect("payload")),
                created,
                consumed,
            });
        }
    }
    seen
}

async fn amqp_arrivals(url: &str, total: usize) -> Vec<Seen> {
    use lapin::options::BasicConsumeOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let (_connection, channel) = crate::amqp_channel(url).await;
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = channel
        .basic_consume("latency", "bench", options, FieldTable::default())
        .await
        .unwrap();
    let mut seen = Vec::with_capacity(total);
    while seen.len() < total {
        let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_secs(60), consumer.next()).await
        else {
            break;
        };
        let consumed = now_micros();
        let created = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("outbox-created-at").cloned())
            .and_then(|v| match v {
                AMQPValue::LongString(s) => {
                    Some(parse_created(&String::from_utf8_lossy(s.as_bytes())))
                }
                _ => None,
            })
            .expect("outbox-created-at header");
        seen.push(Seen {
            n: payload_n(&delivery.data),
            created,
            consumed,
        });
    }
    seen
}
