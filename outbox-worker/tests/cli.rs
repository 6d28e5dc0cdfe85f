//! The command line surface. (Its presence also makes `cargo test --workspace` build the
//! `outbox-worker` binary that the end-to-end tests in `tests/` run.)

use std::process::Command;

fn worker(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox-worker"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn help_lists_the_subcommands() {
    let (ok, help) = worker(&["--help"]);
    assert!(ok);
    for sub in ["run", "setup", "check-config"] {
        assert!(help.contains(sub), "{sub} missing from:\n{help}");
    }
}

#[test]
fn run_help_lists_the_quick_path_flags() {
    let (ok, help) = worker(&["run", "--help"]);
    assert!(ok);
    for flag in [
        "--config",
        "--postgres-url",
        "--kafka-brokers",
        "--slot",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}
