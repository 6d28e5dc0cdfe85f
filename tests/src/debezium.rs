//! Debezium 3.6.1's PostgreSQL connector with the Outbox Event Router, in Kafka Connect
//! standalone: the relay pg_outbox replaces, run as its documentation sets it up, for the test
//! that compares its records with the worker's and for the side-by-side benchmark.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::{KafkaBroker, PgCluster};

/// tests/debezium/pom.xml, resolved by scripts/install-deps.
pub const VERSION: &str = "3.6.1.Final";

/// Debezium's documented outbox table, a publication of it and the slot `debezium`, in the
/// database `postgres`.
pub async fn create_outbox_table(pg: &PgCluster) {
    let db = pg.superuser().await;
    db.batch_execute(
        "CREATE TABLE public.outbox_event (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
           aggregateid text NOT NULL, type text NOT NULL, payload jsonb);
         CREATE PUBLICATION debezium FOR TABLE public.outbox_event;",
    )
    .await
    .unwrap();
    // A statement of its own: a slot cannot be made in a transaction that wrote.
    db.execute(
        "SELECT pg_create_logical_replication_slot('debezium', 'pgoutput')",
        &[],
    )
    .await
    .unwrap();
}

/// Kafka Connect standalone running the connector on the slot `debezium` (streaming from its
/// position, no snapshot) with the Outbox Event Router at its defaults, key and value passed
/// through as text (`StringConverter`: the value is the payload's text), plus `extra` connector
/// properties (`key=value` lines). pg_outbox's wal form is excluded from what it captures: by
/// default Debezium turns every logical decoding message into a record for the topic
/// `<topic.prefix>.message`, and where that topic cannot be made its producer waits for it and
/// nothing after it is delivered. Killed on drop.
pub struct Connect {
    child: Child,
    dir: tempfile::TempDir,
}

impl Connect {
    pub fn start(pg: &PgCluster, kafka: &KafkaBroker, worker_extra: &str, extra: &str) -> Connect {
        let libs = libs();
        let dir = tempfile::tempdir().unwrap();
        let worker = dir.path().join("worker.properties");
        let connector = dir.path().join("connector.properties");
        std::fs::write(
            &worker,
            format!(
                "bootstrap.servers={}\n\
                 key.converter=org.apache.kafka.connect.storage.StringConverter\n\
                 value.converter=org.apache.kafka.connect.storage.StringConverter\n\
                 offset.storage.file.filename={}\n\
                 listeners=http://127.0.0.1:{}\n{worker_extra}",
                kafka.brokers(),
                dir.path().join("offsets").display(),
                crate::postgres::free_port()
            ),
        )
        .unwrap();
        std::fs::write(
            &connector,
            format!(
                "name=outbox\n\
                 connector.class=io.debezium.connector.postgresql.PostgresConnector\n\
                 plugin.name=pgoutput\n\
                 database.hostname=127.0.0.1\n\
                 database.port={}\n\
                 database.user=postgres\n\
                 database.password=unused\n\
                 database.dbname=postgres\n\
                 topic.prefix=bench\n\
                 table.include.list=public.outbox_event\n\
                 slot.name=debezium\n\
                 publication.name=debezium\n\
                 publication.autocreate.mode=disabled\n\
                 snapshot.mode=no_data\n\
                 tombstones.on.delete=false\n\
                 message.prefix.exclude.list=pg_outbox\n\
                 transforms=outbox\n\
                 transforms.outbox.type=io.debezium.transforms.outbox.EventRouter\n{extra}",
                pg.port
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("connect.log")).unwrap();
        let child = Command::new("java")
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .args([&worker, &connector])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("java (Kafka Connect)");
        Connect { child, dir }
    }

    /// SIGTERM, as an operator stops it: Kafka Connect flushes its producer and commits its
    /// offsets (and so confirms its slot) before it exits.
    pub fn stop(mut self) {
        crate::kafka_broker::signal(self.child.id(), "TERM");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "Kafka Connect still running 60 s after SIGTERM:\n{}",
                self.log_tail()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kafka Connect's errors and the end of its log, for a failure message.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("connect.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let errors = lines
            .iter()
            // Connect's plugin scan complains about classes it does not need.
            .filter(|l| l.contains("ERROR") && !l.contains("PluginScanner"))
            .take(10);
        let tail = &lines[lines.len().saturating_sub(30)..];
        errors.chain(tail).copied().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Connect {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where scripts/install-deps put Debezium and Kafka Connect (`DEBEZIUM_LIBS` overrides).
fn libs() -> PathBuf {
    let libs = std::env::var_os("DEBEZIUM_LIBS").map_or_else(
        || PathBuf::from(format!("/opt/pg_outbox/debezium-{VERSION}/libs")),
        PathBuf::from,
    );
    assert!(
        libs.join(format!("debezium-connector-postgres-{VERSION}.jar"))
            .exists(),
        "Debezium's jars are missing from {}: run scripts/install-deps",
        libs.display()
    );
    libs
}
