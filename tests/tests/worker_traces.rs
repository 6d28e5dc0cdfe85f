//! The worker's trace export never costs a message: a collector that accepts connections and
//! never answers, or one that is not there, leaves delivery and the stop as they are. (The span
//! tree itself is tested end to end in outbox-client's `tracing` test.)

use std::time::{Duration, Instant};

use outbox_tests::otlp::Receiver;
use outbox_tests::publish::{
    publish_range_with, read_json_lines, stdout_file, wait_for_lines, Storage, SAMPLED,
};
use outbox_tests::worker::config_args;
use outbox_tests::{eventually, PgCluster, Worker};

/// `count` messages in both storage forms whose creation context is sampled (so each gets a
/// span).
async fn publish_traced(db: &tokio_postgres::Client, count: u64) {
    publish_range_with(db, "orders", 0, count, 7, Storage::Mixed, SAMPLED).await;
}

/// Accepts connections and reads nothing, answers nothing: an exporter waits for its timeout.
fn collector_that_never_answers() -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let mut connections = Vec::new();
        for stream in listener.incoming().take(64) {
            connections.push(stream);
        }
    });
    (endpoint, held)
}

/// Answers every export, in turn, 500, 429 (with `Retry-After`) and 200 with a body that is not
/// protobuf: a collector overloaded or broken.
fn collector_that_refuses() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let answered = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = answered.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let answer = match counter.fetch_add(1, Ordering::SeqCst) % 3 {
                        0 => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops",
                        1 => "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 4\r\n\r\nslow",
                        _ => "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 10\r\n\r\n\u{ff}garbage\u{1}",
                    };
                    if writer.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (endpoint, answered)
}

/// The worker's log.
async fn delivers_everything_and_stops_promptly(endpoint: &str) -> String {
    let pg = PgCluster::start().await;
    let (_dir, out) = stdout_file();
    let config = Worker::config_file(&format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\n"));
    let mut worker = Worker::start(&config_args(&pg.url(), config.path()), Some(&out));
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    const TOTAL: u64 = 20_000;
    publish_traced(&db, TOTAL).await;
    wait_for_lines(&out, TOTAL as usize).await;
    let lines = read_json_lines(&out);
    assert_eq!(lines.len(), TOTAL as usize);
    assert!(
        worker.log().contains("exporting trace spans"),
        "{}",
        worker.log()
    );
    let stopping = Instant::now();
    let status = worker.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", worker.log());
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "the stop took {:?}: the export held it",
        stopping.elapsed()
    );
    worker.log()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_never_answers_costs_no_message_and_does_not_hold_the_stop() {
    let (endpoint, _held) = collector_that_never_answers();
    delivers_everything_and_stops_promptly(&endpoint).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_answering_errors_and_garbage_costs_no_message() {
    let (endpoint, answered) = collector_that_refuses();
    let log = delivers_everything_and_stops_promptly(&endpoint).await;
    // Each refusal is in the log: the 500, the 429 whose Retry-After the exporter waits for, the
    // spans dropped while it waits.
    for wanted in ["status code: 500", "throttled", "dropped"] {
        assert!(log.contains(wanted), "no {wanted:?} in the log:\n{log}");
    }
    assert!(
        answered.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "the exporter did not reach the collector"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_is_not_there_costs_no_message() {
    let port = outbox_tests::postgres::free_port();
    delivers_everything_and_stops_promptly(&format!("http://127.0.0.1:{port}")).await;
}

/// The standard environment variables turn the export on without a configuration key, and a
/// message without a creation context gets no span.
#[tokio::test(flavor = "multi_thread")]
async fn otel_exporter_otlp_endpoint_turns_it_on_and_untraced_messages_get_no_span() {
    let receiver = Receiver::start().await;
    let pg = PgCluster::start().await;
    let (_dir, out) = stdout_file();
    let _worker = Worker::start_with(
        &["run", "--postgres-url", &pg.url()],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint),
            ("OTEL_SERVICE_NAME", "relay-7"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        Some(outbox_tests::worker::stdout_to(&out)),
    );
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;
    db.execute("SELECT outbox.publish('plain', '{}')", &[])
        .await
        .unwrap();
    publish_traced(&db, 10).await;
    wait_for_lines(&out, 11).await;
    let r = &receiver;
    eventually(Duration::from_secs(20), "10 spans", || async move {
        r.count() >= 10
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = receiver.spans();
    assert_eq!(spans.len(), 10, "one per traced message: {spans:#?}");
    assert!(spans.iter().all(|s| s.service == "relay-7"));
    assert!(spans
        .iter()
        .all(|s| s.attribute("pg_outbox.queue") == Some("orders")
            && s.attribute("messaging.system") == Some("pg_outbox")));
}

/// Standard variables whose bad values would export nowhere or trace every message stop the
/// worker at start instead (exit 2, naming the variable), in `check-config` and in `run`.
#[test]
fn otel_variables_that_would_misbehave_are_refused_naming_them() {
    let url = "postgres://nobody@127.0.0.1:1/none";
    let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
    for (variable, value, wanted) in [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "https://collector:4318",
            "an http:// URL",
        ),
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://c:4318/v1/traces",
            "an http:// URL",
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "http/protobuf"),
        ("OTEL_TRACES_SAMPLER", "bogus", "not a sampler"),
        ("OTEL_TRACES_SAMPLER", "traceidratio", "needs a ratio"),
    ] {
        for command in ["check-config", "run"] {
            let out = outbox_tests::worker::run_once(
                &[command, "--postgres-url", url],
                &[endpoint, (variable, value)],
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{command} {variable}={value}: {stderr}"
            );
            assert!(
                stderr.contains(variable) && stderr.contains(wanted),
                "{command} {variable}={value}: {stderr}"
            );
        }
    }
    let fine = outbox_tests::worker::run_once(
        &["check-config", "--postgres-url", url],
        &[
            endpoint,
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
        ],
    );
    assert!(fine.status.success(), "{fine:?}");
}
