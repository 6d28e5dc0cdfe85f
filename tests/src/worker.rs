//! The worker as its built binary, run as a subprocess, its stderr kept in a file for failures.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::kafka_broker::signal;

pub struct Worker {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// `target/<profile>/outbox-worker`, built by `cargo test --workspace` before any test runs
/// (tests live in `target/<profile>/deps/`, the bench binary in `target/<profile>/`).
/// `TEST_WORKER_BIN` runs the tests against another build (an older release, to show that a
/// test fails without its fix).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TEST_WORKER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let binary = profile_dir.join("outbox-worker");
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo build -p outbox-worker` (cargo test --workspace does)",
        binary.display()
    );
    binary
}

/// `run` with a config file.
pub fn config_args(postgres_url: &str, config: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "--postgres-url".into(),
        postgres_url.into(),
        "--config".into(),
        config.display().to_string(),
    ]
}

/// `run` delivering every queue to the Kafka topic of the same name, with a config file.
pub fn kafka_args(postgres_url: &str, brokers: &str, config: &Path) -> Vec<String> {
    let mut args = config_args(postgres_url, config);
    args.extend(["--kafka-brokers".into(), brokers.into()]);
    args
}

/// Runs `outbox-worker ARGS` to completion (for `check-config` and `setup`).
pub fn run_once(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run outbox-worker")
}

impl Worker {
    /// Starts `outbox-worker ARGS`; its stdout is appended to `stdout` (or discarded).
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S], stdout: Option<&Path>) -> Worker {
        Self::start_with(args, &[], stdout.map(stdout_to))
    }

    /// Starts `outbox-worker ARGS` with extra environment variables and the given stdout.
    pub fn start_with<S: AsRef<std::ffi::OsStr>>(
        args: &[S],
        env: &[(&str, &str)],
        stdout: Option<Stdio>,
    ) -> Worker {
        let dir = tempfile::Builder::new()
            .prefix("outbox_worker")
            .tempdir()
            .unwrap();
        let log = dir.path().join("stderr.log");
        let child = Command::new(binary())
            .args(args)
            // TEST_WORKER_LOG: another filter, to debug one test.
            .env(
                "RUST_LOG",
                std::env::var("TEST_WORKER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(stdout.unwrap_or_else(Stdio::null))
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn outbox-worker");
        Worker {
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    /// Starts `outbox-worker ARGS` with its stdout and stderr both writing to one pipe, whose
    /// reading end is returned: keep it and never read it, and both block once it is full.
    pub fn start_into_one_pipe<S: AsRef<std::ffi::OsStr>>(
        args: &[S],
    ) -> (Worker, std::io::PipeReader) {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let dir = tempfile::Builder::new()
            .prefix("outbox_worker")
            .tempdir()
            .unwrap();
        let child = Command::new(binary())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(writer.try_clone().expect("pipe"))
            .stderr(writer)
            .spawn()
            .expect("spawn outbox-worker");
        let worker = Worker {
            child: Some(child),
            log: dir.path().join("stderr.log"),
            _dir: dir,
        };
        (worker, reader)
    }

    /// A config file that lives as long as the returned handle.
    pub fn config_file(toml: &str) -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(file.path(), toml).unwrap();
        file
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no drain, no final confirmation.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (at most `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "worker did not exit within {timeout:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The worker's stdout, when it was started with `Stdio::piped()`.
    pub fn take_stdout(&mut self) -> std::process::ChildStdout {
        let child = self.child.as_mut().expect("running");
        child.stdout.take().expect("stdout was piped")
    }

    /// Waits for the worker to exit on its own; panics with its log if it is still running after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "worker still running {timeout:?} later, expected it to exit:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- outbox-worker stderr ---\n{}", self.log());
        }
    }
}

/// Appends the worker's stdout to `path`.
pub fn stdout_to(path: &Path) -> Stdio {
    Stdio::from(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("stdout file"),
    )
}

/// A plain HTTP/1.0 GET (enough for /metrics and /health): (status code, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of one Prometheus sample line `name{labels} value` (labels as written, sorted).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
