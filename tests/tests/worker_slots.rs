//! Several slots, each delivering a set of queues (`postgres.queues`, `outbox.queue_claims`): a
//! stopped RabbitMQ behind one set holds back none of the other's messages; queues moved from one
//! slot to two under publishers arrive once each; setup refuses what would deliver a message
//! twice or never.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_tests::kafka::{self, Record};
use outbox_tests::postgres::count;
use outbox_tests::publish::{
    check_delivery, check_no_loss, publish_range, read_json_lines, wait_for_lines, Seen, Storage,
};
use outbox_tests::rabbitmq::seen;
use outbox_tests::worker::{kafka_args, run_once};
use outbox_tests::{eventually, KafkaBroker, PgCluster, RabbitMq, Worker};

fn kafka_seen(records: &[Record]) -> Vec<Seen> {
    records.iter().map(Record::seen).collect()
}

/// `outbox-worker setup` for `slot` with `extra` flags; panics with its stderr if it fails.
fn setup(url: &str, slot: &str, extra: &[&str]) {
    let mut args = vec!["setup", "--postgres-url", url, "--slot", slot];
    args.extend_from_slice(extra);
    let out = run_once(&args, &[]);
    assert!(
        out.status.success(),
        "setup {slot}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `run` for `slot` (claiming `queues`, if any) delivering every queue to exchange `events`.
fn amqp_worker(url: &str, slot: &str, queues: Option<&str>, rabbit: &RabbitMq) -> Worker {
    let amqp = rabbit.url();
    let mut args = vec![
        "run",
        "--postgres-url",
        url,
        "--slot",
        slot,
        "--amqp-url",
        &amqp,
        "--amqp-exchange",
        "events",
    ];
    if let Some(queues) = queues {
        args.extend(["--queues", queues]);
    }
    Worker::start(&args, None)
}

async fn wait_active(db: &tokio_postgres::Client, slot: &'static str) {
    eventually(
        Duration::from_secs(30),
        "the worker to hold its slot",
        || async move {
            db.query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await
            .map(|row| row.is_some())
            .unwrap_or(false)
        },
    )
    .await;
}

/// Two slots: the catch-all delivers `orders` to one RabbitMQ node, slot `billing` delivers
/// `billing*` to another, under two publishers. The first node stops for a while: billing's messages published
/// meanwhile arrive as fast as before; when it is back, every order arrives, in per-key order,
/// and neither node got the other's queue.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_destination_of_one_slot_holds_back_nothing_of_another() {
    let (orders_node, billing_node) = (RabbitMq::start(), RabbitMq::start());
    orders_node.declare("events", "direct", "orders", "orders");
    billing_node.declare("events", "direct", "billing.eu", "billing.eu");
    let pg = PgCluster::start().await;
    let url = pg.url();
    setup(&url, "pg_outbox", &[]);
    setup(&url, "billing", &["--queues", "billing*"]);
    let orders_worker = amqp_worker(&url, "pg_outbox", None, &orders_node);
    let billing_worker = amqp_worker(&url, "billing", Some("billing*"), &billing_node);
    let db = pg.superuser().await;
    wait_active(&db, "pg_outbox").await;
    wait_active(&db, "billing").await;

    // Two publishers at once, one per queue, both storage forms.
    let other = pg.superuser().await;
    let publish = |first: u64, count: u64| {
        let (db, other) = (&db, &other);
        async move {
            tokio::join!(
                publish_range(db, "orders", first, count, 20, Storage::Mixed),
                publish_range(other, "billing.eu", first, count, 20, Storage::Mixed),
            )
        }
    };
    const HALF: u64 = 2_000;
    let started = Instant::now();
    publish(0, HALF).await;
    let mut billing =
        billing_node.drain_queue("billing.eu", HALF as usize, Duration::from_secs(60));
    let before = started.elapsed();

    orders_node.stop_node();
    let stopped = Instant::now();
    publish(HALF, HALF).await;
    // (A drain takes what it reads off the queue: this one reads the second half.)
    billing.extend(billing_node.drain_queue("billing.eu", HALF as usize, Duration::from_secs(60)));
    let during = stopped.elapsed();
    eprintln!("billing's {HALF} messages: {before:?} with both nodes up, {during:?} with the orders node stopped");
    assert!(
        during < before * 3 + Duration::from_secs(5),
        "billing waited for the stopped orders node: {during:?} against {before:?}"
    );
    let tally = check_delivery(&seen(&billing), 2 * HALF);
    eprintln!("billing: {tally:?}");

    tokio::time::sleep(Duration::from_secs(5)).await;
    orders_node.start_node();
    let orders = orders_node.drain_queue("orders", 2 * HALF as usize, Duration::from_secs(180));
    let tally = check_delivery(&seen(&orders), 2 * HALF);
    eprintln!("orders: {tally:?}");
    assert!(orders
        .iter()
        .all(|m| m["headers"]["outbox-queue"] == "orders"));
    assert!(billing
        .iter()
        .all(|m| m["headers"]["outbox-queue"] == "billing.eu"));
    assert!(
        orders_worker.log().contains("streaming") && billing_worker.log().contains("billing*"),
        "{}",
        billing_worker.log()
    );
}

/// Publishes `queue` messages (indexes from `next`, 10 keys, both forms in turn) until `stop`.
fn spawn_publisher(
    url: String,
    queue: &'static str,
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        let mut round = 0u64;
        while !stop.load(Ordering::Acquire) {
            let size = 1 + round % 13;
            let first = next.fetch_add(size, Ordering::AcqRel);
            let storage = if round.is_multiple_of(2) {
                Storage::Table
            } else {
                Storage::Wal
            };
            publish_range(&db, queue, first, size, 10, storage).await;
            round += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// The move from one slot to two, under publishers of both queues: stop the catch-all's worker,
/// set up slot `billing` for the `billing` queue, start both. Exactly-once Kafka sinks count a
/// duplicate as such: every committed message arrives once, in per-key order.
#[tokio::test(flavor = "multi_thread")]
async fn moving_a_queue_to_a_slot_of_its_own_under_traffic_delivers_each_message_once() {
    let kafka = KafkaBroker::start(&[("orders", 3), ("billing", 3)]);
    let pg = PgCluster::start().await;
    let url = pg.url();
    let config = Worker::config_file("");
    let args = kafka_args(&url, &kafka.brokers(), config.path());
    let mut catch_all = Worker::start(&args, None);
    let db = pg.superuser().await;
    pg.wait_for_slot(&db).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (orders, billing) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let publishers = [
        spawn_publisher(url.clone(), "orders", orders.clone(), stop.clone()),
        spawn_publisher(url.clone(), "billing", billing.clone(), stop.clone()),
    ];
    tokio::time::sleep(Duration::from_secs(3)).await;

    // While the catch-all's worker runs, the move is refused: it would deliver billing too.
    let refused = run_once(
        &[
            "setup",
            "--postgres-url",
            &url,
            "--slot",
            "billing",
            "--queues",
            "billing",
        ],
        &[],
    );
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("pg_outbox") && stderr.contains("running"),
        "{stderr}"
    );

    let status = catch_all.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", catch_all.log());
    setup(&url, "billing", &["--queues", "billing"]);
    let catch_all = Worker::start(&args, None);
    let mut billing_args = args.clone();
    billing_args.extend([
        "--slot".into(),
        "billing".into(),
        "--queues".into(),
        "billing".into(),
    ]);
    let billing_worker = Worker::start(&billing_args, None);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Release);
    for publisher in publishers {
        publisher.await.unwrap();
    }

    let (orders, billing) = (
        orders.load(Ordering::Acquire),
        billing.load(Ordering::Acquire),
    );
    let timeout = Duration::from_secs(120);
    let read = kafka::read(&kafka.brokers(), "orders", orders as usize, timeout).await;
    let tally = check_delivery(&kafka_seen(&read), orders);
    eprintln!("orders: {orders} published, {tally:?}");
    assert_eq!(tally.duplicates, 0, "{tally:?}");
    let read = kafka::read(&kafka.brokers(), "billing", billing as usize, timeout).await;
    let tally = check_delivery(&kafka_seen(&read), billing);
    eprintln!("billing: {billing} published, {tally:?}");
    assert_eq!(tally.duplicates, 0, "{tally:?}");
    let log = billing_worker.log();
    assert!(
        log.contains("delivering the queues this slot claims")
            && log.contains("confirmed past the move"),
        "the billing slot waited for the catch-all to deliver what it had of billing:\n{log}"
    );
    drop(catch_all);
}

/// What setup refuses, each naming the fix: a second catch-all, a set with no catch-all to take
/// the other queues, a glob it cannot compare; and a worker whose postgres.queues differ from
/// its slot's claim with setup off.
#[tokio::test(flavor = "multi_thread")]
async fn setup_refuses_sets_that_would_deliver_a_message_twice_or_never() {
    let pg = PgCluster::start().await;
    let url = pg.url();
    let fails = |args: &[&str], expected: &[&str]| {
        let mut all = vec!["setup", "--postgres-url", &url];
        all.extend_from_slice(args);
        let out = run_once(&all, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?} succeeded");
        for part in expected {
            assert!(stderr.contains(part), "{args:?}: {stderr}");
        }
    };
    fails(
        &["--slot", "billing", "--queues", "billing"],
        &["no slot takes the queues outside", "catch-all"],
    );
    fails(
        &["--slot", "billing", "--queues", "billing, audit"],
        &["postgres.queues", "' ' is not allowed"],
    );
    fails(
        &["--slot", "billing", "--queues", "billing.[a-z]"],
        &["postgres.queues", "the characters of queue names"],
    );
    setup(&url, "pg_outbox", &[]);
    // Without sets, a second slot for every queue is a fan-out (as before 0.2.2); a set then has
    // two catch-alls beside it.
    setup(&url, "fanout", &[]);
    fails(
        &["--slot", "billing", "--queues", "billing"],
        &["each take every queue", "fanout", "exactly one catch-all"],
    );
    let db = pg.superuser().await;
    db.batch_execute(
        "SELECT pg_drop_replication_slot('fanout'); DELETE FROM outbox.slots WHERE slot_name = 'fanout'",
    )
    .await
    .unwrap();
    setup(&url, "billing", &["--queues", "billing"]);
    // The same again changes nothing.
    setup(&url, "billing", &["--queues", "billing"]);
    fails(
        &["--slot", "other"],
        &[
            "already takes every queue no other slot claims",
            "pg_outbox",
        ],
    );
    let claims: i64 = db
        .query_one("SELECT count(*) FROM outbox.queue_claims", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(claims, 1, "one claim, not one per setup");
    let status = run_once(&["status", "--postgres-url", &url], &[]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let header: Vec<&str> = status.lines().next().unwrap().split('\t').collect();
    let queues_of = |slot: &str| {
        let row: Vec<&str> = status
            .lines()
            .map(|l| l.split('\t').collect::<Vec<_>>())
            .find(|r| r[0] == slot)
            .unwrap_or_else(|| panic!("no row for {slot}: {status}"));
        row[header.iter().position(|h| *h == "queues").unwrap()].to_owned()
    };
    assert_eq!(queues_of("billing"), "billing", "{status}");
    assert_eq!(queues_of("pg_outbox"), "(catch-all)", "{status}");

    let config = Worker::config_file(
        "[postgres]\nsetup = false\n[sinks.out]\ntype = \"stdout\"\n[[routes]]\nqueues = \"*\"\nsink = \"out\"\n",
    );
    let config = config.path().display().to_string();
    let out = run_once(
        &[
            "run",
            "--postgres-url",
            &url,
            "--slot",
            "billing",
            "--queues",
            "billing,audit",
            "--config",
            &config,
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("claims") && stderr.contains("run outbox-worker setup"),
        "{stderr}"
    );
}

/// `replay` for a slot sends the queues it delivers now: billing's slot its `billing`, the
/// catch-all the rest; together, every message once.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_of_one_slot_sends_its_own_queues() {
    let pg = PgCluster::start().await;
    let url = pg.url();
    setup(&url, "pg_outbox", &[]);
    setup(&url, "billing", &["--queues", "billing"]);
    let db = pg.superuser().await;
    publish_range(&db, "orders", 0, 40, 5, Storage::Table).await;
    publish_range(&db, "billing", 0, 30, 5, Storage::Table).await;
    let replay = |extra: &[&str]| {
        let mut args = vec!["replay", "--postgres-url", &url, "--since", "1h"];
        args.extend_from_slice(extra);
        let out = run_once(&args, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let queues: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["queue"].to_string())
            .collect();
        (queues, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (billing, report) = replay(&["--slot", "billing", "--queues", "billing"]);
    assert_eq!(billing.len(), 30, "{report}");
    assert!(billing.iter().all(|q| q == "\"billing\""), "{billing:?}");
    assert!(report.contains("40 of other queues"), "{report}");
    let (rest, report) = replay(&[]);
    assert_eq!(rest.len(), 40, "{report}");
    assert!(rest.iter().all(|q| q == "\"orders\""), "{rest:?}");
}

/// A stdout worker for `slot` (claiming `queues`, if any), its lines into `out`.
fn stdout_worker(url: &str, slot: &str, queues: Option<&str>, out: &std::path::Path) -> Worker {
    let mut args = vec!["run", "--postgres-url", url, "--slot", slot];
    if let Some(queues) = queues {
        args.extend(["--queues", queues]);
    }
    Worker::start(&args, Some(out))
}

/// Publishes `rounds` transactions, each with a message of queue `x1` and one of `y1` (indexes
/// from `first`), one key per queue.
async fn publish_pairs(db: &tokio_postgres::Client, first: u64, rounds: u64) {
    for i in first..first + rounds {
        db.batch_execute(&format!(
            "BEGIN;
             SELECT outbox.publish('x1', jsonb_build_object('i', {i}, 'key', 'x'), '{{}}', 'x');
             SELECT outbox.publish('y1', jsonb_build_object('i', {i}, 'key', 'y'), '{{}}', 'y');
             COMMIT;"
        ))
        .await
        .unwrap();
    }
}

/// The payloads' `i` of `queue`'s lines in the files.
fn indexes(files: &[&std::path::Path], queue: &str) -> Vec<u64> {
    delivered(files, queue)
        .iter()
        .map(|s| s.payload["i"].as_u64().unwrap())
        .collect()
}

/// A cluster where `outbox-worker setup` made the catch-all and slot `b` with `b_queues`, and
/// the two stdout files their workers write.
struct TwoSlots {
    pg: PgCluster,
    url: String,
    db: tokio_postgres::Client,
    _dir: tempfile::TempDir,
    all_out: std::path::PathBuf,
    b_out: std::path::PathBuf,
}

impl TwoSlots {
    async fn set_up(b_queues: &str) -> TwoSlots {
        let pg = PgCluster::start().await;
        let url = pg.url();
        let db = pg.superuser().await;
        let dir = tempfile::tempdir().unwrap();
        let (all_out, b_out) = (dir.path().join("all.jsonl"), dir.path().join("b.jsonl"));
        setup(&url, "pg_outbox", &[]);
        setup(&url, "b", &["--queues", b_queues]);
        TwoSlots {
            pg,
            url,
            db,
            _dir: dir,
            all_out,
            b_out,
        }
    }
}

/// Every line of the files, by queue.
fn delivered(files: &[&std::path::Path], queue: &str) -> Vec<Seen> {
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .filter(|v| v["queue"] == queue)
        .map(|v| Seen {
            id: v["id"].as_str().unwrap().to_owned(),
            key: v["key"].as_str().map(str::to_owned),
            payload: v["payload"].clone(),
        })
        .collect()
}

/// A slot gives one set back to the catch-all and takes another from it in one setup, while
/// transactions carry messages of both (a hostile review: each worker waited for the other to
/// confirm past the move, inside the same transaction, for ever). Each worker now confirms the
/// move's position before it waits. Then the slot is retired (dropped, its row deleted): its
/// queues go back to the catch-all.
#[tokio::test(flavor = "multi_thread")]
async fn a_swap_of_queues_between_two_slots_and_a_retired_slot_lose_nothing() {
    let TwoSlots {
        pg: _pg,
        url,
        db,
        all_out,
        b_out,
        _dir,
    } = TwoSlots::set_up("x*").await;
    let mut all = stdout_worker(&url, "pg_outbox", None, &all_out);
    let mut b = stdout_worker(&url, "b", Some("x*"), &b_out);
    wait_active(&db, "pg_outbox").await;
    wait_active(&db, "b").await;
    publish_pairs(&db, 0, 20).await;
    wait_for_lines(&all_out, 20).await;
    wait_for_lines(&b_out, 20).await;

    // b, still running, may not change its own claim: it would deliver by the old one.
    let refused = run_once(
        &[
            "setup",
            "--postgres-url",
            &url,
            "--slot",
            "b",
            "--queues",
            "x*,z",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("running"),
        "{stderr}"
    );

    assert!(all.terminate(Duration::from_secs(30)).success());
    assert!(b.terminate(Duration::from_secs(30)).success());
    setup(&url, "b", &["--queues", "y*"]);
    let _all = stdout_worker(&url, "pg_outbox", None, &all_out);
    let mut b = stdout_worker(&url, "b", Some("y*"), &b_out);
    publish_pairs(&db, 20, 30).await;
    eventually(Duration::from_secs(60), "50 of each queue", || {
        let files = [all_out.as_path(), b_out.as_path()];
        let done = delivered(&files, "x1").len() >= 50 && delivered(&files, "y1").len() >= 50;
        async move { done }
    })
    .await;

    // Retired: b's slot dropped with its row; y1 goes back to the catch-all after its restart.
    assert!(b.terminate(Duration::from_secs(30)).success());
    db.batch_execute(
        "SELECT pg_drop_replication_slot('b'); DELETE FROM outbox.slots WHERE slot_name = 'b'",
    )
    .await
    .unwrap();
    drop(_all);
    let _all = stdout_worker(&url, "pg_outbox", None, &all_out);
    publish_pairs(&db, 50, 10).await;
    let files = [all_out.as_path(), b_out.as_path()];
    eventually(Duration::from_secs(60), "60 of each queue", || {
        let done = delivered(&files, "x1").len() >= 60 && delivered(&files, "y1").len() >= 60;
        async move { done }
    })
    .await;
    // (Counted, not ordered: two files have no common order; the Kafka move test checks it.)
    for queue in ["x1", "y1"] {
        let tally = check_no_loss(&delivered(&files, queue), 60);
        assert_eq!(tally.duplicates, 0, "{queue}: {tally:?}");
    }
    let b_lines = delivered(&[b_out.as_path()], "y1");
    assert!(
        b_lines
            .iter()
            .all(|s| (20..50).contains(&s.payload["i"].as_u64().unwrap())),
        "b delivered y1 only while it claimed it"
    );
}

/// Two moves in a row before the first handover happened (a hostile review): the catch-all,
/// not running, still owes `q`'s first messages; `q` moves to b, then on to c. b has none of
/// `q` to deliver and confirms past both moves; c must wait for the catch-all too, not only for
/// b, or its newer messages of the key overtake the older ones.
#[tokio::test(flavor = "multi_thread")]
async fn after_two_moves_in_a_row_the_last_slot_waits_for_every_earlier_one() {
    let pg = PgCluster::start().await;
    let url = pg.url();
    let db = pg.superuser().await;
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(format!("{name}.jsonl"));
    setup(&url, "pg_outbox", &[]);
    let publish_q = |first: u64| {
        let db = &db;
        async move { publish_range(db, "q", first, 50, 1, Storage::Table).await }
    };
    publish_q(0).await;
    setup(&url, "b", &["--queues", "q"]);
    setup(&url, "c", &["--queues", "q"]);
    let mut b = stdout_worker(&url, "b", Some("q"), &out("b"));
    wait_active(&db, "b").await;
    db.batch_execute("SELECT outbox.publish('other', '{}')")
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "b past both moves", || async {
        count(
            &db,
            "SELECT count(*) FROM pg_replication_slots s WHERE slot_name = 'b'
                AND confirmed_flush_lsn >= (SELECT max(from_lsn) FROM outbox.queue_claims)",
        )
        .await
            == 1
    })
    .await;
    assert!(b.terminate(Duration::from_secs(30)).success());
    publish_q(50).await;
    let c = stdout_worker(&url, "c", Some("q"), &out("c"));
    eventually(Duration::from_secs(30), "c waiting", || {
        let log = c.log();
        async move { log.contains("waiting for the slot that delivered them") }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        read_json_lines(&out("c")).is_empty(),
        "c delivered q before the catch-all delivered its older messages"
    );
    let _all = stdout_worker(&url, "pg_outbox", None, &out("all"));
    wait_for_lines(&out("c"), 50).await;
    let first = delivered(&[out("all").as_path()], "q");
    let last = delivered(&[out("c").as_path()], "q");
    assert_eq!(first.len(), 50, "the catch-all's 50 older messages of q");
    let tally = check_delivery(&[first, last].concat(), 100);
    assert_eq!(tally.duplicates, 0, "{tally:?}");
}

/// A slot with a set streams a publication of its own, row-filtered on its queues
/// (`pg_outbox_<slot>`): its walsender sends it none of the catch-all's table-form messages
/// (before, it decoded each and the worker skipped it). A move to the slot while a transaction
/// holds uncommitted messages of the moved queue: setup waits for that transaction, which was
/// decoded with the filter before the move (without the wait, it committed after the claim, so
/// it was the slot's, and the slot's filter had left it out: lost), and so does a setup run
/// again after one stopped while it waited.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_with_a_set_is_sent_only_its_queues_and_a_move_waits_for_open_transactions() {
    let TwoSlots {
        pg,
        url,
        db,
        all_out,
        b_out,
        _dir,
    } = TwoSlots::set_up("x*").await;
    let kept: Option<Vec<String>> = db
        .query_one("SELECT outbox.slot_publication_queues('b')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, Some(vec!["x*".to_owned()]));
    let sets: Vec<(String, Option<Vec<String>>, String)> = db
        .query(
            "SELECT slot_name::text, queues, publication::text FROM outbox.slot_queues()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        sets,
        [
            (
                "b".to_owned(),
                Some(vec!["x*".to_owned()]),
                "pg_outbox_b".to_owned()
            ),
            ("pg_outbox".to_owned(), None, "pg_outbox".to_owned())
        ]
    );
    let listen = format!("127.0.0.1:{}", outbox_tests::postgres::free_port());
    let b_args = |queues: &'static str| {
        let args: Vec<String> = [
            "run",
            "--postgres-url",
            &url,
            "--slot",
            "b",
            "--queues",
            queues,
            "--http-listen",
            &listen,
        ]
        .map(str::to_owned)
        .to_vec();
        args
    };
    let mut all = stdout_worker(&url, "pg_outbox", None, &all_out);
    let mut b = Worker::start(&b_args("x*"), Some(&b_out));
    wait_active(&db, "pg_outbox").await;
    wait_active(&db, "b").await;
    publish_range(&db, "y1", 0, 2000, 5, Storage::Table).await;
    publish_range(&db, "x1", 0, 500, 5, Storage::Table).await;
    let files = [all_out.as_path(), b_out.as_path()];
    eventually(Duration::from_secs(60), "2,000 of y1 and 500 of x1", || {
        let done = delivered(&files, "y1").len() >= 2000 && delivered(&files, "x1").len() >= 500;
        async move { done }
    })
    .await;
    let (_, metrics) = outbox_tests::worker::http_get(&listen, "/metrics").unwrap();
    let skipped = outbox_tests::worker::metric(
        &metrics,
        "outbox_messages_skipped_total{reason=\"other_slot\"}",
    );
    assert_eq!(
        skipped.unwrap_or(0.0),
        0.0,
        "b was sent the catch-all's messages"
    );
    assert_eq!(delivered(&[b_out.as_path()], "x1").len(), 500);
    assert!(delivered(&[b_out.as_path()], "y1").is_empty());

    // y* moves to b while a transaction holds 100 uncommitted messages of y1.
    assert!(all.terminate(Duration::from_secs(30)).success());
    assert!(b.terminate(Duration::from_secs(30)).success());
    let open = pg.superuser().await;
    open.batch_execute(
        "BEGIN; SET LOCAL pg_outbox.storage = 'table';
         SELECT count(outbox.publish('y1', jsonb_build_object('i', i, 'key', 'k-' || i % 5), '{}', 'k-' || i % 5))
           FROM generate_series(2000, 2099) AS i;",
    )
    .await
    .unwrap();
    // Stopped while it waits (SIGTERM, as a deploy would): the publication stays widened, and
    // the next setup finds it so; it must wait all the same (a hostile review: it did not, and
    // the transaction's messages were lost).
    let moving = [
        "setup",
        "--postgres-url",
        &url,
        "--slot",
        "b",
        "--queues",
        "x*,y*",
    ];
    let mut first = Worker::start(&moving, None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        first.exited().is_none(),
        "setup recorded the move while a transaction with messages of y1 was open"
    );
    first.terminate(Duration::from_secs(10));
    let mut second = Worker::start(&moving, None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        second.exited().is_none(),
        "the setup after a stopped one recorded the move while the transaction was open: {}",
        second.log()
    );
    open.batch_execute("COMMIT").await.unwrap();
    let moved = second.wait_exit(Duration::from_secs(30));
    assert!(moved.success(), "{}", second.log());
    let _all = stdout_worker(&url, "pg_outbox", None, &all_out);
    let _b = Worker::start(&b_args("x*,y*"), Some(&b_out));
    publish_range(&db, "y1", 2100, 100, 5, Storage::Table).await;
    eventually(Duration::from_secs(60), "2,200 of y1", || {
        let done = delivered(&files, "y1").len() >= 2200;
        async move { done }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = check_no_loss(&delivered(&files, "y1"), 2200);
    assert_eq!(tally.duplicates, 0, "{tally:?}");
    let b_y1: Vec<u64> = indexes(&[b_out.as_path()], "y1");
    assert!(
        b_y1.len() == 100 && b_y1.iter().all(|i| (2100..2200).contains(i)),
        "b delivered the y1 messages committed after the move: {b_y1:?}"
    );
}

/// `setup`'s wait after widening a slot's filter covers a transaction that took its id after the
/// filter's own and inserted before the filter committed (a hostile review: a snapshot does not
/// list transactions above the newest one that ended, so setup went ahead and the message was
/// lost). A slow DDL audit trigger holds that window open.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_that_began_while_the_filter_changed_is_waited_for() {
    let TwoSlots {
        pg,
        url,
        db,
        all_out,
        b_out,
        _dir,
    } = TwoSlots::set_up("y*").await;
    db.batch_execute(
        "CREATE FUNCTION public.slow_ddl_audit() RETURNS event_trigger LANGUAGE plpgsql AS $$
         BEGIN IF tg_tag = 'ALTER PUBLICATION' THEN PERFORM pg_sleep(3); END IF; END $$;
         CREATE EVENT TRIGGER slow_ddl_audit ON ddl_command_end
             EXECUTE FUNCTION public.slow_ddl_audit();",
    )
    .await
    .unwrap();
    let mut moving = Worker::start(
        &[
            "setup",
            "--postgres-url",
            &url,
            "--slot",
            "b",
            "--queues",
            "x*,y*",
        ],
        None,
    );
    // Once setup's ALTER PUBLICATION (its transaction id taken) sits in the audit trigger.
    let db_ref = &db;
    eventually(
        Duration::from_secs(30),
        "setup in the audit trigger",
        || async move {
            count(
                db_ref,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
            )
            .await
                == 1
        },
    )
    .await;
    let open = pg.superuser().await;
    open.batch_execute(
        "BEGIN; SET LOCAL pg_outbox.storage = 'table';
         SELECT outbox.publish('x1', '{\"i\": 999}', '{}', 'k');",
    )
    .await
    .unwrap();
    // The filter committed (no session in the trigger any more), then time to go ahead.
    eventually(
        Duration::from_secs(30),
        "the filter changed",
        || async move {
            count(
                db_ref,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
            )
            .await
                == 0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        moving.exited().is_none(),
        "setup recorded the move while a transaction with a message of x1 was open: {}",
        moving.log()
    );
    open.batch_execute("COMMIT").await.unwrap();
    assert!(moving.wait_exit(Duration::from_secs(30)).success());
    let _all = stdout_worker(&url, "pg_outbox", None, &all_out);
    let _b = stdout_worker(&url, "b", Some("x*,y*"), &b_out);
    publish_range(&db, "x1", 0, 10, 2, Storage::Table).await;
    let files = [all_out.as_path(), b_out.as_path()];
    eventually(Duration::from_secs(60), "11 of x1", || {
        let done = delivered(&files, "x1").len() >= 11;
        async move { done }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let i: Vec<u64> = indexes(&files, "x1");
    assert_eq!(i.iter().filter(|i| **i == 999).count(), 1, "{i:?}");
    assert_eq!(i.len(), 11, "{i:?}");
}

/// Two ways an older state came back (a hostile review). A slot retired and set up again later:
/// its old claims took back the queue from their old position, so the catch-all skipped what
/// was committed while the slot was gone, and the new slot started after it: lost. Now a slot
/// claims only what it claimed since it was made. And a slot's publication narrowed by hand
/// while its worker ran (which stops it): setup repaired it but the slot kept streaming it from
/// before the repair, without the messages the narrowed filter left out meanwhile. Now the repair
/// counts as a new publication: the slot streams the shared one until it is past the repair.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_set_up_again_and_a_publication_narrowed_by_hand_lose_nothing() {
    let pg = PgCluster::start().await;
    let url = pg.url();
    let db = pg.superuser().await;
    let dir = tempfile::tempdir().unwrap();
    let (all_out, b_out) = (dir.path().join("all.jsonl"), dir.path().join("b.jsonl"));
    let files = [all_out.as_path(), b_out.as_path()];
    let arrived = |count: usize| {
        move || {
            let done = delivered(&files, "x1").len() >= count;
            async move { done }
        }
    };
    setup(&url, "pg_outbox", &[]);
    setup(&url, "b", &["--queues", "x*"]);
    let mut all = stdout_worker(&url, "pg_outbox", None, &all_out);
    let mut b = stdout_worker(&url, "b", Some("x*"), &b_out);
    publish_range(&db, "x1", 0, 10, 2, Storage::Table).await;
    eventually(Duration::from_secs(60), "10 of x1", arrived(10)).await;

    // Retired, then 10 more committed while the catch-all is stopped, then b set up again.
    assert!(b.terminate(Duration::from_secs(30)).success());
    assert!(all.terminate(Duration::from_secs(30)).success());
    db.batch_execute(
        "SELECT pg_drop_replication_slot('b'); DELETE FROM outbox.slots WHERE slot_name = 'b'",
    )
    .await
    .unwrap();
    publish_range(&db, "x1", 10, 10, 2, Storage::Table).await;
    setup(&url, "b", &["--queues", "x*"]);
    let mut all = stdout_worker(&url, "pg_outbox", None, &all_out);
    let mut b = stdout_worker(&url, "b", Some("x*"), &b_out);
    publish_range(&db, "x1", 20, 10, 2, Storage::Table).await;
    eventually(Duration::from_secs(60), "30 of x1", arrived(30)).await;
    let by_all: Vec<u64> = indexes(&[all_out.as_path()], "x1");
    assert_eq!(
        by_all,
        (10..20).collect::<Vec<_>>(),
        "the catch-all's share"
    );

    // Narrowed by hand under b: b stops (what is committed before it stops needs a replay, as
    // its error says); 20 messages are committed while it is stopped and the filter narrowed.
    db.batch_execute(
        "ALTER PUBLICATION pg_outbox_b SET TABLE outbox.messages WHERE (queue ~ '^(nothing)$')",
    )
    .await
    .unwrap();
    let stopped = b.wait_exit(Duration::from_secs(30));
    assert!(!stopped.success(), "{}", b.log());
    assert!(b.log().contains("pg_outbox_b"), "{}", b.log());
    publish_range(&db, "x1", 30, 20, 2, Storage::Table).await;
    assert!(all.terminate(Duration::from_secs(30)).success());
    setup(&url, "b", &["--queues", "x*"]);
    let _all = stdout_worker(&url, "pg_outbox", None, &all_out);
    let _b = stdout_worker(&url, "b", Some("x*"), &b_out);
    publish_range(&db, "x1", 50, 10, 2, Storage::Table).await;
    eventually(Duration::from_secs(60), "60 of x1", arrived(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = check_no_loss(&delivered(&files, "x1"), 60);
    assert_eq!(tally.duplicates, 0, "{tally:?}");
}

/// `setup --new-slot` for a slot with a set, beside a running catch-all: the set stays the
/// slot's (its row keeps its date, so its claims are not taken for a retired slot's, which made
/// this setup refuse after it had dropped and made the slot again).
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_with_a_set_made_again_with_new_slot_keeps_its_set() {
    let TwoSlots {
        pg: _pg,
        url,
        db,
        all_out,
        b_out,
        _dir,
    } = TwoSlots::set_up("x*").await;
    let _all = stdout_worker(&url, "pg_outbox", None, &all_out);
    wait_active(&db, "pg_outbox").await;
    setup(&url, "b", &["--queues", "x*", "--new-slot"]);
    let queues: Option<Vec<String>> = db
        .query_one(
            "SELECT queues FROM outbox.slot_queues() WHERE slot_name = 'b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(queues, Some(vec!["x*".to_owned()]));
    let _b = stdout_worker(&url, "b", Some("x*"), &b_out);
    publish_range(&db, "x1", 0, 20, 2, Storage::Table).await;
    publish_range(&db, "y1", 0, 20, 2, Storage::Table).await;
    wait_for_lines(&b_out, 20).await;
    wait_for_lines(&all_out, 20).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(delivered(&[b_out.as_path()], "x1").len(), 20);
    assert!(delivered(&[all_out.as_path()], "x1").is_empty());
}

/// A second worker for the same slot (one standing by, README "Standby") starts after the slot
/// gave queues back and confirmed past that: its setup narrows the slot's publication to what
/// the slot still delivers. The running worker must not take that for a loss (a hostile review:
/// it compared with what it needed when it started, and stopped).
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_standing_by_that_narrows_the_filter_does_not_stop_the_running_one() {
    let TwoSlots {
        pg: _pg,
        url,
        db,
        all_out,
        b_out,
        _dir,
    } = TwoSlots::set_up("x*,y*").await;
    setup(&url, "b", &["--queues", "x*"]);
    let _all = stdout_worker(&url, "pg_outbox", None, &all_out);
    let mut b = stdout_worker(&url, "b", Some("x*"), &b_out);
    wait_active(&db, "b").await;
    publish_range(&db, "x1", 0, 20, 2, Storage::Table).await;
    publish_range(&db, "y1", 0, 20, 2, Storage::Table).await;
    wait_for_lines(&b_out, 20).await;
    wait_for_lines(&all_out, 20).await;
    // b confirmed past the claim that gave y* back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let standing_by = stdout_worker(&url, "b", Some("x*"), &b_out);
    eventually(
        Duration::from_secs(30),
        "the filter narrowed to x*",
        || async {
            let kept: Option<Vec<String>> = db
                .query_one("SELECT outbox.slot_publication_queues('b')", &[])
                .await
                .unwrap()
                .get(0);
            kept == Some(vec!["x*".to_owned()])
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(b.exited().is_none(), "{}", b.log());
    publish_range(&db, "x1", 20, 20, 2, Storage::Table).await;
    wait_for_lines(&b_out, 40).await;
    drop(standing_by);
    assert_eq!(
        indexes(&[b_out.as_path()], "x1"),
        (0..40).collect::<Vec<_>>()
    );
}
