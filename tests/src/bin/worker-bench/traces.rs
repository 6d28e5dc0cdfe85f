//! What trace export costs (issue #33): the same backlog drained with the export off and on, its
//! messages' creation contexts none sampled, 1 in 10 sampled, or all sampled (one span each,
//! exported by OTLP/HTTP to an in-process receiver), to the `discard` sink (the worker's own cost, where any
//! overhead shows most) and to Apache Kafka. After a warm-up drain, each runs [`ROUNDS`] times,
//! interleaved (which goes first alternates), and the median counts; rates are from the worker's "streaming" line (without its start-up).

use outbox_tests::otlp::Receiver;
use outbox_tests::publish::{Storage, SAMPLED, SAMPLED_ONE_IN_TEN, UNSAMPLED};
use outbox_tests::{KafkaBroker, PgCluster};

use super::{backlog_cluster_with, drain, KEYS};

const ROUNDS: usize = 5;
/// Calls of the worker's span function per in-process measurement.
const CALLS: u32 = 1_000_000;

pub async fn tracing_table(kafka: &KafkaBroker, backlog: u64) -> String {
    let receiver = Receiver::start().await;
    let sinks = [
        ("discard", "[sinks.d]\ntype = \"discard\"\n".to_owned()),
        (
            "kafka",
            format!(
                "[sinks.k]\ntype = \"kafka\"\nbrokers = \"{}\"\n",
                kafka.brokers()
            ),
        ),
    ];
    let on = format!("[telemetry]\notlp_endpoint = \"{}\"\n", receiver.endpoint);
    let mut table = format!(
        "Drain a committed backlog of {backlog} messages (table storage, transactions of 1–50, \
         {KEYS} keys, each message with a `traceparent` of its own), msg/s once streaming, median \
         of {ROUNDS} interleaved runs after a warm-up drain, trace export *off* (no endpoint) and \
         *on* (an endpoint) on the same backlog. The receiver decodes every export in the bench's \
         process, on the same 2 cores: a collector elsewhere would not take its CPU from the \
         worker. The SDK's default batch queue (2,048 spans) drops what it cannot export in time: \
         spans received shown (out of the sampled ones).\n\n\
         The worker's CPU time (user + system, from its start to the backlog confirmed) per \
         message varies less than the rate on this shared machine.\n\n\
         | sink | creation contexts | msg/s off | msg/s on | on vs off | CPU µs/msg off | CPU µs/msg on | on vs off | spans received |\n\
         |---|---|---|---|---|---|---|---|---|\n"
    );
    let contexts = [
        ("none sampled", UNSAMPLED, 0),
        ("1 in 10 sampled", SAMPLED_ONE_IN_TEN, backlog / 10),
        ("all sampled", SAMPLED, backlog),
    ];
    for (name, sink) in &sinks {
        for (label, headers, sampled) in contexts {
            let mut slots = vec![format!("{name}_warm_up")];
            for round in 0..ROUNDS {
                slots.push(format!("{name}_off_{round}"));
                slots.push(format!("{name}_on_{round}"));
            }
            let slot_refs: Vec<&str> = slots.iter().map(String::as_str).collect();
            let (pg, db, end) =
                backlog_cluster_with(&slot_refs, backlog, Storage::Table, headers).await;
            // The first drain reads the WAL from disk and warms the caches: not counted.
            rate(&pg, &db, &slots[0], sink, &end, backlog).await;
            let traced_config = format!("{on}{sink}");
            let (mut off, mut traced, mut received) = (Vec::new(), Vec::new(), 0);
            for round in 0..ROUNDS {
                let before = receiver.count();
                let (off_slot, on_slot) = (&slots[1 + 2 * round], &slots[2 + 2 * round]);
                // Which goes first alternates, so neither always runs on a warmer machine.
                if round % 2 == 0 {
                    off.push(rate(&pg, &db, off_slot, sink, &end, backlog).await);
                    traced.push(rate(&pg, &db, on_slot, &traced_config, &end, backlog).await);
                } else {
                    traced.push(rate(&pg, &db, on_slot, &traced_config, &end, backlog).await);
                    off.push(rate(&pg, &db, off_slot, sink, &end, backlog).await);
                }
                // The last spans leave at the worker's stop.
                received = received.max(receiver.count() - before);
            }
            let (off_rate, on_rate) = (median(&off, |r| r.0), median(&traced, |r| r.0));
            let (off_cpu, on_cpu) = (median(&off, |r| r.1), median(&traced, |r| r.1));
            let vs = |on: f64, off: f64| format!("{:+.1}%", 100.0 * (on - off) / off);
            table.push_str(&format!(
                "| {name} | {label} | {off_rate:.0} | {on_rate:.0} | {} | {off_cpu:.2} | \
                 {on_cpu:.2} | {} | {received} of {sampled} |\n",
                vs(on_rate, off_rate),
                vs(on_cpu, off_cpu),
            ));
        }
    }
    let (unsampled, sampled) = per_message_cost(&receiver.endpoint);
    table.push_str(&format!(
        "\nThe same decision measured in this process, without a drain's noise: \
         `traces::send` (the worker's function, called once per message whose delivery ended) \
         takes **{unsampled:.0} ns** for a message whose creation context is not sampled and \
         {sampled:.0} ns for a sampled one (building the span and handing it to the batch \
         processor; its export runs on the SDK's thread), mean of {CALLS} calls each.\n"
    ));
    table
}

/// Nanoseconds per `traces::send` call: an unsampled message, then a sampled one, with the
/// exporter set up as the worker sets it up (to `endpoint`).
fn per_message_cost(endpoint: &str) -> (f64, f64) {
    use outbox_worker::message::{Message, Payload};
    use outbox_worker::traces;
    let config = outbox_worker::config::TelemetryConfig {
        otlp_endpoint: Some(endpoint.to_owned()),
    };
    assert!(traces::init(&config).expect("the exporter"));
    let message = |flags: &str| Message {
        id: uuid::Uuid::now_v7(),
        queue: "orders".into(),
        key: Some("k-1".into()),
        headers: [(
            "traceparent".to_owned(),
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"),
        )]
        .into(),
        payload: Payload::Json("{\"i\": 1}".into()),
        created_at: chrono::Utc::now(),
        commit_lsn: outbox_worker::lsn::Lsn(0x16B_3740),
        index: 1,
        committed_at: chrono::Utc::now(),
    };
    let destination = outbox_worker::router::Destination::Topic("orders".into());
    let cost = |message: &Message| {
        let started = std::time::Instant::now();
        for _ in 0..CALLS {
            traces::send(traces::Send {
                system: "kafka",
                sink: Some("k"),
                destination: &destination,
                message,
                started: std::time::SystemTime::now(),
                attempts: 1,
                outcome: traces::Outcome::Delivered(Default::default()),
            });
        }
        started.elapsed().as_nanos() as f64 / f64::from(CALLS)
    };
    let costs = (cost(&message("00")), cost(&message("01")));
    traces::shutdown();
    costs
}

/// A drain's rate once streaming, and the worker's CPU time per message (µs).
async fn rate(
    pg: &PgCluster,
    db: &tokio_postgres::Client,
    slot: &str,
    sink: &str,
    end: &str,
    backlog: u64,
) -> (f64, f64) {
    let drained = drain(pg, db, slot, sink, end, backlog).await;
    let cpu = drained.cpu_seconds.expect("a worker's CPU time");
    (
        drained.streaming_rate.unwrap_or(drained.rate),
        cpu * 1e6 / backlog as f64,
    )
}

fn median(runs: &[(f64, f64)], value: impl Fn(&(f64, f64)) -> f64) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(value).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
