//! Configuration errors, loaded in-process: each names the key and the bad value. (The CLI's exit
//! status for them is in tests/cli.rs.) Every load runs in a figment `Jail`, which serializes the
//! tests that set `OUTBOX_*` variables with those that read them.

use figment::Jail;
use outbox_worker::config::{Config, Overrides};

const URL: &str = "postgres://outbox@localhost/app";

fn with_url(mut overrides: Overrides) -> Overrides {
    overrides.postgres_url.get_or_insert_with(|| URL.to_owned());
    overrides
}

/// Loads `toml` (if any) with `overrides` and `env` set; the configuration or the error's text.
// figment's Jail closure returns figment's own (large) error type.
#[allow(clippy::result_large_err)]
fn load(toml: Option<&str>, overrides: Overrides, env: &[(&str, &str)]) -> Result<Config, String> {
    let mut result = None;
    Jail::expect_with(|jail| {
        for (key, value) in env {
            jail.set_env(key, value);
        }
        let path = match toml {
            Some(text) => {
                jail.create_file("outbox.toml", text)?;
                Some(jail.directory().join("outbox.toml"))
            }
            None => None,
        };
        result = Some(Config::load(path.as_deref(), overrides).map_err(|e| e.to_string()));
        Ok(())
    });
    result.expect("the jail ran")
}

/// Asserts the load fails and its message contains every one of `expected`.
fn rejects(toml: Option<&str>, overrides: Overrides, env: &[(&str, &str)], expected: &[&str]) {
    match load(toml, overrides, env) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(message) => {
            for fragment in expected {
                assert!(
                    message.contains(fragment),
                    "expected {fragment:?} in: {message}"
                );
            }
        }
    }
}

fn url() -> Overrides {
    with_url(Overrides::default())
}

#[test]
fn missing_postgres_url() {
    rejects(
        None,
        Overrides::default(),
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
        Overrides {
            postgres_url: Some("postgres://u:secret@host:port/db".into()),
            ..Default::default()
        },
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
        url(),
        &[],
        &[
            "found `kafak`",
            "`kafka`, `amqp`, `stdout`, `discard`",
            "key \"sinks.events.type\"",
        ],
    );
}

#[test]
fn unknown_record_shape() {
    rejects(
        Some("[sinks.k]\ntype = \"kafka\"\nbrokers = \"b:9092\"\nrecords = \"dbz\"\n"),
        url(),
        &[],
        &["sinks.k.records = \"dbz\"", "\"outbox\"", "\"debezium\""],
    );
}

#[test]
fn an_unknown_key_on_a_sink_without_settings() {
    rejects(
        Some("[sinks.out]\ntype = \"stdout\"\nrecords = \"debezium\"\n"),
        url(),
        &[],
        &["found `records`", "sinks.out"],
    );
}

#[test]
fn route_to_an_undefined_sink() {
    rejects(
        Some("[sinks.out]\ntype = \"stdout\"\n[[routes]]\nqueues = \"*\"\nsink = \"kafka\"\n"),
        url(),
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
        url(),
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
        url(),
        &[],
        &["routes[0].topic = \"outbox/{queue}\": '/' is not allowed in a Kafka topic name"],
    );
}

#[test]
fn unknown_librdkafka_property() {
    rejects(
        Some("[sinks.k]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n[sinks.k.properties]\n\"no.such.property\" = 1\n"),
        url(),
        &[],
        &["sinks.k.properties.no.such.property = \"1\"", "No such configuration property"],
    );
}

#[test]
fn invalid_librdkafka_property_value() {
    rejects(
        Some("[sinks.k]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n[sinks.k.properties]\n\"compression.type\" = \"zip\"\n"),
        url(),
        &[],
        &["sinks.k.properties.compression.type = \"zip\"", "Invalid value"],
    );
}

/// 0.2.1 took `acks = 0` (0 of 30 messages arrived while the slot was confirmed past them),
/// `partitioner = "random"` silently, and `acks = 1` only to fail at start with exit status 1.
#[test]
fn kafka_properties_that_break_the_outboxs_promises() {
    for (property, value, expected) in [
        ("acks", "0", "only acks = \"all\""),
        ("acks", "1", "only acks = \"all\""),
        ("request.required.acks", "1", "only acks = \"all\""),
        ("partitioner", "random", "lose their order"),
    ] {
        rejects(
            Some(&format!(
                "[sinks.k]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n[sinks.k.properties]\n\"{property}\" = \"{value}\"\n"
            )),
            url(),
            &[],
            &[&format!("sinks.k.properties.{property} = \"{value}\""), expected],
        );
    }
    for (property, value) in [("acks", "all"), ("acks", "-1"), ("partitioner", "murmur2")] {
        let toml = format!(
            "[sinks.k]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n[sinks.k.properties]\n\"{property}\" = \"{value}\"\n"
        );
        assert!(
            load(Some(&toml), url(), &[]).is_ok(),
            "{property} = {value}"
        );
    }
}

#[test]
fn empty_kafka_brokers() {
    rejects(
        None,
        with_url(Overrides {
            kafka_brokers: Some(String::new()),
            ..Default::default()
        }),
        &[],
        &["sinks.kafka.brokers = \"\""],
    );
}

#[test]
fn misspelled_key() {
    rejects(
        Some("[delivery]\nmax_inflight = 5\n"),
        url(),
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
        url(),
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
        url(),
        &[("OUTBOX_DELIVERY__MAX_IN_FLIGHT", "lots")],
        &["found string \"lots\"", "DELIVERY.MAX_IN_FLIGHT", "OUTBOX_"],
    );
}

#[test]
fn zero_in_flight() {
    rejects(
        Some("[delivery]\nmax_in_flight = 0\n"),
        url(),
        &[],
        &["delivery.max_in_flight = 0"],
    );
}

#[test]
fn an_otlp_endpoint_that_is_not_a_plain_http_url() {
    for endpoint in [
        "https://collector:4318",
        "collector:4318",
        "http://",
        "not a url",
    ] {
        rejects(
            Some(&format!("[telemetry]\notlp_endpoint = \"{endpoint}\"\n")),
            url(),
            &[],
            &[&format!(
                "telemetry.otlp_endpoint = \"{endpoint}\": an http:// base URL"
            )],
        );
    }
    load(
        Some("[telemetry]\notlp_endpoint = \"http://collector:4318/\"\n"),
        url(),
        &[],
    )
    .expect("a plain http URL");
}

#[test]
fn bad_glob() {
    rejects(
        Some(
            "[sinks.out]\ntype = \"stdout\"\n[[routes]]\nqueues = [\"orders[\"]\nsink = \"out\"\n",
        ),
        url(),
        &[],
        &["routes[0].queues: \"orders[\" is not a glob"],
    );
}

#[test]
fn bad_slot_name() {
    rejects(
        None,
        with_url(Overrides {
            slot: Some("Outbox-Slot".into()),
            ..Default::default()
        }),
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
        url(),
        &[],
        &["routes[0].topic = \"x\": sink \"out\" is of type stdout, which has no topic"],
    );
}

#[test]
fn several_sinks_and_no_routes() {
    rejects(
        Some("[sinks.a]\ntype = \"stdout\"\n[sinks.b]\ntype = \"discard\"\n"),
        url(),
        &[],
        &["there are 2 sinks and no routes"],
    );
}

#[test]
fn missing_and_malformed_files() {
    let missing = Config::load(Some("/nonexistent/outbox.toml".as_ref()), url()).unwrap_err();
    for fragment in ["config file /nonexistent/outbox.toml", "No such file"] {
        assert!(missing.to_string().contains(fragment), "{missing}");
    }
    rejects(
        Some("[postgres\n"),
        url(),
        &[],
        &["TOML parse error at line 1", "invalid table header"],
    );
}

#[test]
fn bad_amqp_url_and_exchange_kind() {
    rejects(
        None,
        with_url(Overrides {
            amqp_url: Some("http://rabbit:5672".into()),
            ..Default::default()
        }),
        &[],
        &["sinks.amqp.url = \"http://rabbit:5672\""],
    );
    rejects(
        Some("[sinks.r]\ntype = \"amqp\"\nurl = \"amqp://localhost\"\nexchange = \"events\"\ndeclare_exchange = \"round-robin\"\n"),
        url(),
        &[],
        &["sinks.r.declare_exchange = \"round-robin\": use one of direct, topic, fanout, headers"],
    );
}

#[test]
fn routing_key_on_a_kafka_sink() {
    rejects(
        Some("[sinks.k]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n[[routes]]\nqueues = \"*\"\nsink = \"k\"\nrouting_key = \"x\"\n"),
        url(),
        &[],
        &["routes[0].routing_key = \"x\": sink \"k\" is of type kafka, which has no routing_key"],
    );
}

#[test]
fn bad_http_listen_address() {
    rejects(
        None,
        with_url(Overrides {
            http_listen: Some("everywhere:90".into()),
            ..Default::default()
        }),
        &[],
        &["http.listen"],
    );
}

#[test]
fn a_valid_config_is_shown_with_defaults_and_without_any_secret() {
    let config = load(
        Some(
            "[postgres]\nurl = \"postgres://outbox:s3cret@db:5432/app?password=s3cret\"\n\
             [sinks.k]\ntype = \"kafka\"\nbrokers = \"kafka:9092\"\n\
             [sinks.k.properties.sasl]\nmechanism = \"PLAIN\"\npassword = \"s3cret\"\n\
             [sinks.r]\ntype = \"amqp\"\nurl = \"amqp://guest:s3cret@rabbit:5672/%2f\"\n\
             [[routes]]\nqueues = \"*\"\nsink = \"k\"\n",
        ),
        Overrides::default(),
        &[],
    )
    .unwrap();
    let shown = outbox_worker::admin::show_config(&config);
    let logged = format!("{config:?}");
    for text in [&shown, &logged] {
        assert!(!text.contains("s3cret"), "a secret leaked: {text}");
    }
    assert!(
        shown.contains("url = \"postgres://outbox@db:5432/app?password=(redacted)\""),
        "{shown}"
    );
    assert!(
        shown.contains("url = \"amqp://guest@rabbit:5672/%2f\""),
        "{shown}"
    );
    assert!(
        shown.contains("\"sasl.password\" = \"(redacted)\""),
        "{shown}"
    );
    assert!(shown.contains("\"sasl.mechanism\" = \"PLAIN\""), "{shown}");
    assert!(
        shown.contains("max_in_flight = 10000"),
        "defaults filled in: {shown}"
    );
    // The connecting code still gets the real values.
    assert_eq!(
        config.url(),
        "postgres://outbox:s3cret@db:5432/app?password=s3cret"
    );
}

#[test]
fn a_bad_property_beside_a_secret_one_is_named_and_the_secret_not_shown() {
    let error = load(
        Some("[sinks.k]\ntype = \"kafka\"\nbrokers = \"localhost:9092\"\n[sinks.k.properties]\n\"sasl.password\" = \"s3cret\"\n\"compression.type\" = \"zip\"\n"),
        url(),
        &[],
    )
    .unwrap_err();
    assert!(
        error.contains("sinks.k.properties.compression.type = \"zip\""),
        "{error}"
    );
    assert!(!error.contains("s3cret"), "{error}");
}

#[test]
fn environment_overrides_the_file_and_flags_override_the_environment() {
    let config = load(
        Some("[postgres]\nurl = \"postgres://file@db/app\"\nslot = \"from_file\"\n[delivery]\nmax_in_flight = 7\n"),
        Overrides {
            slot: Some("from_flag".into()),
            ..Default::default()
        },
        &[
            ("OUTBOX_DELIVERY__MAX_IN_FLIGHT", "42"),
            ("OUTBOX_POSTGRES__SLOT", "from_env"),
            ("OUTBOX_SINKS__K__TYPE", "kafka"),
            ("OUTBOX_SINKS__K__BROKERS", "kafka:9092"),
            ("OUTBOX_SINKS__K__PROPERTIES__LINGER.MS", "7"),
        ],
    )
    .unwrap();
    assert_eq!(config.delivery.max_in_flight, 42, "env over file");
    assert_eq!(config.postgres.slot, "from_flag", "flag over env");
    assert_eq!(config.url(), "postgres://file@db/app", "file kept");
    let shown = outbox_worker::admin::show_config(&config);
    assert!(
        shown.contains("brokers = \"kafka:9092\"") && shown.contains("\"linger.ms\" = \"7\""),
        "{shown}"
    );
}

#[test]
fn the_byte_budget_reads_sizes_with_units_and_refuses_a_tiny_one() {
    let config = load(
        None,
        url(),
        &[("OUTBOX_DELIVERY__MAX_IN_FLIGHT_BYTES", "64 MiB")],
    )
    .unwrap();
    assert_eq!(
        config.delivery.max_in_flight_bytes.as_u64(),
        64 * 1024 * 1024
    );
    let config = load(
        Some("[delivery]\nmax_in_flight_bytes = 1000000000\n"),
        url(),
        &[],
    )
    .unwrap();
    assert_eq!(config.delivery.max_in_flight_bytes.as_u64(), 1_000_000_000);
    rejects(
        Some("[delivery]\nmax_in_flight_bytes = \"4 KiB\"\n"),
        url(),
        &[],
        &["delivery.max_in_flight_bytes = \"4.0 KiB\": at least 1 MiB"],
    );
    rejects(
        Some("[delivery]\nmax_in_flight_bytes = \"lots\"\n"),
        url(),
        &[],
        &["max_in_flight_bytes"],
    );
}

#[test]
fn kafka_over_tls_with_sasl_is_accepted() {
    // librdkafka built without OpenSSL refuses these: "OpenSSL not available at build time".
    let config = load(
        Some(
            "[sinks.kafka]\ntype = \"kafka\"\nbrokers = \"kafka:9093\"\n\
             [sinks.kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\
             \"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\"sasl.username\" = \"worker\"\n\
             \"sasl.password\" = \"s3cret\"\n\"ssl.ca.location\" = \"/etc/ssl/certs\"\n",
        ),
        url(),
        &[],
    );
    assert!(config.is_ok(), "{config:?}");
}

#[test]
fn the_readme_configuration_example_is_valid() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("```toml\n[postgres]")
        .expect("the README's configuration example")
        + "```toml\n".len();
    let example = &readme[start..start + readme[start..].find("```").unwrap()];
    let config = load(Some(example), Overrides::default(), &[]);
    assert!(config.is_ok(), "{config:?}");
}

#[test]
fn exactly_once_settings_that_would_break_it_are_refused() {
    let kafka = "[sinks.k]\ntype = \"kafka\"\nbrokers = \"b:9092\"\n";
    let route = "[[routes]]\nqueues = \"*\"\nsink = \"k\"\n";
    for (extra, expected) in [
        (
            "[sinks.k.properties]\n\"transactional.id\" = \"mine\"\n",
            "properties.transactional.id",
        ),
        (
            "[sinks.k.properties]\n\"enable.idempotence\" = \"0\"\n",
            "properties.enable.idempotence",
        ),
        ("progress_topic = \"bad topic\"\n", "progress_topic"),
    ] {
        let toml = format!("{kafka}{extra}{route}");
        rejects(Some(&toml), url(), &[], &[expected]);
    }
    let toml = format!("{kafka}{route}topic = \"pg_outbox-progress\"\n");
    rejects(
        Some(&toml),
        url(),
        &[],
        &["routes[0].topic", "progress_topic"],
    );
    // At least once, none of these matter.
    let toml = format!(
        "{kafka}exactly_once = false\n[sinks.k.properties]\n\"enable.idempotence\" = \"false\"\n{route}"
    );
    load(Some(&toml), url(), &[]).expect("at least once without idempotence");
}

#[test]
fn a_primary_url_that_is_not_a_url_or_beside_several_hosts() {
    rejects(
        Some("[postgres]\nprimary_url = \"postgres://u@p/db?sslmode=bogus\"\n"),
        url(),
        &[],
        &[
            "postgres.primary_url = ",
            "is not a PostgreSQL connection string",
        ],
    );
    // The replication connection would go to the host that is not in recovery; a standby's slot
    // is on the standby.
    rejects(
        Some(
            "[postgres]\nurl = \"postgres://u@standby,primary/db\"\n\
             primary_url = \"postgres://u@primary/db\"\n",
        ),
        Overrides::default(),
        &[],
        &["names 2 hosts, and postgres.primary_url is set"],
    );
    let config = load(
        Some("[postgres]\nprimary_url = \"postgres://u@primary/db\"\n"),
        url(),
        &[("OUTBOX_POSTGRES__PRIMARY_URL", "postgres://u@other/db")],
    )
    .expect("a standby's primary");
    assert_eq!(config.primary_url(), Some("postgres://u@other/db"));
}
