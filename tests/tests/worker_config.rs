//! `setup` from the command line against a real database: what to do when the extension is
//! missing, and idempotence. (Configuration errors are tested in-process in
//! outbox-worker/tests/config.rs.)

use outbox_tests::worker::run_once;
use outbox_tests::PgCluster;

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
