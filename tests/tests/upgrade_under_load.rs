//! Upgrades under traffic (issue 30): from every released version, installed from its released
//! script, to this one, while pgbench publishers and consumers run. No transaction of theirs may
//! fail: the README says an upgrade neither deadlocks nor aborts them. The SQL install's upgrade
//! dropped and re-made every function (a caller that had looked one up failed, "cache lookup
//! failed") and every policy (queued every consumer behind the table's lock, and deadlocked some);
//! it now replaces them in place.
//!
//! The one exception, which the README states: the upgrade from 0.2.0 changes the type of
//! `outbox.consumers.role` (a rewrite), and a consumer of 0.2.0's code that waits on it reads the
//! table empty, with the snapshot it took before, and fails once ("not registered", 42501). No
//! order of locks avoids that for code already running: 0.2.0's `_may_act_as` is parsed from its
//! text after the wait, by column name. So from 0.2.0 the publishers run and the consumers are
//! paused, as the README advises.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outbox_tests::postgres::{count, program, Install};
use outbox_tests::PgCluster;

/// Clients of each kind, and how long pgbench runs; the upgrade starts a third of the way in.
const CLIENTS: usize = 3;
const SECONDS: u64 = 9;

fn released(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../pg_outbox/sql/released")
        .join(file)
}

#[tokio::test(flavor = "multi_thread")]
async fn extension_from_0_1_0() {
    upgrade_under_load(Install::Extension, "0.1.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn extension_from_0_2_0() {
    upgrade_under_load(Install::Extension, "0.2.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn extension_from_0_2_1() {
    upgrade_under_load(Install::Extension, "0.2.1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_install_from_0_2_0() {
    upgrade_under_load(Install::Sql, "0.2.0").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_install_from_0_2_1() {
    upgrade_under_load(Install::Sql, "0.2.1").await;
}

async fn upgrade_under_load(install: Install, from: &str) {
    let pg = std::sync::Arc::new(PgCluster::start_without_extension());
    let admin = pg.superuser().await;
    match install {
        Install::Extension => admin
            .batch_execute(&format!("CREATE EXTENSION pg_outbox VERSION '{from}'"))
            .await
            .unwrap(),
        Install::Sql => {
            pg.sql_install_script("postgres", &released(&format!("sql-install-{from}.sql")))
                .await;
        }
    }
    admin
        .batch_execute("CREATE ROLE app LOGIN IN ROLE outbox_publisher, outbox_consumer")
        .await
        .unwrap();
    if from == "0.1.0" {
        // 0.1.0 had no registrations: the upgrade registers the consumers it finds marks of.
        admin
            .batch_execute("INSERT INTO outbox.processed_messages (consumer, message_id) VALUES ('billing', 'seed')")
            .await
            .unwrap();
    } else {
        admin
            .batch_execute("SELECT outbox.register_consumer('billing', 'app')")
            .await
            .unwrap();
    }
    let scripts = tempfile::tempdir().unwrap();
    let publish = scripts.path().join("publish.sql");
    let consumers_run = from != "0.2.0";
    std::fs::write(
        &publish,
        "SELECT outbox.publish('orders', '{\"n\": 1}', '{}', 'k');\n",
    )
    .unwrap();
    let consume = scripts.path().join("consume.sql");
    std::fs::write(
        &consume,
        "\\set n random(1, 1000000000)\n\
         BEGIN;\n\
         SELECT outbox.try_mark_processed('billing', 'm-' || :n);\n\
         SELECT outbox.is_processed('billing', 'm-' || :n);\n\
         COMMIT;\n",
    )
    .unwrap();
    let port = pg.port.to_string();
    let clients = (if consumers_run { 2 * CLIENTS } else { CLIENTS }).to_string();
    let seconds = SECONDS.to_string();
    let bench = std::process::Command::new(program("pgbench"))
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app",
            "-c",
            &clients,
        ])
        .args(["-j", "2", "-T", &seconds])
        .arg("-f")
        .arg(&publish)
        .args(if consumers_run {
            vec!["-f".as_ref(), consume.as_os_str()]
        } else {
            vec![]
        })
        .arg("postgres")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench");
    tokio::time::sleep(Duration::from_secs(SECONDS / 3)).await;
    let upgraded = match install {
        Install::Extension => admin
            .batch_execute("ALTER EXTENSION pg_outbox UPDATE")
            .await
            .map_err(|e| format!("{e:?}")),
        Install::Sql => {
            let pg = pg.clone();
            let out = tokio::task::spawn_blocking(move || pg.run_sql_install("postgres"))
                .await
                .unwrap();
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        }
    };
    let bench = tokio::task::spawn_blocking(move || bench.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&bench.stdout),
        String::from_utf8_lossy(&bench.stderr),
    );
    upgraded.unwrap_or_else(|e| panic!("{install:?} upgrade from {from}: {e}"));
    assert!(
        bench.status.success() && !stderr.contains("ERROR") && !stderr.contains("aborted"),
        "{install:?} upgrade from {from}: pgbench clients failed:\n{stderr}\n{stdout}"
    );
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{install:?} from {from}:\n{stdout}"
    );
    if consumers_run {
        // The marks went on after the upgrade: pgbench ran a third of its time before it.
        assert!(count(&admin, "SELECT count(*) FROM outbox.processed_messages").await > 10);
    }
    // Consumers work after it, whatever ran during it.
    let app = pg.connect_as("app").await;
    let marked: bool = app
        .query_one("SELECT outbox.try_mark_processed('billing', 'after')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(marked);
}

/// What 0.2.1's SQL install could not upgrade past (issue 30, item 3): a session idle in a
/// transaction that read `outbox.processed_messages` (the script's DROP POLICY waited for it, and
/// every consumer queued behind the script), a publisher's `BEGIN ATOMIC` wrapper of
/// `outbox.publish` and an operator's view over `outbox.status()` (it could not drop them). The
/// functions are now replaced in place and the policies kept: the upgrade goes through at once,
/// and the wrapper and the view work after it.
#[tokio::test(flavor = "multi_thread")]
async fn the_sql_install_upgrades_past_idle_readers_wrappers_and_views() {
    let pg = std::sync::Arc::new(PgCluster::start_without_extension());
    pg.sql_install_script("postgres", &released("sql-install-0.2.1.sql"))
        .await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN IN ROLE outbox_publisher, outbox_consumer, outbox_operator;
             SELECT outbox.register_consumer('billing', 'app');
             CREATE FUNCTION public.publish_order(n int) RETURNS uuid LANGUAGE sql
             BEGIN ATOMIC SELECT outbox.publish('orders', jsonb_build_object('n', n)); END;
             CREATE VIEW public.outbox_health AS SELECT slot_name, lag_bytes FROM outbox.status();
             GRANT EXECUTE ON FUNCTION public.publish_order(int) TO app;
             GRANT SELECT ON public.outbox_health TO app;",
        )
        .await
        .unwrap();
    let reader = pg.connect_as("app").await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM outbox.processed_messages")
        .await
        .unwrap();
    // And one that read the version record (hostile review: the script's ALTER TABLE of it
    // waited, holding the dead letters' lock).
    let version_reader = pg.connect_as("app").await;
    version_reader
        .batch_execute("BEGIN; SELECT * FROM outbox.sql_install")
        .await
        .unwrap();
    let script = {
        let pg = pg.clone();
        tokio::task::spawn_blocking(move || pg.run_sql_install("postgres"))
    };
    let out = tokio::time::timeout(Duration::from_secs(30), script)
        .await
        .expect("the upgrade waits behind a reader idle in its transaction")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    reader.batch_execute("COMMIT").await.unwrap();
    version_reader.batch_execute("COMMIT").await.unwrap();
    let app = pg.connect_as("app").await;
    app.batch_execute(
        "SELECT public.publish_order(1); SELECT * FROM public.outbox_health;
         SELECT outbox.try_mark_processed('billing', 'm-1');",
    )
    .await
    .unwrap();
    assert_eq!(
        count(&admin, "SELECT count(*) FROM outbox.messages").await,
        1
    );
}

/// The rest of issue 30's item 3, on the SQL install: a role that can write the version record
/// (a grant that leaked, as 0.2.0's default privileges did) wrote this build into it, so that the
/// script said "nothing to do" and kept that role's rights; a direct grant on an outbox function
/// vanished without a word; any role holding the install's advisory lock made every run fail
/// after 10 s without saying who.
#[tokio::test(flavor = "multi_thread")]
async fn the_sql_install_sees_through_a_forged_version_record_and_names_what_it_revokes_and_who_holds_its_lock(
) {
    let pg = PgCluster::start_without_extension();
    pg.sql_install_script("postgres", &released("sql-install-0.2.1.sql"))
        .await;
    let admin = pg.superuser().await;
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN IN ROLE outbox_publisher;
             GRANT UPDATE ON outbox.sql_install TO app;
             GRANT INSERT ON outbox.messages TO app;
             GRANT EXECUTE ON FUNCTION outbox.status() TO app;",
        )
        .await
        .unwrap();
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../sql/pg_outbox.sql"))
            .unwrap();
    let (version, build) = script
        .lines()
        .find_map(|line| {
            line.strip_prefix("INSERT INTO outbox.sql_install (version, build) VALUES ('")
        })
        .and_then(|rest| rest.strip_suffix("');"))
        .and_then(|rest| rest.split_once("', '"))
        .expect("the script's version record");
    let app = pg.connect_as("app").await;
    app.batch_execute(&format!(
        "UPDATE outbox.sql_install SET version = '{version}', build = '{build}'"
    ))
    .await
    .unwrap();
    let out = pg.run_sql_install("postgres");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("upgrading the SQL install"), "{stdout}");
    assert!(
        stderr.contains("app: EXECUTE on function outbox.status()")
            && stderr.contains("app: INSERT on table outbox.messages"),
        "what another role held is named: {stderr}"
    );
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM pg_class c, aclexplode(c.relacl) g
              WHERE c.relnamespace = 'outbox'::regnamespace AND g.grantee = 'app'::regrole"
        )
        .await,
        0
    );

    app.batch_execute("SELECT pg_advisory_lock(hashtext('pg_outbox SQL install'), 0)")
        .await
        .unwrap();
    admin
        .batch_execute("UPDATE outbox.sql_install SET build = 'older'")
        .await
        .unwrap();
    let out = pg.run_sql_install("postgres");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("holds the install's lock") && stderr.contains("role app"),
        "{stderr}"
    );
    assert!(stderr.contains("pg_terminate_backend"), "{stderr}");
}
