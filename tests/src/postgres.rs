//! A throw-away PostgreSQL cluster with `wal_level = logical`, run as the `postgres` user
//! (PostgreSQL refuses root) on a free port, removed on drop. `PG_CONFIG` chooses the
//! installation (scripts/lib/pg-versions.sh knows where each major is); PostgreSQL 15 otherwise.
//! An installation without pg_config (17's server-only package) is chosen by `PG_BINDIR`, with
//! `PG_CLIENT_BINDIR` for the client programs it lacks (psql, pg_dump, pg_basebackup).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tokio_postgres::{Client, NoTls};

/// How pg_outbox is installed in a test cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Install {
    /// `CREATE EXTENSION pg_outbox`, by the superuser.
    Extension,
    /// `sql/pg_outbox.sql`, by a role without superuser ([`PgCluster::start_sql_install`]).
    Sql,
}

/// A PostgreSQL installation: its programs and major version.
#[derive(Clone, Debug)]
pub struct Installation {
    pub bin: PathBuf,
    pub major: u32,
    /// Where the client programs missing from `bin` are taken from (a newer major's).
    pub clients: Option<PathBuf>,
}

impl Installation {
    /// The one the tests run on: `PG_BINDIR`'s (with `PG_CLIENT_BINDIR`), else `PG_CONFIG`'s,
    /// else Debian's PostgreSQL 15.
    pub fn under_test() -> &'static Installation {
        static UNDER_TEST: OnceLock<Installation> = OnceLock::new();
        UNDER_TEST.get_or_init(|| {
            if let Some(bin) = std::env::var_os("PG_BINDIR") {
                return Installation::in_bindir(
                    PathBuf::from(bin),
                    std::env::var_os("PG_CLIENT_BINDIR").map(PathBuf::from),
                );
            }
            Installation::of(
                &std::env::var("PG_CONFIG")
                    .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into()),
            )
        })
    }

    /// Another major, where `scripts/install-deps` put it (`scripts/lib/pg-versions.sh`).
    pub fn major(major: u32) -> Installation {
        let versions = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/lib/pg-versions.sh");
        let out = Command::new("bash")
            .args([
                "-c",
                &format!(
                    "source {versions} && pg_bindir_for {major} && pg_client_bindir_for {major}"
                ),
            ])
            .output()
            .expect("bash");
        assert!(out.status.success(), "PostgreSQL {major}: {out:?}");
        let dirs = String::from_utf8(out.stdout).unwrap();
        let mut dirs = dirs.lines().map(PathBuf::from);
        let installation = Installation::in_bindir(dirs.next().unwrap(), dirs.next());
        assert_eq!(installation.major, major, "{installation:?}");
        installation
    }

    /// The server programs in `bin` (its major from `postgres --version`), client programs it
    /// lacks from `clients`.
    fn in_bindir(bin: PathBuf, clients: Option<PathBuf>) -> Installation {
        let postgres = bin.join("postgres");
        let out = Command::new(&postgres).arg("--version").output();
        let version = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (scripts/install-deps installs every major)",
                    postgres.display()
                )
            });
        // "postgres (PostgreSQL) 17.10" → 17
        let major = version
            .split_whitespace()
            .last()
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "a PostgreSQL version from {}: {version}",
                    postgres.display()
                )
            });
        Installation {
            bin,
            major,
            clients,
        }
    }

    fn of(pg_config: &str) -> Installation {
        let ask = |flag: &str| {
            let out = Command::new(pg_config)
                .arg(flag)
                .output()
                .unwrap_or_else(|e| {
                    panic!("{pg_config} {flag}: {e} (scripts/install-deps installs every major)")
                });
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        };
        // "PostgreSQL 16.2" → 16
        let major = ask("--version")
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .expect("a PostgreSQL version");
        Installation {
            bin: PathBuf::from(ask("--bindir")),
            major,
            clients: None,
        }
    }

    /// One of its programs (`initdb`, `pg_ctl`, `psql`...): its own, else the client programs'.
    pub fn program(&self, name: &str) -> PathBuf {
        let own = self.bin.join(name);
        match &self.clients {
            Some(clients) if !own.exists() => clients.join(name),
            _ => own,
        }
    }
}

/// A program of the PostgreSQL under test.
pub fn program(name: &str) -> PathBuf {
    Installation::under_test().program(name)
}

pub struct PgCluster {
    dir: tempfile::TempDir,
    pub port: u16,
    installation: Installation,
}

impl PgCluster {
    /// initdb + start; the database `postgres` has the pg_outbox extension created.
    pub async fn start() -> PgCluster {
        Self::start_without_extension().with_extension().await
    }

    /// This cluster with `CREATE EXTENSION pg_outbox` run in database `postgres`.
    async fn with_extension(self) -> PgCluster {
        self.superuser()
            .await
            .batch_execute("CREATE EXTENSION pg_outbox")
            .await
            .expect("CREATE EXTENSION pg_outbox (install it first: scripts/test-extension does)");
        self
    }

    pub fn start_without_extension() -> PgCluster {
        Self::start_configured(|_| {})
    }

    /// pg_outbox installed one way or the other in database `postgres`.
    pub async fn start_install(install: Install) -> PgCluster {
        match install {
            Install::Extension => Self::start().await,
            Install::Sql => Self::start_sql_install().await,
        }
    }

    /// pg_outbox installed one way or the other in `database`.
    pub async fn install_in(&self, install: Install, database: &str) {
        match install {
            Install::Extension => self
                .connect_to("postgres", database)
                .await
                .batch_execute("CREATE EXTENSION pg_outbox")
                .await
                .unwrap(),
            Install::Sql => self.sql_install(database).await,
        }
    }

    /// pg_outbox as the SQL install (`sql/pg_outbox.sql`, no C extension) in database `postgres`,
    /// installed by `installer`, a role without superuser holding what a managed service gives its
    /// admin role: CREATE on the database, CREATEROLE, REPLICATION.
    pub async fn start_sql_install() -> PgCluster {
        let cluster = Self::start_without_extension();
        cluster.sql_install("postgres").await;
        cluster
    }

    /// Runs `sql/pg_outbox.sql` in `database` as `installer` (created when missing).
    pub async fn sql_install(&self, database: &str) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/pg_outbox.sql");
        self.sql_install_script(database, Path::new(script)).await;
    }

    /// Runs SQL install `script` in `database` as `installer` (created when missing).
    pub async fn sql_install_script(&self, database: &str, script: &Path) {
        self.superuser()
            .await
            .batch_execute(&format!(
                "DO $$ BEGIN
                     IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'installer') THEN
                         CREATE ROLE installer LOGIN CREATEROLE REPLICATION;
                     END IF;
                 END $$;
                 GRANT CREATE ON DATABASE {database} TO installer;"
            ))
            .await
            .unwrap();
        let out = self.run_sql_install_script(database, script);
        assert!(
            out.status.success(),
            "psql -f {script:?} as installer: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `psql -v ON_ERROR_STOP=1 -f sql/pg_outbox.sql` in `database` as `installer`, as it ran.
    pub fn run_sql_install(&self, database: &str) -> std::process::Output {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/pg_outbox.sql");
        self.run_sql_install_script(database, Path::new(script))
    }

    /// `psql -v ON_ERROR_STOP=1 -f script` in `database` as `installer`, as it ran (a released
    /// SQL install, say).
    pub fn run_sql_install_script(&self, database: &str, script: &Path) -> std::process::Output {
        let port = self.port.to_string();
        Command::new(self.installation.program("psql"))
            .args([
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "installer",
            ])
            .args(["-d", database, "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(script)
            .output()
            .expect("psql")
    }

    /// With `lines` added to postgresql.conf (later settings win), and the extension created.
    pub async fn start_with_conf(lines: &str) -> PgCluster {
        Self::start_configured(|data| append_conf(data, lines))
            .with_extension()
            .await
    }

    /// TCP connections of roles other than `postgres` must give their password (SCRAM).
    pub async fn start_with_passwords() -> PgCluster {
        Self::start_configured(|data| {
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust
                 host all postgres 127.0.0.1/32 trust
                 host replication postgres 127.0.0.1/32 trust
                 host all all 127.0.0.1/32 scram-sha-256
                 host replication all 127.0.0.1/32 scram-sha-256
",
            )
            .unwrap();
        })
        .with_extension()
        .await
    }

    /// TCP connections only over TLS (a fresh self-signed certificate); plain ones are rejected.
    /// Unix-socket connections stay open for the harness ([`PgCluster::socket_client`]).
    pub async fn start_tls_only() -> PgCluster {
        let cluster = Self::start_configured(|data| {
            let (key, cert) = (data.join("server.key"), data.join("server.crt"));
            run(
                "openssl",
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=localhost",
                    "-keyout",
                    path(&key),
                    "-out",
                    path(&cert),
                ],
            );
            run("chown", &["postgres:postgres", path(&key), path(&cert)]);
            run("chmod", &["600", path(&key)]);
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust
hostssl all all 127.0.0.1/32 trust
hostssl replication all 127.0.0.1/32 trust
\
                 hostnossl all all 127.0.0.1/32 reject
hostnossl replication all 127.0.0.1/32 reject
",
            )
            .unwrap();
            append_conf(data, "ssl = on\n");
        });
        cluster
            .socket_client()
            .await
            .batch_execute("CREATE EXTENSION pg_outbox")
            .await
            .unwrap();
        cluster
    }

    /// Over the Unix socket, without TLS.
    pub async fn socket_client(&self) -> Client {
        let conninfo = format!(
            "host={} port={} user=postgres dbname=postgres",
            path(self.dir.path()),
            self.port
        );
        let (client, connection) = tokio_postgres::connect(&conninfo, NoTls)
            .await
            .expect("socket connect");
        tokio::spawn(connection);
        client
    }

    /// initdb, our settings, `configure(data_dir)`, start.
    fn start_configured(configure: impl FnOnce(&Path)) -> PgCluster {
        Self::start_on(Installation::under_test().clone(), configure)
    }

    /// [`PgCluster::start_configured`] on a chosen installation; no extension created.
    pub fn start_on(installation: Installation, configure: impl FnOnce(&Path)) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("pg_outbox_test")
            .tempdir()
            .expect("temp dir");
        run("chown", &["postgres:postgres", path(dir.path())]);
        let port = free_port();
        let data = dir.path().join("data");
        as_postgres(
            path(&installation.program("initdb")),
            &[
                "-D",
                path(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        );
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\nfsync = off\n\
             shared_buffers = 64MB\n",
            path(dir.path())
        );
        append_conf(&data, &conf);
        configure(&data);
        let cluster = PgCluster {
            dir,
            port,
            installation,
        };
        cluster.pg_ctl(&["start", "-w", "-t", "60", "-l", path(&cluster.log_path())]);
        cluster
    }

    /// A physical standby of this cluster (`pg_basebackup -R` with its own physical slot
    /// `standby`) with `hot_standby_feedback` (logical decoding on it needs that, PostgreSQL 16+)
    /// and, from 17, ready to keep synced copies of failover slots: `sync_replication_slots`, a
    /// dbname in `primary_conninfo`.
    pub fn start_standby(&self) -> PgCluster {
        self.start_standby_on_slot("standby")
    }

    /// [`PgCluster::start_standby`] with the physical slot `slot` (and `application_name`).
    pub fn start_standby_on_slot(&self, slot: &str) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("pg_outbox_standby")
            .tempdir()
            .expect("temp dir");
        run("chown", &["postgres:postgres", path(dir.path())]);
        let port = free_port();
        let data = dir.path().join("data");
        let primary = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres application_name={slot}",
            self.port
        );
        as_postgres(
            path(&self.installation.program("pg_basebackup")),
            &[
                "-d",
                &primary,
                "-D",
                path(&data),
                "-R",
                "-X",
                "stream",
                "-C",
                "-S",
                slot,
                // An immediate checkpoint: a spread one makes the copy wait seconds.
                "-c",
                "fast",
            ],
        );
        append_conf(
            &data,
            &format!(
                "port = {port}\nunix_socket_directories = '{}'\nhot_standby_feedback = on\n{}",
                path(dir.path()),
                if self.installation.major >= 17 {
                    "sync_replication_slots = on\n"
                } else {
                    ""
                }
            ),
        );
        // Later lines win: the connection string with the dbname slot sync needs.
        let auto = data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).unwrap();
        text.push_str(&format!("primary_conninfo = '{primary}'\n"));
        std::fs::write(&auto, text).unwrap();
        let standby = PgCluster {
            dir,
            port,
            installation: self.installation.clone(),
        };
        standby.pg_ctl(&["start", "-w", "-t", "60", "-l", path(&standby.log_path())]);
        standby
    }

    /// SIGKILL to the postmaster: a crash, not a shutdown.
    pub fn kill(&self) {
        run("kill", &["-9", &self.postmaster_pid().to_string()]);
    }

    pub fn postmaster_pid(&self) -> u32 {
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        let pid = std::fs::read_to_string(pid_file).expect("postmaster.pid");
        pid.lines().next().unwrap().trim().parse().expect("a pid")
    }

    pub fn installation(&self) -> &Installation {
        &self.installation
    }

    /// A standby becomes a primary.
    pub fn promote(&self) {
        self.pg_ctl(&["promote", "-w", "-t", "60"]);
    }

    pub fn url(&self) -> String {
        self.url_of("postgres", "postgres")
    }

    pub fn url_of(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs a client program of this PostgreSQL (pg_dump, psql, pg_restore) against the cluster
    /// as the superuser; panics with its output when it fails.
    pub fn client_program(&self, name: &str, args: &[&str]) -> Vec<u8> {
        let port = self.port.to_string();
        let out = Command::new(self.installation.program(name))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            out.status.success(),
            "{name} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    pub async fn superuser(&self) -> Client {
        self.connect_as("postgres").await
    }

    pub async fn connect_as(&self, user: &str) -> Client {
        self.connect_to(user, "postgres").await
    }

    pub async fn connect_to(&self, user: &str, database: &str) -> Client {
        let url = self.url_of(user, database);
        let (client, connection) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
        tokio::spawn(connection);
        client
    }

    /// Waits until a worker holds the slot `pg_outbox` (so that what is published next is
    /// captured by it).
    pub async fn wait_for_slot(&self, db: &Client) {
        crate::eventually(
            std::time::Duration::from_secs(30),
            "the worker to hold slot pg_outbox",
            || async move {
                db.query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'pg_outbox' AND active",
                    &[],
                )
                .await
                .map(|row| row.is_some())
                .unwrap_or(false)
            },
        )
        .await;
    }

    /// Bytes of WAL between the server's current position and the slot's confirmed position.
    pub async fn slot_lag(&self, db: &Client) -> i64 {
        db.query_one(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots \
             WHERE slot_name = 'pg_outbox'",
            &[],
        )
        .await
        .expect("slot lag")
        .get(0)
    }

    /// `pg_ctl restart -m fast`: what an operator's restart does.
    pub fn restart(&self) {
        self.pg_ctl(&[
            "restart",
            "-m",
            "fast",
            "-w",
            "-t",
            "60",
            "-l",
            path(&self.log_path()),
        ]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.path().join("data");
        let mut all = vec!["-D", path(&data)];
        all.extend_from_slice(args);
        as_postgres(path(&self.installation.program("pg_ctl")), &all);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                path(&self.installation.program("pg_ctl")),
                "-D",
                path(&data),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}

/// SQLSTATE, message and hint of the server error `sql` raises; panics if it succeeds.
pub async fn expect_error(db: &Client, sql: &str) -> (String, String, String) {
    let err = db.batch_execute(sql).await.expect_err(sql);
    let db_err = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}: not a server error: {err}"));
    (
        db_err.code().code().to_owned(),
        db_err.message().to_owned(),
        db_err.hint().unwrap_or_default().to_owned(),
    )
}

/// The single bigint a query returns.
pub async fn count(db: &Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// The first column of every row `sql` returns.
pub async fn column<T: tokio_postgres::types::FromSqlOwned>(db: &Client, sql: &str) -> Vec<T> {
    db.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn append_conf(data: &Path, lines: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut f| f.write_all(lines.as_bytes()))
        .expect("append to postgresql.conf");
}

/// A port nobody listens on right now, for a server started later.
///
/// Taken below the kernel's ephemeral range (32768-60999 on Linux), never from it: a port the
/// kernel hands out for `bind :0` is also the one it may give the next outgoing connection (a
/// client of another test), and a server slow to start (Kafka Connect's JVM) then finds it taken.
/// Each process walks its own stretch of 20000-32767 (chosen by its pid) and never hands out a
/// port twice, so parallel tests of one binary cannot be given the same one either.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 32_768 - FIRST;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(97) % COUNT,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}-{}", FIRST + COUNT - 1)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn as_postgres(program: &str, args: &[&str]) {
    let mut all = vec!["-u", "postgres", "--", program];
    all.extend_from_slice(args);
    run("runuser", &all);
}

/// Runs `program ARGS`, asserting success.
pub(crate) fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bad calls of the SQL API with the start of their message and a piece of their hint: the same
/// for the extension and the SQL install (tests/tests/extension.rs, sql_install.rs).
pub fn bad_inputs() -> Vec<(String, &'static str, &'static str)> {
    let long = "q".repeat(250);
    vec![
    ("SELECT outbox.publish(NULL, '{}')".into(), "outbox.publish: queue must not be NULL", "Queue names"),
    ("SELECT outbox.publish('', '{}')".into(), "outbox.publish: invalid queue name \"\": it is empty", "A-Z a-z 0-9"),
    ("SELECT outbox.publish('orders/eu', '{}')".into(), "outbox.publish: invalid queue name \"orders/eu\": character '/' is not allowed", "Kafka topics"),
    ("SELECT outbox.publish('ordérs', '{}')".into(), "outbox.publish: invalid queue name \"ordérs\": character 'é' is not allowed", "Queue names"),
    ("SELECT outbox.publish('a b', '{}')".into(), "outbox.publish: invalid queue name \"a b\": character ' ' is not allowed", "Queue names"),
    (format!("SELECT outbox.publish('{long}', '{{}}')"), "it is 250 characters long, the limit is 249", "Queue names"),
    ("SELECT outbox.publish('..', '{}')".into(), "outbox.publish: invalid queue name \"..\": \".\" and \"..\" are not valid Kafka topic names", "Queue names"),
    ("SELECT outbox.publish('orders', NULL)".into(), "outbox.publish: payload must not be NULL", "JSON value"),
    ("SELECT outbox.publish('orders', '{}', '[1]')".into(), "outbox.publish: headers must be a JSON object, got a JSON array", "JSON object whose values are strings"),
    ("SELECT outbox.publish('orders', '{}', '\"x\"')".into(), "outbox.publish: headers must be a JSON object, got a JSON scalar", "JSON object"),
    ("SELECT outbox.publish('orders', '{}', '{\"attempt\": 3}')".into(), "outbox.publish: header \"attempt\" must be a string, got 3", "values are strings"),
    ("SELECT outbox.publish('orders', '{}', '{\"outbox-id\": \"x\"}')".into(), "outbox.publish: header \"outbox-id\" uses the reserved prefix \"outbox-\"", "values are strings"),
    ("SELECT outbox.publish('orders', '{}', '{\"\": \"x\"}')".into(), "outbox.publish: a header name is empty", "JSON object"),
    ("SELECT outbox.publish('orders', '{}', '{}', '')".into(), "outbox.publish: key must not be an empty string", "Pass NULL"),
    ("SELECT outbox.publish_bytes('blobs', NULL)".into(), "outbox.publish_bytes: payload must not be NULL", "bytea"),
    ("SELECT outbox.publish_bytes('bad queue', '\\x00')".into(), "outbox.publish_bytes: invalid queue name \"bad queue\"", "Queue names"),
    ("SELECT outbox.publish_batch('q', NULL)".into(), "outbox.publish_batch: payloads must not be NULL", "array of JSON values"),
    ("SELECT outbox.publish_batch('q', ARRAY['1','2']::jsonb[], '{}', ARRAY['a'])".into(), "outbox.publish_batch: payloads has 2 elements but keys has 1", "one key per payload"),
    ("SELECT outbox.publish_batch('q', ARRAY['1',NULL]::jsonb[])".into(), "outbox.publish_batch: payloads[2] must not be NULL", "Every element"),
    ("SELECT outbox.publish_batch('q', ARRAY[['1'],['2']]::jsonb[])".into(), "outbox.publish_batch: payloads must be a one-dimensional array, got 2 dimensions", "flat array"),
    ("SELECT outbox.publish_batch('q', ARRAY['1']::jsonb[], '{}', ARRAY[''])".into(), "outbox.publish_batch: keys element must not be an empty string", "Pass NULL"),
    ("SELECT outbox.publish_batch('q', ARRAY['1', to_jsonb(repeat('x', 600000)), NULL])".into(), "more than pg_outbox.max_message_size (524288 bytes)", "store the large part elsewhere"),
    ("SELECT outbox.publish('q', to_jsonb(repeat('x', 600000)), '{}', 'k')".into(), "outbox.publish: the message is 6000", "store the large part elsewhere"),
    ("SELECT outbox.publish_batch('q!', ARRAY['1']::jsonb[])".into(), "outbox.publish_batch: invalid queue name \"q!\"", "Queue names"),
    ("SET pg_outbox.storage = 'disk'; SELECT outbox.publish('q', '{}')".into(), "invalid value for parameter \"pg_outbox.storage\": \"disk\"", "Available values: table, wal"),
    ("SELECT outbox.try_mark_processed(NULL, 'm')".into(), "outbox.try_mark_processed: consumer must not be NULL", "Name the consumer"),
    ("SELECT outbox.try_mark_processed('c', '')".into(), "outbox.try_mark_processed: message_id must not be an empty string", "outbox-id header"),
    ("SELECT outbox.is_processed('c', NULL)".into(), "outbox.is_processed: message_id must not be NULL", "outbox-id header"),
    ("SELECT outbox.purge_processed(interval '-1 day')".into(), "outbox.purge_processed: older_than must be a non-negative interval, got -1 days", "redelivery window"),
    ("SELECT outbox.purge_processed(NULL)".into(), "outbox.purge_processed: older_than must be a non-negative interval, got NULL", "redelivery window"),
    ("SELECT outbox.redrive(NULL::uuid)".into(), "outbox.redrive: id must not be NULL", "outbox.dead_letters"),
    ("SELECT outbox.redrive('01890a5d-ac96-774b-bcce-b302099a8057'::uuid)".into(), "outbox.redrive: no dead letter with id", "SELECT id, queue, error FROM outbox.dead_letters"),
    ("SELECT outbox.redrive(''::text)".into(), "outbox.redrive: queue must not be an empty string", "queue whose dead letters"),
    ("SELECT outbox.prune(max_rows => 0)".into(), "outbox.prune: max_rows must be a positive integer, got 0", "repeatedly"),
    ]
}
