//! Configuration errors: each names the key and the bad value, and the worker exits with status 2
//! before touching anything.

use outbox_tests::worker::run_once;
use outbox_tests::{PgCluster, Worker};

/// `check-config` with `toml` (if any) and `args`; asserts exit status 2 and that stderr contains
/// every one of `expected`.
fn rejects(toml: Option<&str>, args: &[&str], env: &[(&str, &str)], expected: &[&str]) {
    let file = toml.map(Worker::config_file);
    let mut all = vec!["check-config"];
    if let Some(f) = &file {
        all.extend(["--config", f.path().to_str().unwrap()]);
    }
    all.extend(args);
    let out = run_once(&all, env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "args {all:?}: {stderr}");
    for fragment in expected {
        assert!(
            stderr.contains(fragment),
            "expected {fragment:?} in: {stderr}"
        );
    }
}

const URL: [&str; 2] = ["--postgres-url", "postgres://outbox@localhost/app"];

#[test]
fn missing_postgres_url() {
    rejects(
        None,
        &[],
        &[],
        &[
            "postgres.url is not set",
            "--postgres-url",
            "OUTBOX_POSTGRES__URL",
        ],
    );
}

#[test]
fn unparsable_postgres_url() {
    rejects(
        None,
        &["--postgres-url", "postgres://u:secret@host:port/db"],
        &[],
        &[
            "postgres.url = \"postgres://u@host:port/db\"",
            "is not a PostgreSQL connection string",
        ],
    );
}

#[test]
fn unknown_sink_type() {
    rejects(
        Some("[sinks.events]\ntype = \"kafak\"\n"),
        &URL,
        &[],
        &[
            "found `kafak`",
            "`kafka`, `amqp`, `stdout`, `discard`",
            "key \"sinks.events.type\"",
        ],
    );
}

#[test]
fn route_to_an_undefined_sink() {
    rejects(
        Some("[sinks.out]\ntype = \"stdout\"\n[[routes]]\nqueues = \"*\"\nsink = \"kafka\"\n"),
        &URL,
        &[],
        &["routes[0].sink = \"kafka\": no sink has that name (defined: out)"],
    );
}

#[test]
fn topic_template_with_an_unknown_placeholder() {
    rejects(
        Some(
            "[sinks.k]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n[[routes]]\nqueues = \"*\"\n\
             sink = \"k\"\ntopic = \"{tenant}.{queue}\"\n",
        ),
        &URL,
        &[],
        &["routes[0].topic = \"{tenant}.{queue}\": the only placeholder is {queue}"],
    );
}

#[test]
fn topic_template_with_a_character_kafka_refuses() {
    rejects(
        Some(
            "[sinks.k]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n[[routes]]\nqueues = \"*\"\n\
             sink = \"k\"\ntopic = \"outbox/{queue}\"\n",
        ),
        &URL,
        &[],
        &["routes[0].topic = \"outbox/{queue}\": '/' is not allowed in a Kafka topic name"],
    );
}

#[test]
fn unknown_librdkafka_property() {
    rejects(
        Some("[sinks.k]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n[sinks.k.properties]\n\"no.such.property\" = 1\n"),
        &URL,
        &[],
        &["sinks.k.properties.no.such.property = \"1\"", "No such configuration property"],
    );
}

#[test]
fn invalid_librdkafka_property_value() {
    rejects(
        Some("[sinks.k]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n[sinks.k.properties]\n\"compression.type\" = \"zip\"\n"),
        &URL,
        &[],
        &["sinks.k.properties.compression.type = \"zip\"", "Invalid value"],
    );
}

#[test]
fn empty_kafka_brokers() {
    rejects(
        None,
        &[URL[0], URL[1], "--kafka-brokers", ""],
        &[],
        &["sinks.kafka.brokers = \"\""],
    );
}

#[test]
fn misspelled_key() {
    rejects(
        Some("[delivery]\nmax_inflight = 5\n"),
        &URL,
        &[],
        &[
            "unknown field: found `max_inflight`",
            "key \"delivery.max_inflight\"",
        ],
    );
}

#[test]
fn bad_duration() {
    rejects(
        Some("[postgres]\nstatus_interval = \"soon\"\n"),
        &URL,
        &[],
        &[
            "string \"soon\", expected a duration",
            "key \"postgres.status_interval\"",
        ],
    );
}

#[test]
fn bad_value_from_the_environment() {
    rejects(
        None,
        &URL,
        &[("OUTBOX_DELIVERY__MAX_IN_FLIGHT", "lots")],
        &["found string \"lots\"", "DELIVERY.MAX_IN_FLIGHT", "OUTBOX_"],
    );
}

#[test]
fn zero_in_flight() {
    rejects(
        Some("[delivery]\nmax_in_flight = 0\n"),
        &URL,
        &[],
        &["delivery.max_in_flight = 0"],
    );
}

#[test]
fn bad_glob() {
    rejects(
        Some(
            "[sinks.out]\ntype = \"stdout\"\n[[routes]]\nqueues = [\"orders[\"]\nsink = \"out\"\n",
        ),
        &URL,
        &[],
        &["routes[0].queues: \"orders[\" is not a glob"],
    );
}

#[test]
fn bad_slot_name() {
    rejects(
        None,
        &[URL[0], URL[1], "--slot", "Outbox-Slot"],
        &[],
        &[
            "postgres.slot = \"Outbox-Slot\"",
            "lowercase letters, digits and underscores",
        ],
    );
}

#[test]
fn topic_on_a_sink_without_topics() {
    rejects(
        Some("[sinks.out]\ntype = \"stdout\"\n[[routes]]\nqueues = \"*\"\nsink = \"out\"\ntopic = \"x\"\n"),
        &URL,
        &[],
        &["routes[0].topic = \"x\": sink \"out\" is of type stdout, which has no topic"],
    );
}

#[test]
fn several_sinks_and_no_routes() {
    rejects(
        Some("[sinks.a]\ntype = \"stdout\"\n[sinks.b]\ntype = \"discard\"\n"),
        &URL,
        &[],
        &["there are 2 sinks and no routes"],
    );
}

#[test]
fn missing_and_malformed_files() {
    rejects(
        None,
        &[URL[0], URL[1], "--config", "/nonexistent/outbox.toml"],
        &[],
        &["config file /nonexistent/outbox.toml", "No such file"],
    );
    rejects(
        Some("[postgres\n"),
        &URL,
        &[],
        &["TOML parse error at line 1", "invalid table header"],
    );
}

#[test]
fn a_valid_config_is_printed_with_defaults_and_without_the_password() {
    let file = Worker::config_file(
        "[postgres]\nurl = \"postgres://outbox:s3cret@db:5432/app\"\n[sinks.k]\ntype = \"kafka\"\n\
         brokers = \"kafka:9092\"\n[sinks.k.properties.sasl]\nmechanism = \"PLAIN\"\n",
    );
    let out = run_once(
        &["check-config", "--config", file.path().to_str().unwrap()],
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("url = \"postgres://outbox@db:5432/app\""),
        "{stdout}"
    );
    assert!(!stdout.contains("s3cret"));
    assert!(stdout.contains("max_in_flight = 10000"), "{stdout}");
    assert!(
        stdout.contains("sink = \"k\""),
        "the single sink gets the catch-all route: {stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn setup_without_the_extension_says_what_to_run() {
    let pg = PgCluster::start_without_extension();
    let out = run_once(&["setup", "--postgres-url", &pg.url()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the pg_outbox extension is not installed in database \"postgres\": run CREATE EXTENSION pg_outbox"),
        "{stderr}"
    );
    pg.superuser()
        .await
        .batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    for _ in 0..2 {
        let out = run_once(&["setup", "--postgres-url", &pg.url()], &[]);
        assert!(
            out.status.success(),
            "setup is idempotent: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bad_amqp_url_and_exchange_kind() {
    rejects(
        None,
        &[URL[0], URL[1], "--amqp-url", "http://rabbit:5672"],
        &[],
        &["sinks.amqp.url = \"http://rabbit:5672\""],
    );
    rejects(
        Some("[sinks.r]\ntype = \"amqp\"\nurl = \"amqp://localhost\"\nexchange = \"events\"\ndeclare_exchange = \"round-robin\"\n"),
        &URL,
        &[],
        &["sinks.r.declare_exchange = \"round-robin\": use one of direct, topic, fanout, headers"],
    );
}

#[test]
fn routing_key_on_a_kafka_sink() {
    rejects(
        Some("[sinks.k]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n[[routes]]\nqueues = \"*\"\nsink = \"k\"\nrouting_key = \"x\"\n"),
        &URL,
        &[],
        &["routes[0].routing_key = \"x\": sink \"k\" is of type kafka, which has no routing_key"],
    );
}

#[test]
fn bad_http_listen_address() {
    rejects(
        None,
        &[URL[0], URL[1], "--http-listen", "everywhere:90"],
        &[],
        &["http.listen"],
    );
}

#[test]
fn environment_overrides_the_file_and_flags_override_the_environment() {
    let file = Worker::config_file(
        "[postgres]\nurl = \"postgres://file@db/app\"\nslot = \"from_file\"\n[delivery]\nmax_in_flight = 7\n",
    );
    let env = [
        ("OUTBOX_DELIVERY__MAX_IN_FLIGHT", "42"),
        ("OUTBOX_POSTGRES__SLOT", "from_env"),
        ("OUTBOX_SINKS__K__TYPE", "kafka"),
        ("OUTBOX_SINKS__K__BROKERS", "kafka:9092"),
        ("OUTBOX_SINKS__K__PROPERTIES__LINGER.MS", "7"),
    ];
    let out = run_once(
        &[
            "check-config",
            "--config",
            file.path().to_str().unwrap(),
            "--slot",
            "from_flag",
        ],
        &env,
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        shown.contains("max_in_flight = 42"),
        "env over file: {shown}"
    );
    assert!(
        shown.contains("slot = \"from_flag\""),
        "flag over env: {shown}"
    );
    assert!(
        shown.contains("url = \"postgres://file@db/app\""),
        "file kept: {shown}"
    );
    assert!(
        shown.contains("brokers = \"kafka:9092\"") && shown.contains("ms = 7"),
        "{shown}"
    );
}
