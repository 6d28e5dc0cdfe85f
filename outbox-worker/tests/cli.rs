//! The command line surface: subcommands, flags and exit statuses. (Its presence also makes
//! `cargo test --workspace` build the `outbox-worker` binary that the end-to-end tests in
//! `tests/` run.)

use std::process::{Command, Output};

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox-worker"))
        .args(args)
        .env_remove("OUTBOX_POSTGRES__URL")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_the_subcommands_and_the_quick_path_flags() {
    let help = worker(&["--help"]);
    assert!(help.status.success());
    for sub in ["run", "setup", "check-config", "status", "dlq"] {
        assert!(text(&help.stdout).contains(sub), "{sub} missing");
    }
    let run = worker(&["run", "--help"]);
    for flag in [
        "--config",
        "--postgres-url",
        "--kafka-brokers",
        "--amqp-url",
        "--slot",
        "--log-format",
    ] {
        assert!(text(&run.stdout).contains(flag), "{flag} missing");
    }
}

#[test]
fn a_configuration_error_exits_2_naming_the_key() {
    let out = worker(&[
        "run",
        "--postgres-url",
        "postgres://u@h/db",
        "--slot",
        "Bad-Slot",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("configuration error: postgres.slot = \"Bad-Slot\""),
        "{stderr}"
    );
}

#[test]
fn check_config_prints_the_configuration_without_the_password_and_exits_0() {
    let out = worker(&[
        "check-config",
        "--postgres-url",
        "postgres://u:s3cret@h/db",
        "--amqp-url",
        "amqp://guest:s3cret@rabbit",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("url = \"postgres://u@h/db\""), "{stdout}");
    assert!(!stdout.contains("s3cret"), "{stdout}");
}

#[test]
fn a_busy_http_port_exits_2_naming_the_address_before_anything_starts() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = busy.local_addr().unwrap().to_string();
    // Port 1 refuses connections: were the listener bound after connecting to PostgreSQL, the
    // worker would wait for the database (or fail differently) instead.
    let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-worker"))
        .args([
            "run",
            "--postgres-url",
            "postgres://u@127.0.0.1:1/db",
            "--http-listen",
            &address,
        ])
        .env_remove("OUTBOX_POSTGRES__URL")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the worker kept running with its HTTP port taken");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("http.listen = {address}: cannot listen")),
        "{stderr}"
    );
}
