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
