//! What can be checked of the deployment files without a Docker engine, and the SQL examples
//! run against a real PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::Command;

use outbox_tests::worker::run_once;
use outbox_tests::PgCluster;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Every local source a Dockerfile COPYs exists.
#[test]
fn dockerfiles_copy_only_files_that_exist() {
    for dockerfile in ["Dockerfile.postgres", "Dockerfile.worker"] {
        let text = std::fs::read_to_string(root().join(dockerfile)).unwrap();
        let mut copies = 0;
        for line in text
            .lines()
            .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
        {
            let parts: Vec<&str> = line.split_whitespace().collect();
            for source in &parts[1..parts.len() - 1] {
                assert!(
                    root().join(source).exists(),
                    "{dockerfile}: {line}: {source} is missing"
                );
                copies += 1;
            }
        }
        assert!(copies > 0, "{dockerfile} copies nothing from the tree");
        assert!(text.contains("FROM "), "{dockerfile}");
    }
    let postgres = std::fs::read_to_string(root().join("Dockerfile.postgres")).unwrap();
    assert!(
        postgres.contains("cargo-pgrx --version 0.18.0"),
        "the pinned cargo-pgrx"
    );
    assert!(postgres.contains("wal_level=logical"));
}

/// The compose file parses, has the four services with health checks, and mounts files that exist.
#[test]
fn compose_file_parses_and_mounts_existing_files() {
    let script = r#"
import json, sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
print(json.dumps(doc))
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            root().join("docker-compose.yml").to_str().unwrap(),
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let compose: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = compose["services"].as_object().unwrap();
    for name in ["postgres", "kafka", "rabbitmq", "outbox-worker"] {
        let service = &services[name];
        assert!(service.is_object(), "service {name}");
        assert!(
            service["healthcheck"]["test"].is_array(),
            "{name} has a health check"
        );
        if let Some(dockerfile) = service["build"]["dockerfile"].as_str() {
            assert!(root().join(dockerfile).exists(), "{name}: {dockerfile}");
        }
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let host = volume.as_str().unwrap().split(':').next().unwrap();
            assert!(
                root().join(host).exists(),
                "{name} mounts {host}, which is missing"
            );
        }
    }
}

/// The worker config compose mounts is valid.
#[test]
fn the_mounted_worker_config_passes_check_config() {
    let config = root().join("deploy/outbox-worker.toml");
    let out = run_once(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("type = \"amqp\"") && shown.contains("type = \"kafka\""),
        "{shown}"
    );
}

/// sql/examples/*.sql and the image's init script run, in order, on a real cluster; each asserts
/// its own results.
#[tokio::test(flavor = "multi_thread")]
async fn sql_examples_run() {
    let pg = PgCluster::start_without_extension();
    let db = pg.superuser().await;
    let init = std::fs::read_to_string(root().join("deploy/init-pg_outbox.sql")).unwrap();
    db.batch_execute(&init)
        .await
        .expect("deploy/init-pg_outbox.sql");
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("sql/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    examples.sort();
    assert_eq!(examples.len(), 3);
    for example in examples {
        let sql = std::fs::read_to_string(&example).unwrap();
        if let Err(e) = db.batch_execute(&sql).await {
            panic!(
                "{}: {}",
                example.display(),
                e.as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or(e.to_string())
            );
        }
    }
}
