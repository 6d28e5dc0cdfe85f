//! Decoding on a standby (issue #32, PostgreSQL 16+): the worker streams its slot from a
//! physical standby while publishers commit on the primary, and writes what it writes
//! (`outbox.slots`, dead letters, the publication) on the primary (`postgres.primary_url`).
//! Then the primary dies under the publishers and the standby is promoted: the slot lives on,
//! the worker carries on against the promoted server, and every acknowledged commit arrives,
//! each key's first arrivals in order. On 16 and 18. Setup's refusals: a standby of 15, no
//! `primary_url`, one naming another standby, another cluster or a promoted copy of the primary,
//! `hot_standby_feedback` off.

use std::collections::HashSet;
use std::time::Duration;

use outbox_tests::failover::{every_acknowledged_commit, publish_ten};
use outbox_tests::postgres::{count, Installation};
use outbox_tests::publish::{read_json_lines, stdout_file};
use outbox_tests::worker::config_args;
use outbox_tests::{eventually, PgCluster, Worker};
use tokio_postgres::Client;

/// A primary on `major` with the extension, its commits acknowledged once on the standby (so a
/// promoted standby has every acknowledged commit), and that standby.
async fn primary_and_standby(major: u32) -> (PgCluster, PgCluster, Client) {
    let (primary, standby, db) = asynchronous_primary_and_standby(major).await;
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    (primary, standby, db)
}

async fn asynchronous_primary_and_standby(major: u32) -> (PgCluster, PgCluster, Client) {
    let primary = PgCluster::start_on(Installation::major(major), |_| {});
    let db = primary.superuser().await;
    db.batch_execute("CREATE EXTENSION pg_outbox")
        .await
        .unwrap();
    let standby = primary.start_standby();
    (primary, standby, db)
}

/// `orders` to stdout; any other queue has no route, and its messages become dead letters.
fn routes_with_primary(primary: &PgCluster) -> tempfile::NamedTempFile {
    Worker::config_file(&format!(
        "[postgres]\nprimary_url = \"{}\"\n[sinks.out]\ntype = \"stdout\"\n\
         [[routes]]\nqueues = \"orders\"\nsink = \"out\"\n",
        primary.url()
    ))
}

async fn wait_for_count(db: &Client, sql: &str, wanted: i64, what: &str) {
    eventually(Duration::from_secs(60), what, || async move {
        count(db, sql).await == wanted
    })
    .await;
}

/// With asynchronous replication, a dead letter written on the primary may not have reached the
/// standby when the primary dies. The slot must not have moved past its message: after the
/// promotion the worker writes it again, on the promoted server. (The standby's replay is paused
/// while the message arrives and the primary's walsender stopped before the dead letter is
/// written, so that the standby decodes the message and never receives its dead letter.)
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_the_standby_never_received_is_written_again_after_its_promotion() {
    dead_letter_in_flight_at_the_promotion(true).await;
}

/// The same with the old primary still up after the promotion (a split brain): the worker
/// writes to the promoted server, not to the old primary that still answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_split_brain_gets_no_dead_letter_on_the_old_primary_only() {
    dead_letter_in_flight_at_the_promotion(false).await;
}

async fn dead_letter_in_flight_at_the_promotion(kill_the_primary: bool) {
    let (primary, standby, db) = asynchronous_primary_and_standby(16).await;
    let (_dir, out) = stdout_file();
    let config = routes_with_primary(&primary);
    let mut worker = Worker::start(&config_args(&standby.url(), config.path()), Some(&out));
    let recorded = "SELECT count(*) FROM outbox.slots WHERE slot_name = 'pg_outbox'";
    wait_for_count(&db, recorded, 1, "the slot recorded").await;

    let on_standby = standby.superuser().await;
    on_standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    db.execute("SELECT outbox.publish('audit', '{\"n\": 1}')", &[])
        .await
        .unwrap();
    let published: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let received = format!(
        "SELECT count(*) FROM (SELECT pg_last_wal_receive_lsn() >= '{published}'::pg_lsn AS done) r \
         WHERE done"
    );
    wait_for_count(&on_standby, &received, 1, "the message received").await;
    let walsender: i32 = db
        .query_one(
            "SELECT pid FROM pg_stat_replication WHERE application_name = 'standby'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    outbox_tests::kafka_broker::signal(walsender as u32, "STOP");
    on_standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    let dead = "SELECT count(*) FROM outbox.dead_letters WHERE queue = 'audit'";
    wait_for_count(&db, dead, 1, "the dead letter on the primary").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&on_standby, dead).await,
        0,
        "it never reached the standby"
    );

    if kill_the_primary {
        primary.kill();
    }
    standby.promote();
    // Only now: a walsender gone before the promotion would let the standby reconnect and
    // receive the dead letter.
    outbox_tests::kafka_broker::signal(walsender as u32, "KILL");
    let promoted = standby.superuser().await;
    wait_for_count(&promoted, dead, 1, "the dead letter on the promoted server").await;
    promoted
        .execute(
            "SELECT outbox.publish('orders', '{\"i\": 1}', '{}', 'k')",
            &[],
        )
        .await
        .unwrap();
    outbox_tests::publish::wait_for_lines(&out, 1).await;
    assert!(worker.exited().is_none(), "{}", worker.log());
}

async fn decodes_on_the_standby_and_carries_on_after_its_promotion(major: u32) {
    let (primary, standby, db) = primary_and_standby(major).await;
    let (_dir, out) = stdout_file();
    let config = routes_with_primary(&primary);
    let mut worker = Worker::start(&config_args(&standby.url(), config.path()), Some(&out));
    // The worker records its slot on the primary once the slot is made (on the standby).
    let db_ref = &db;
    eventually(
        Duration::from_secs(60),
        "the slot recorded in outbox.slots",
        || async move {
            count(
                db_ref,
                "SELECT count(*) FROM outbox.slots WHERE slot_name = 'pg_outbox'",
            )
            .await
                == 1
        },
    )
    .await;
    let on_standby = standby.superuser().await;
    assert_eq!(
        count(
            &on_standby,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pg_outbox'"
        )
        .await,
        1
    );
    // The primary decodes nothing.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical'"
        )
        .await,
        0
    );

    // A dead letter, written on the primary.
    db.execute("SELECT outbox.publish('audit', '{}')", &[])
        .await
        .unwrap();
    let db_ref = &db;
    eventually(
        Duration::from_secs(60),
        "the dead letter on the primary",
        || async move {
            count(
                db_ref,
                "SELECT count(*) FROM outbox.dead_letters WHERE queue = 'audit'",
            )
            .await
                == 1
        },
    )
    .await;

    // The operator's redrive with the worker's configuration writes on the primary too (the
    // message comes back, and has no route again).
    let url = standby.url();
    let redriven = outbox_tests::worker::run_once(
        &[
            "dlq",
            "redrive",
            "--queue",
            "audit",
            "--postgres-url",
            &url,
            "--config",
            config.path().to_str().unwrap(),
        ],
        &[],
    );
    let stdout = String::from_utf8_lossy(&redriven.stdout);
    assert!(
        redriven.status.success() && stdout.contains("redriven: 1 message(s)"),
        "{redriven:?}"
    );
    wait_for_count(
        &db,
        "SELECT count(*) FROM outbox.dead_letters WHERE queue = 'audit'",
        1,
        "the redriven message dead-lettered again",
    )
    .await;

    // Publishers on the primary while the standby decodes; then the primary dies under them.
    let publisher = {
        let db = primary.superuser().await;
        tokio::spawn(async move {
            let mut i = 0;
            while publish_ten(&db, i, true).await {
                i += 10;
            }
            i // the first index whose commit was not acknowledged
        })
    };
    let out_ref = &out;
    eventually(
        Duration::from_secs(60),
        "deliveries from the standby's slot",
        || async move { read_json_lines(out_ref).len() >= 500 },
    )
    .await;
    primary.kill();
    let committed_before = publisher.await.unwrap();
    standby.promote();

    // The promoted standby takes the rest; the in-doubt transaction's indexes are skipped.
    let new_primary = standby.superuser().await;
    let resume = committed_before + 10;
    for first in (resume..resume + 200).step_by(10) {
        assert!(publish_ten(&new_primary, first, true).await);
    }
    let expected: HashSet<u64> = (0..committed_before).chain(resume..resume + 200).collect();
    let in_doubt: HashSet<u64> = (committed_before..resume).collect();
    let (lines, duplicates) = every_acknowledged_commit(&out, &expected, &in_doubt).await;
    eprintln!(
        "PostgreSQL {major}: {committed_before} messages committed before the primary died, 200 \
         after the promotion; {lines} lines, {duplicates} repeats"
    );
    assert!(worker.exited().is_none(), "{}", worker.log());
    // The worker now writes to the promoted server: its record of the slot moves there.
    let recorded_ref = &new_primary;
    eventually(
        Duration::from_secs(60),
        "outbox.slots written on the promoted server",
        || async move {
            count(
                recorded_ref,
                "SELECT count(*) FROM outbox.slots
                  WHERE slot_name = 'pg_outbox' AND mark_at > now() - interval '20 seconds'",
            )
            .await
                == 1
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_16_a_standby_decodes_and_its_promotion_loses_nothing() {
    decodes_on_the_standby_and_carries_on_after_its_promotion(16).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_18_a_standby_decodes_and_its_promotion_loses_nothing() {
    decodes_on_the_standby_and_carries_on_after_its_promotion(18).await;
}

/// Sets `hot_standby_feedback` on `standby` and waits until a new session sees it.
async fn feedback(standby: &PgCluster, value: &str) {
    let db = standby.superuser().await;
    db.batch_execute(&format!("ALTER SYSTEM SET hot_standby_feedback = {value}"))
        .await
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    eventually(Duration::from_secs(10), "the setting reloaded", || async {
        let db = standby.superuser().await;
        let shown: String = db
            .query_one("SHOW hot_standby_feedback", &[])
            .await
            .unwrap()
            .get(0);
        shown == value
    })
    .await;
}

/// `setup` against a standby explains what decoding there needs, naming the setting.
#[tokio::test(flavor = "multi_thread")]
async fn setup_on_a_standby_names_what_is_missing() {
    let setup = |standby: &PgCluster, extra: &str| {
        let config = Worker::config_file(&format!("[postgres]\n{extra}"));
        outbox_tests::worker::run_once(
            &[
                "setup",
                "--postgres-url",
                &standby.url(),
                "--config",
                config.path().to_str().unwrap(),
            ],
            &[],
        )
    };
    let expect = |out: std::process::Output, wanted: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(wanted), "no {wanted:?} in:\n{stderr}");
    };

    // Asynchronous: a promoted copy of a synchronous primary would wait for a standby forever.
    let (primary, standby, db) = asynchronous_primary_and_standby(16).await;
    let primary_url = format!("primary_url = \"{}\"\n", primary.url());
    expect(setup(&standby, ""), "set postgres.primary_url");
    expect(
        setup(&standby, &format!("primary_url = \"{}\"\n", standby.url())),
        "a standby too",
    );
    feedback(&standby, "off").await;
    expect(setup(&standby, &primary_url), "hot_standby_feedback is off");
    feedback(&standby, "on").await;
    let elsewhere = PgCluster::start().await;
    expect(
        setup(
            &standby,
            &format!("primary_url = \"{}\"\n", elsewhere.url()),
        ),
        "is not where the standby postgres.url names replicates from",
    );
    // A promoted copy of the primary: the same system identifier and database, but what is
    // written there never reaches the standby: refused when the slot is to be made (its
    // snapshot never comes) and when it exists (the slot's record never comes).
    let copy = primary.start_standby_on_slot("copy");
    copy.promote();
    let copy_url = format!("primary_url = \"{}\"\n", copy.url());
    let wanted = "must name the server the standby replicates from";
    expect(setup(&standby, &copy_url), wanted);
    let out = setup(&standby, &primary_url);
    assert!(out.status.success(), "{out:?}");
    expect(setup(&standby, &copy_url), wanted);
    // primary_url's role only writes: it needs outbox_relay, not REPLICATION (0.2.2 asked for
    // both).
    primary
        .superuser()
        .await
        .batch_execute("CREATE ROLE writer LOGIN; GRANT outbox_relay TO writer")
        .await
        .unwrap();
    let config = Worker::config_file(&format!(
        "[postgres]\nsetup = false\nprimary_url = \"{}\"\n[sinks.out]\ntype = \"stdout\"\n",
        primary.url_of("writer", "postgres")
    ));
    let worker = Worker::start(&config_args(&standby.url(), config.path()), None);
    eventually(Duration::from_secs(30), "the worker streaming", || {
        let log = worker.log();
        async move { log.contains("streaming from the slot") }
    })
    .await;
    drop(worker);
    let on_standby = standby.superuser().await;
    assert_eq!(
        count(
            &on_standby,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pg_outbox'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox.slots").await,
        1,
        "recorded on the primary"
    );

    let old_standby = elsewhere.start_standby();
    let old_primary_url = format!("primary_url = \"{}\"\n", elsewhere.url());
    expect(setup(&old_standby, &old_primary_url), "needs 16 or later");
}

/// Publishes `count` messages of `queue` (payload `i` from `first`, keys `k0`..`k4`), one
/// transaction each, table form.
async fn publish_queue(db: &Client, queue: &str, first: u64, count: u64) {
    for i in first..first + count {
        db.batch_execute(&format!(
            "BEGIN; SET LOCAL pg_outbox.storage = 'table';
             SELECT outbox.publish('{queue}', jsonb_build_object('i', {i}), '{{}}', 'k' || {i} % 5);
             COMMIT;"
        ))
        .await
        .unwrap();
    }
}

/// The payloads `i` of `queue`'s lines in `out`, sorted, after checking each key's are in
/// order (keys `k0`..`k4` by `i % 5`; the keys among themselves have no order).
fn delivered(out: &std::path::Path, queue: &str) -> Vec<u64> {
    let mut i: Vec<u64> = std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["queue"] == queue)
        .map(|v| v["payload"]["i"].as_u64().unwrap())
        .collect();
    for key in 0..5 {
        let of_key: Vec<u64> = i.iter().copied().filter(|i| i % 5 == key).collect();
        assert!(of_key.is_sorted(), "{queue}, key k{key}: {of_key:?}");
    }
    i.sort_unstable();
    i
}

/// Queues move between a slot decoded on the standby and one on the primary, both ways. The
/// slot taking them must wait for the other to confirm past the move, though it cannot see it
/// on its own server (a hostile review: it took the other slot for gone and went ahead, so a
/// key's newer messages overtook its older ones): from the standby it reads the primary's slot;
/// from the primary, the standby's slot's record in `outbox.slots`, whose mark moves on only once
/// confirmed past.
#[tokio::test(flavor = "multi_thread")]
async fn on_16_queues_moved_between_a_standby_slot_and_a_primary_slot_wait_for_each_other() {
    let (primary, standby, db) = asynchronous_primary_and_standby(16).await;
    let dir = tempfile::tempdir().unwrap();
    let (all_out, b_out) = (dir.path().join("all.jsonl"), dir.path().join("b.jsonl"));
    let config = Worker::config_file(&format!(
        "[postgres]\nprimary_url = \"{}\"\n",
        primary.url()
    ));
    let config = config.path().to_str().unwrap().to_owned();
    let (primary_url, standby_url) = (primary.url(), standby.url());
    let b = |queues: &str| -> Vec<String> {
        [
            "--postgres-url",
            &standby_url,
            "--config",
            &config,
            "--slot",
            "b",
            "--queues",
            queues,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let setup = |args: Vec<String>| {
        let mut all = vec!["setup".to_owned()];
        all.extend(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = outbox_tests::worker::run_once(&all, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let run = |args: Vec<String>, out: &std::path::Path| {
        let mut all = vec!["run".to_owned()];
        all.extend(args);
        Worker::start(&all, Some(out))
    };
    let catch_all = || -> Vec<String> {
        ["--postgres-url", &primary_url, "--slot", "pg_outbox"]
            .map(str::to_owned)
            .to_vec()
    };
    setup(catch_all());
    setup(b("y*"));
    let on_standby = standby.superuser().await;
    assert_eq!(
        count(
            &on_standby,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'b'"
        )
        .await,
        1,
        "slot b is decoded on the standby"
    );

    // While b's worker streams on the standby, setup may not change b's set: the primary does
    // not see that worker (a hostile review: the claim was taken, and the worker skipped what it
    // now owned).
    let mut b_worker = run(b("y*"), &b_out);
    eventually(
        Duration::from_secs(60),
        "b streaming on the standby",
        || {
            let on_standby = &on_standby;
            async move {
                count(
                    on_standby,
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'b' AND active",
                )
                .await
                    == 1
            }
        },
    )
    .await;
    let mut args = vec!["setup".to_owned()];
    args.extend(b("x*,y*"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused = outbox_tests::worker::run_once(&args, &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("running"),
        "{stderr}"
    );
    assert!(b_worker.terminate(Duration::from_secs(30)).success());

    // x1 moves from the catch-all (primary) to b (standby) with 200 undelivered.
    publish_queue(&db, "x1", 0, 200).await;
    setup(b("x*,y*"));
    let mut b_worker = run(b("x*,y*"), &b_out);
    publish_queue(&db, "x1", 200, 100).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        delivered(&b_out, "x1").is_empty(),
        "b delivered x1 before the catch-all confirmed past the move"
    );
    let mut all_worker = run(catch_all(), &all_out);
    eventually(Duration::from_secs(60), "300 of x1", || {
        let n = delivered(&all_out, "x1").len() + delivered(&b_out, "x1").len();
        async move { n >= 300 }
    })
    .await;
    assert_eq!(delivered(&all_out, "x1"), (0..200).collect::<Vec<_>>());
    assert_eq!(delivered(&b_out, "x1"), (200..300).collect::<Vec<_>>());

    // y1 moves back from b (standby) to the catch-all (primary) with 200 undelivered.
    assert!(b_worker.terminate(Duration::from_secs(30)).success());
    assert!(all_worker.terminate(Duration::from_secs(30)).success());
    publish_queue(&db, "y1", 0, 200).await;
    setup(b("x*"));
    let _all_worker = run(catch_all(), &all_out);
    publish_queue(&db, "y1", 200, 100).await;
    // Each setup of a standby slot moves its mark in outbox.slots, confirming nothing (a hostile
    // review: the waiting catch-all took that for b's confirmation and went ahead).
    tokio::time::sleep(Duration::from_secs(2)).await;
    setup(b("x*"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    setup(b("x*"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        delivered(&all_out, "y1").is_empty(),
        "the catch-all delivered y1 before b confirmed past the move"
    );
    let _b_worker = run(b("x*"), &b_out);
    eventually(Duration::from_secs(120), "300 of y1", || {
        let n = delivered(&all_out, "y1").len() + delivered(&b_out, "y1").len();
        async move { n >= 300 }
    })
    .await;
    assert_eq!(delivered(&b_out, "y1"), (0..200).collect::<Vec<_>>());
    assert_eq!(delivered(&all_out, "y1"), (200..300).collect::<Vec<_>>());

    // A slot on the primary taking x* from b: setup, on the primary, cannot see whether b's
    // worker runs on the standby, so it refuses unless told b's worker is stopped.
    drop((_all_worker, _b_worker));
    let c = |extra: &[&str]| {
        let mut args = vec![
            "setup",
            "--postgres-url",
            &primary_url,
            "--slot",
            "c",
            "--queues",
            "x*",
        ];
        args.extend_from_slice(extra);
        outbox_tests::worker::run_once(&args, &[])
    };
    let refused = c(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("--stopped-elsewhere b"),
        "{stderr}"
    );
    let told = c(&["--stopped-elsewhere", "b"]);
    assert!(
        told.status.success(),
        "{}",
        String::from_utf8_lossy(&told.stderr)
    );
}
