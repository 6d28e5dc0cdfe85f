//! Apache Kafka 4.4 (KRaft, one node acting as broker and controller) as a separate JVM: its own
//! directory and free ports, stopped on drop. The jars come from Maven Central through
//! `tests/kafka/pom.xml` (scripts/install-deps). Topics are not created automatically unless asked
//! for, as in production: tests create theirs up front.
//!
//! Formatting a log directory takes a JVM start of its own (~3 s), so it is done once per test
//! binary into a template that each broker copies; a broker then listens in about 5 s.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::executor::block_on;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

use crate::postgres::{free_port, run};

/// Where scripts/install-deps puts the broker's jars (`KAFKA_LIBS` overrides).
pub const DEFAULT_LIBS: &str = "/opt/pg_outbox/kafka-4.4.0/libs";
/// Any fixed KRaft cluster id will do: every test broker is a cluster of its own.
const CLUSTER_ID: &str = "MkU3OEVBNTcwNTJENDM2Qk";

pub fn libs() -> PathBuf {
    let libs =
        std::env::var_os("KAFKA_LIBS").map_or_else(|| PathBuf::from(DEFAULT_LIBS), PathBuf::from);
    assert!(
        libs.join(format!("kafka_2.13-{VERSION}.jar")).exists(),
        "Apache Kafka's jars are missing from {}: run scripts/install-deps",
        libs.display()
    );
    libs
}

/// The Apache Kafka version the tests run (tests/kafka/pom.xml).
pub const VERSION: &str = "4.4.0";

/// How a test broker differs from the default one.
#[derive(Debug, Clone, Default)]
pub struct KafkaOptions {
    /// `auto.create.topics.enable` (off by default).
    pub auto_create_topics: bool,
    /// `message.max.bytes` (Kafka's default: 1 MiB).
    pub message_max_bytes: Option<u32>,
    /// Two more listeners, SASL_PLAINTEXT with SCRAM-SHA-256 (user [`SCRAM_USER`]) and SSL with a
    /// certificate of a test CA ([`KafkaBroker::ca_pem`]), and ACLs enforced for them (anyone may
    /// do anything no ACL denies; the plain listener's anonymous user is a super user).
    pub secured: bool,
    /// More `server.properties` lines, `key=value`.
    pub properties: Vec<String>,
}

/// The SCRAM-SHA-256 user of a secured broker, and its password.
pub const SCRAM_USER: (&str, &str) = ("alice", "alice-secret");

/// Listeners of a secured broker besides the plain one.
struct Secured {
    sasl_port: u16,
    ssl_port: u16,
}

pub struct KafkaBroker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
    controller_port: u16,
    options: KafkaOptions,
    secured: Option<Secured>,
}

impl KafkaBroker {
    /// Starts a default broker and creates `topics` (name, partitions).
    pub fn start(topics: &[(&str, u32)]) -> KafkaBroker {
        Self::start_with(KafkaOptions::default(), topics)
    }

    pub fn start_with(options: KafkaOptions, topics: &[(&str, u32)]) -> KafkaBroker {
        let dir = tempfile::Builder::new()
            .prefix("outbox_kafka")
            .tempdir()
            .unwrap();
        let secured = options.secured.then(|| Secured {
            sasl_port: free_port(),
            ssl_port: free_port(),
        });
        if secured.is_some() {
            // SCRAM credentials live in the cluster's metadata, written at format time.
            let (user, password) = SCRAM_USER;
            format_into(
                &dir.path().join("data"),
                &[
                    "--add-scram",
                    &format!("SCRAM-SHA-256=[name={user},password={password}]"),
                ],
            );
            make_certificates(dir.path());
        } else {
            copy_dir(template(), &dir.path().join("data"));
        }
        let mut broker = KafkaBroker {
            child: None,
            dir,
            port: free_port(),
            controller_port: free_port(),
            options,
            secured,
        };
        broker.write_config();
        broker.launch();
        for (topic, partitions) in topics {
            broker.create_topic(topic, *partitions);
        }
        broker
    }

    fn write_config(&self) {
        let data = self.dir.path().join("data");
        let (port, controller) = (self.port, self.controller_port);
        // broker.session.timeout.ms: the controller is this same JVM, so a test that freezes the
        // broker (SIGSTOP for 10 s) would otherwise find it fenced by its own controller on
        // resume (default 9 s), its partitions leaderless for a while, sometimes for minutes; a
        // real cluster's controllers run elsewhere.
        let mut config = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\n\
             log.dirs={}\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=3\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=3\n\
             group.initial.rebalance.delay.ms=0\n\
             broker.session.timeout.ms=60000\n\
             num.partitions=1\n\
             auto.create.topics.enable={}\n",
            data.display(),
            self.options.auto_create_topics
        );
        if let Some(max) = self.options.message_max_bytes {
            config.push_str(&format!("message.max.bytes={max}\n"));
        }
        for line in &self.options.properties {
            config.push_str(&format!("{line}\n"));
        }
        if let Some(Secured {
            sasl_port,
            ssl_port,
        }) = &self.secured
        {
            let dir = self.dir.path().display();
            config = config
                .replace(
                    &format!("listeners=PLAINTEXT://127.0.0.1:{port},"),
                    &format!(
                        "listeners=PLAINTEXT://127.0.0.1:{port},SASL_PLAINTEXT://127.0.0.1:{sasl_port},\
                         SSL://127.0.0.1:{ssl_port},"
                    ),
                )
                .replace(
                    &format!("advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n"),
                    &format!(
                        "advertised.listeners=PLAINTEXT://127.0.0.1:{port},\
                         SASL_PLAINTEXT://127.0.0.1:{sasl_port},SSL://127.0.0.1:{ssl_port}\n"
                    ),
                )
                .replace(
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,\
                     SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL\n",
                );
            config.push_str(&format!(
                "sasl.enabled.mechanisms=SCRAM-SHA-256\n\
                 listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config=\
                 org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
                 ssl.keystore.type=PKCS12\n\
                 ssl.keystore.location={dir}/server.p12\n\
                 ssl.keystore.password=test-secret\n\
                 ssl.key.password=test-secret\n\
                 authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n\
                 super.users=User:ANONYMOUS\n\
                 allow.everyone.if.no.acl.found=true\n"
            ));
        }
        std::fs::write(self.dir.path().join("server.properties"), config).unwrap();
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("broker.log")).unwrap();
        let started = Instant::now();
        let child = java()
            .args(["-Xms128m", "-Xmx768m", "-XX:+UseSerialGC"])
            .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=info")
            .arg("-cp")
            .arg(classpath())
            .arg("kafka.Kafka")
            .arg(self.dir.path().join("server.properties"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("java on PATH (scripts/install-deps installs it)");
        self.child = Some(child);
        let deadline = started + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the Kafka broker exited ({status}): {}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "the Kafka broker did not listen on {} within 90 s: {}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "Kafka {VERSION} listening on {} after {:.1} s",
            self.port,
            started.elapsed().as_secs_f64()
        );
    }

    /// The end of the broker's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The SASL_PLAINTEXT (SCRAM-SHA-256) listener of a secured broker.
    pub fn sasl_brokers(&self) -> String {
        format!(
            "127.0.0.1:{}",
            self.secured.as_ref().expect("secured").sasl_port
        )
    }

    /// The SSL listener of a secured broker.
    pub fn ssl_brokers(&self) -> String {
        format!(
            "127.0.0.1:{}",
            self.secured.as_ref().expect("secured").ssl_port
        )
    }

    /// The test CA that signed a secured broker's certificate (PEM).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `kafka-acls --add ARGS` through the plain listener (whose user is a super user).
    pub fn add_acl(&self, args: &[&str]) {
        let out = self
            .tool("org.apache.kafka.tools.AclCommand")
            .args(["--bootstrap-server", &self.brokers(), "--add"])
            .args(args)
            .output()
            .expect("java");
        assert!(
            out.status.success(),
            "kafka-acls {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates `topic`, retrying while the broker is still starting.
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        let admin = self.admin();
        let new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let result = block_on(admin.create_topics([&new], &options));
            let error = match result {
                Ok(results) => match &results[0] {
                    Ok(_) => return,
                    Err((_, code)) => format!("{code:?}"),
                },
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "create topic {topic}: {error}; broker log: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sets a topic's configuration (`max.message.bytes`, …), as an operator would.
    pub fn alter_topic(&self, topic: &str, key: &str, value: &str) {
        let admin = self.admin();
        let config = AlterConfig::new(ResourceSpecifier::Topic(topic)).set(key, value);
        // The admin client's own thread completes its futures: no runtime is needed to wait.
        let results =
            block_on(admin.alter_configs([&config], &AdminOptions::new())).expect("alter configs");
        assert!(
            results[0].is_ok(),
            "alter {topic} {key}={value}: {results:?}"
        );
    }

    pub fn delete_topic(&self, topic: &str) {
        let admin = self.admin();
        let results =
            block_on(admin.delete_topics(&[topic], &AdminOptions::new())).expect("delete topics");
        assert!(results[0].is_ok(), "delete {topic}: {results:?}");
    }

    fn admin(&self) -> AdminClient<DefaultClientContext> {
        ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .expect("admin client")
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("the broker runs").id()
    }

    /// SIGSTOP: the broker hangs with its connections open, like a stalled machine.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Not asserted: the broker may have exited already, and this runs in drop, where a
            // panic during a failing test's unwinding aborts the whole test binary.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kafka's own command-line tools (`org.apache.kafka.tools…`), with this broker's classpath.
    pub fn tool(&self, class: &str) -> Command {
        let mut command = java();
        command
            .args(["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=warn")
            .arg("-cp")
            .arg(classpath())
            .arg(class);
        command
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("Kafka broker log (end):\n{}", self.log_tail());
        }
    }
}

fn java() -> Command {
    let mut command = Command::new("java");
    command.env_remove("JAVA_TOOL_OPTIONS");
    command
}

fn classpath() -> String {
    format!("{}/*", libs().display())
}

/// A log directory formatted once (`kafka-storage format`) and kept in the temporary directory
/// for every later test binary; each broker copies it.
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let template = std::env::temp_dir().join(format!("outbox_kafka_{VERSION}_formatted"));
        if template.join("meta.properties").exists() {
            return template;
        }
        let dir = tempfile::Builder::new()
            .prefix("outbox_kafka_format")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        format_into(&data, &[]);
        // Another test binary may have won the race: either copy is good.
        let _ = std::fs::rename(&data, &template);
        template
    })
}

/// `kafka-storage format` of a new log directory `data`, with `extra` arguments.
fn format_into(data: &Path, extra: &[&str]) {
    let config = data.with_extension("format.properties");
    std::fs::write(
        &config,
        format!(
            "process.roles=broker,controller\nnode.id=1\n\
             controller.quorum.voters=1@127.0.0.1:9093\n\
             listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093\n\
             controller.listener.names=CONTROLLER\nlog.dirs={}\n",
            data.display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let out = java()
        .args(["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
        .arg("-cp")
        .arg(classpath())
        .args(["kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c"])
        .arg(&config)
        .args(extra)
        .output()
        .expect("java on PATH (scripts/install-deps installs it)");
    assert!(
        out.status.success(),
        "kafka-storage format: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "Kafka log directory formatted in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A test CA (`ca.pem`) and a certificate it signed for 127.0.0.1, in a PKCS12 keystore
/// (`server.p12`, password `test-secret`), with openssl.
fn make_certificates(dir: &Path) {
    let at = |name: &str| dir.join(name).display().to_string();
    let (ca_key, ca, key, csr, cert, san) = (
        at("ca.key"),
        at("ca.pem"),
        at("server.key"),
        at("server.csr"),
        at("server.pem"),
        at("san.ext"),
    );
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=outbox test CA",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
        ],
    );
    run(
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    std::fs::write(&san, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &san,
            "-out",
            &cert,
        ],
    );
    run(
        "openssl",
        &[
            "pkcs12",
            "-export",
            "-in",
            &cert,
            "-inkey",
            &key,
            "-certfile",
            &ca,
            "-out",
            &at("server.p12"),
            "-passout",
            "pass:test-secret",
        ],
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}
