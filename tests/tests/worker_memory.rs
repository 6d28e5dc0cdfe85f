//! Memory is bounded in bytes, not in messages: large messages behind a sink that does not move
//! stay within `delivery.max_in_flight_bytes` plus a fixed overhead, and all arrive once it moves.

use std::io::BufRead;
use std::process::Stdio;
use std::time::{Duration, Instant};

use outbox_tests::publish::{check_delivery, Seen};
use outbox_tests::{PgCluster, Worker};

/// `delivery.max_in_flight_bytes`'s default.
const BUDGET_MB: u64 = 128;
/// The worker's own footprint, the read-ahead (32 events) and allocator slack.
const OVERHEAD_MB: u64 = 150;

/// A /proc/PID/status field in MB.
fn status_mb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} missing"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn five_hundred_one_megabyte_messages_behind_a_blocked_sink_stay_within_the_budget() {
    const TOTAL: u64 = 500;
    let pg = PgCluster::start().await;
    let db = pg.superuser().await;
    // stdout is a pipe nobody reads yet: once its 64 kB fill up, the sink does not move.
    let mut worker = Worker::start_with(
        &["run", "--postgres-url", &pg.url()],
        &[],
        Some(Stdio::piped()),
    );
    let stdout = worker.take_stdout();
    pg.wait_for_slot(&db).await;
    let pid = worker.pid();

    for tx in 0..TOTAL / 10 {
        let form = if tx % 2 == 0 { "table" } else { "wal" };
        db.batch_execute(&format!(
            "BEGIN; SET LOCAL pg_outbox.max_message_size = '2MB'; SET LOCAL pg_outbox.storage = '{form}';
             SELECT count(outbox.publish('big', jsonb_build_object('i', i, 'pad', repeat('x', 1000000)),
                                         '{{}}', 'k-' || i % 10))
               FROM generate_series({first}, {last}) AS i;
             COMMIT;",
            first = tx * 10,
            last = tx * 10 + 9
        ))
        .await
        .unwrap();
    }
    // Give the worker time to read all it would: the slot streams far faster than this.
    let watch = Instant::now();
    let mut peak_rss = 0;
    while watch.elapsed() < Duration::from_secs(15) {
        peak_rss = peak_rss.max(status_mb(pid, "VmRSS:"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let high_water = status_mb(pid, "VmHWM:");
    eprintln!(
        "{TOTAL} x 1 MB behind a blocked sink: peak RSS {peak_rss} MB, VmHWM {high_water} MB \
         (budget {BUDGET_MB} MB + {OVERHEAD_MB} MB)"
    );
    assert!(
        high_water <= BUDGET_MB + OVERHEAD_MB,
        "VmHWM {high_water} MB is over {BUDGET_MB} + {OVERHEAD_MB} MB:\n{}",
        worker.log()
    );

    // The reader comes back: everything arrives, in order per key.
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            let id = line["id"].as_str().unwrap().to_owned();
            ids.insert(id.clone());
            seen.push(Seen {
                id,
                key: line["key"].as_str().map(str::to_owned),
                payload: serde_json::json!({ "i": line["payload"]["i"] }),
            });
            if ids.len() as u64 == TOTAL {
                break;
            }
        }
        seen
    })
    .await
    .unwrap();
    check_delivery(&seen, TOTAL);
    assert!(status_mb(pid, "VmHWM:") <= BUDGET_MB + OVERHEAD_MB);
}

/// One message of 60 MB, each storage form, to stdout, Kafka (librdkafka's mock cluster) and
/// RabbitMQ: how many copies of it the worker holds at once (its peak RSS growth over the
/// message's size). Three: the replication frame as received, the decoded payload, and the broker
/// client's own (librdkafka, lapin's frames; stdout writes from the message itself). 0.2.0 held
/// four to five here (the stdout line, lapin's input).
#[tokio::test(flavor = "multi_thread")]
async fn one_sixty_megabyte_message_is_held_in_few_copies() {
    const MB: u64 = 60;
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    mock.create_topic("big", 1, 1).unwrap();
    // At least once: the mock cluster cannot host Kafka transactions.
    let config = Worker::config_file(
        "[sinks.kafka]\nexactly_once = false\n\
         [sinks.kafka.properties]\n\"message.max.bytes\" = 100000000\n",
    );
    let rabbit = outbox_tests::RabbitMq::start();
    rabbit.declare("events", "direct", "big", "big");
    for sink in ["stdout", "kafka", "amqp"] {
        for form in ["table", "wal"] {
            let pg = PgCluster::start().await;
            let db = pg.superuser().await;
            let mut args = vec!["run".to_owned(), "--postgres-url".into(), pg.url()];
            if sink == "kafka" {
                args.extend([
                    "--config".into(),
                    config.path().display().to_string(),
                    "--kafka-brokers".into(),
                    mock.bootstrap_servers(),
                ]);
            }
            if sink == "amqp" {
                args.extend([
                    "--amqp-url".into(),
                    rabbit.url(),
                    "--amqp-exchange".into(),
                    "events".into(),
                ]);
            }
            let worker = Worker::start_with(&args, &[], None);
            pg.wait_for_slot(&db).await;
            let pid = worker.pid();
            let before = status_mb(pid, "VmRSS:");
            db.batch_execute(&format!(
                "BEGIN; SET LOCAL pg_outbox.max_message_size = '64MB'; SET LOCAL pg_outbox.storage = '{form}';
                 SELECT outbox.publish('big', jsonb_build_object('i', 0, 'pad', repeat('x', {MB} * 1000 * 1000)));
                 COMMIT;"
            ))
            .await
            .unwrap();
            let (pg, db) = (&pg, &db);
            outbox_tests::eventually(
                Duration::from_secs(60),
                "the message acknowledged",
                || async move { pg.slot_lag(db).await < 1024 },
            )
            .await;
            let high_water = status_mb(pid, "VmHWM:");
            let copies = (high_water - before) as f64 / MB as f64;
            eprintln!(
                "{sink}, {form} form, one {MB} MB message: VmHWM {high_water} MB (from {before} MB): {copies:.1} copies"
            );
            assert!(
                copies <= 3.5,
                "{sink}, {form}: {copies:.1} copies:\n{}",
                worker.log()
            );
        }
    }
}
