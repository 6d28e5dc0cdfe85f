//! One worker against two on disjoint queue sets (issue #32): the same committed backlog, half
//! `orders` and half `billing` in alternating transactions, drained to RabbitMQ (per-key order:
//! one message per key in flight, the sink a single worker is bounded by) by one slot delivering
//! both, then by the catch-all and a slot claiming `billing`, both workers at once. The rate is
//! the backlog over the time until every slot confirmed its end (start-up included: the workers
//! start together). Median of [`ROUNDS`], each on a cluster of its own.

use std::time::{Duration, Instant};

use outbox_tests::publish::{publish_range, Storage};
use outbox_tests::worker::run_once;
use outbox_tests::{PgCluster, RabbitMq, Worker};

use super::{is_confirmed, KEYS};

const ROUNDS: usize = 3;

pub async fn split_table(rabbit: &RabbitMq, backlog: u64) -> String {
    rabbit.declare("bench", "direct", "billing", "billing");
    let sink = format!(
        "[sinks.a]\ntype = \"amqp\"\nurl = \"{}\"\nexchange = \"bench\"\n",
        rabbit.url()
    );
    let (mut one, mut two, mut unfiltered) = (Vec::new(), Vec::new(), Vec::new());
    let both = [("pg_outbox", None), ("billing", Some("billing"))];
    for _ in 0..ROUNDS {
        one.push(rate(rabbit, &sink, backlog, &[("pg_outbox", None)], true).await);
        two.push(rate(rabbit, &sink, backlog, &both, true).await);
        unfiltered.push(rate(rabbit, &sink, backlog, &both, false).await);
    }
    // The median of each column on its own: the rate and each walsender's CPU.
    let median = |runs: &mut Vec<(f64, Vec<f64>)>| {
        let mid = |mut values: Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let rate = mid(runs.iter().map(|r| r.0).collect());
        let cpu = (0..runs[0].1.len())
            .map(|slot| mid(runs.iter().map(|r| r.1[slot]).collect()))
            .collect::<Vec<f64>>();
        (rate, cpu)
    };
    let ((one, one_cpu), (two, two_cpu)) = (median(&mut one), median(&mut two));
    let (all, all_cpu) = median(&mut unfiltered);
    format!(
        "Drain a committed backlog of {backlog} messages (table storage, transactions of 1–50 \
         alternating between queues `orders` and `billing`, {KEYS} keys each) to RabbitMQ with \
         per-key order, until every slot confirmed the backlog's end (start-up included), median \
         of {ROUNDS} runs. Two workers: the catch-all slot delivers `orders`, slot `billing` \
         claims `billing` and streams its own publication, row-filtered on `billing`. \
         Walsender CPU: each slot's walsender over the drain, per message of the backlog.\n\n\
         | workers | aggregate msg/s | vs one | walsender CPU µs/msg, catch-all | walsender CPU µs/msg, `billing` |\n|---|---|---|---|---|\n\
         | one slot, both queues | {one:.0} | | {:.2} | |\n\
         | two slots, a queue each | {two:.0} | {:+.0}% | {:.2} | {:.2} |\n\
         | the same, `billing` sent every queue (its publication dropped: the shared one) | {all:.0} | {:+.0}% | {:.2} | {:.2} |\n",
        one_cpu[0],
        100.0 * (two - one) / one,
        two_cpu[0],
        two_cpu[1],
        100.0 * (all - one) / one,
        all_cpu[0],
        all_cpu[1]
    )
}

/// Aggregate msg/s of `workers` (slot, claimed queues) draining a fresh backlog together, and
/// each slot's walsender CPU per message of the backlog, µs.
async fn rate(
    rabbit: &RabbitMq,
    sink: &str,
    backlog: u64,
    workers: &[(&str, Option<&str>)],
    filtered: bool,
) -> (f64, Vec<f64>) {
    purge(rabbit).await;
    let pg = PgCluster::start_with_conf("max_replication_slots = 20\nmax_wal_senders = 20\n").await;
    let db = pg.superuser().await;
    let url = pg.url();
    for (slot, queues) in workers {
        let mut args = vec!["setup", "--postgres-url", &url, "--slot", slot];
        if let Some(queues) = queues {
            args.extend(["--queues", queues]);
        }
        let out = run_once(&args, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if !filtered {
        // The worker then streams the shared publication (logged), as before 0.2.2.
        db.batch_execute("DROP PUBLICATION pg_outbox_billing")
            .await
            .unwrap();
    }
    eprintln!(
        "==> {} worker(s): publishing {backlog} messages",
        workers.len()
    );
    let mut i = 0;
    while i < backlog {
        let size = 50.min(backlog - i);
        let queue = if (i / 50).is_multiple_of(2) {
            "orders"
        } else {
            "billing"
        };
        publish_range(&db, queue, i, size, KEYS, Storage::Table).await;
        i += size;
    }
    let end: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let config = Worker::config_file(&format!(
        "[postgres]\nstatus_interval = \"10ms\"\nsetup = false\n{sink}"
    ));
    let path = config.path().to_str().unwrap().to_owned();
    let started = Instant::now();
    let mut running: Vec<Worker> = workers
        .iter()
        .map(|(slot, queues)| {
            let mut args = vec![
                "run",
                "--postgres-url",
                &url,
                "--slot",
                slot,
                "--config",
                &path,
            ];
            if let Some(queues) = queues {
                args.extend(["--queues", queues]);
            }
            Worker::start(&args, None)
        })
        .collect();
    for (slot, _) in workers {
        while !is_confirmed(&db, slot, &end).await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let rate = backlog as f64 / started.elapsed().as_secs_f64();
    let mut cpu = Vec::new();
    for (slot, _) in workers {
        let pid: i32 = db
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[slot],
            )
            .await
            .unwrap()
            .get(0);
        // utime + stime: the 14th and 15th fields.
        let seconds = crate::debezium::stat_seconds(pid as u32, 11);
        cpu.push(seconds * 1e6 / backlog as f64);
    }
    eprintln!(
        "    {} worker(s): {rate:.0} msg/s, walsender µs/msg {cpu:.2?}",
        workers.len()
    );
    for worker in &mut running {
        worker.terminate(Duration::from_secs(60));
    }
    (rate, cpu)
}

async fn purge(rabbit: &RabbitMq) {
    let (_connection, channel) = super::amqp_channel(&rabbit.url()).await;
    for queue in ["orders", "billing"] {
        channel
            .queue_purge(queue, Default::default())
            .await
            .unwrap();
    }
}
