//! One rule, three places: what a queue name may be is written in the extension's C-callable Rust,
//! in the SQL install's PL/pgSQL, and in the worker (which quarantines what breaks it). They
//! must agree on every case, or a message one accepts would be refused or quarantined by another.

use outbox_tests::postgres::Install;
use outbox_tests::PgCluster;
use outbox_worker::rules::is_valid_queue;

fn cases() -> Vec<String> {
    let mut cases: Vec<String> = [
        "orders",
        "a",
        "A.b_c-9",
        ".",
        "..",
        "...",
        ".hidden",
        "",
        "a/b",
        "a b",
        "é",
        "a:b",
        "a\\b",
        "ORDERS",
        "0",
        "-",
        "_",
        "a\u{0}b",
        "tab\there",
        "q;drop",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cases.extend(["x".repeat(249), "x".repeat(250), "é".repeat(100)]);
    cases
}

#[tokio::test(flavor = "multi_thread")]
async fn the_extension_the_sql_install_and_the_worker_agree_on_queue_names() {
    for install in [Install::Extension, Install::Sql] {
        let pg = PgCluster::start_install(install).await;
        let db = pg.superuser().await;
        let mut disagreements = Vec::new();
        for queue in cases() {
            let accepted = db
                .query_one("SELECT outbox.publish($1, '{}')", &[&queue])
                .await
                .is_ok();
            if accepted != is_valid_queue(&queue) {
                disagreements.push(format!(
                    "{queue:?}: {install:?} {}, the worker {}",
                    if accepted { "accepts" } else { "refuses" },
                    if is_valid_queue(&queue) {
                        "accepts"
                    } else {
                        "refuses"
                    }
                ));
            }
        }
        assert!(disagreements.is_empty(), "{disagreements:#?}");
    }
}
