//! What one more slot costs (issue #32): every logical slot decodes all of its database's WAL,
//! whichever queues it carries. A backlog is committed once, on PostgreSQL 16, then drained by
//! `pg_recvlogical` from slots of three kinds: on the primary with the whole publication (what
//! the one worker's slot decodes today), on the primary with a publication whose row filter keeps
//! none of the backlog (a second slot for other queues: it decodes everything and sends
//! nothing), and on a physical standby (decoding moved off the primary, PostgreSQL 16+). The
//! walsender's CPU is read from its postmaster's reaped children (`cutime + cstime`), so
//! autovacuum is off and nothing else connects during a drain.

use std::process::Command;
use std::time::{Duration, Instant};

use outbox_tests::postgres::{Installation, PgCluster};
use outbox_tests::publish::{publish_range_with, Storage};
use tokio_postgres::Client;

/// Drains of each kind, the median reported.
const RUNS: usize = 3;
const MAJOR: u32 = 16;

/// Where a slot is and what it streams.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Primary,
    PrimaryOtherQueues,
    Standby,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Primary => "primary, every queue (one worker today)",
            Kind::PrimaryOtherQueues => {
                "primary, a row filter keeping none of them (an extra slot)"
            }
            Kind::Standby => "standby, every queue",
        }
    }

    fn publication(self) -> &'static str {
        match self {
            Kind::PrimaryOtherQueues => "elsewhere",
            _ => "pg_outbox",
        }
    }
}

struct Drain {
    rate: f64,
    /// The decoding walsender's CPU, µs per message.
    walsender_us: f64,
    /// What the primary's reaped processes used meanwhile, µs per message (a standby's drain).
    primary_us: f64,
}

pub async fn slots_table(backlog: u64) -> String {
    let installation = Installation::major(MAJOR);
    let primary = PgCluster::start_on(installation.clone(), |data| {
        append(
            data,
            "max_replication_slots = 30\nmax_wal_senders = 30\nautovacuum = off\n",
        );
    });
    let db = primary.superuser().await;
    db.batch_execute(
        "CREATE EXTENSION pg_outbox;
         CREATE PUBLICATION elsewhere FOR TABLE outbox.messages WHERE (queue = 'elsewhere')
             WITH (publish = 'insert');",
    )
    .await
    .expect("the extension on PostgreSQL 16 (scripts/test-extension installs it)");
    let standby = primary.start_standby();
    let standby_db = standby.superuser().await;

    let mut out = format!(
        "Drain a committed backlog of {backlog} messages (transactions of 1–50, 100 keys) with \
         `pg_recvlogical` (pgoutput, `messages=true`) on PostgreSQL {MAJOR}: the CPU of the \
         decoding walsender, per message, median of {RUNS} slots of each kind. A slot on the \
         standby decodes the WAL the standby replays; the last column is the CPU the primary \
         spent on the drain (its walsender, or nothing where the standby decodes).\n\n\
         | storage | slot | msg/s | walsender CPU µs/msg | primary CPU µs/msg |\n\
         |---|---|---|---|---|\n"
    );
    for storage in [Storage::Table, Storage::Wal] {
        let kinds = [Kind::Primary, Kind::PrimaryOtherQueues, Kind::Standby];
        let mut slots = Vec::new();
        for kind in kinds {
            for run in 0..RUNS {
                let name = format!("s_{}_{run}", kind.publication()) + standby_suffix(kind);
                create_slot(&db, &standby_db, kind, &name).await;
                slots.push((kind, name));
            }
        }
        eprintln!("==> {storage:?}: publishing {backlog} messages");
        publish_range_with(&db, "orders", 0, backlog, 100, storage, "'{}'").await;
        let end: String = db
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        wait_for_replay(&standby_db, &end).await;
        for kind in kinds {
            let mut drains: Vec<Drain> = slots
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, slot)| {
                    let server = if kind == Kind::Standby {
                        &standby
                    } else {
                        &primary
                    };
                    drain(server, &primary, slot, kind.publication(), &end, backlog)
                })
                .collect();
            drains.sort_by(|a, b| a.walsender_us.total_cmp(&b.walsender_us));
            let median = &drains[drains.len() / 2];
            out += &format!(
                "| {storage:?} | {} | {:.0} | {:.2} | {:.2} |\n",
                kind.describe(),
                median.rate,
                median.walsender_us,
                median.primary_us
            );
        }
        for (kind, slot) in &slots {
            let on = if *kind == Kind::Standby {
                &standby_db
            } else {
                &db
            };
            on.execute("SELECT pg_drop_replication_slot($1)", &[slot])
                .await
                .unwrap();
        }
    }
    out
}

fn standby_suffix(kind: Kind) -> &'static str {
    if kind == Kind::Standby {
        "_standby"
    } else {
        ""
    }
}

/// A slot on the standby waits for a snapshot of running transactions from the primary, which
/// `pg_log_standby_snapshot()` writes at once instead of at the next checkpoint.
async fn create_slot(primary: &Client, standby: &Client, kind: Kind, name: &str) {
    let create = "SELECT pg_create_logical_replication_slot($1, 'pgoutput')";
    if kind != Kind::Standby {
        primary.execute(create, &[&name]).await.unwrap();
        return;
    }
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&name];
    let creating = standby.execute(create, &params);
    tokio::pin!(creating);
    loop {
        primary
            .execute("SELECT pg_log_standby_snapshot()", &[])
            .await
            .unwrap();
        tokio::select! {
            done = &mut creating => { done.unwrap(); return; }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

async fn wait_for_replay(standby: &Client, end: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let replayed: bool = standby
            .query_one(
                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                &[&end],
            )
            .await
            .unwrap()
            .get(0);
        if replayed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the standby did not replay {end}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn drain(
    server: &PgCluster,
    primary: &PgCluster,
    slot: &str,
    publication: &str,
    end: &str,
    backlog: u64,
) -> Drain {
    let (server_before, primary_before) = (
        reaped_cpu_seconds(server.postmaster_pid()),
        reaped_cpu_seconds(primary.postmaster_pid()),
    );
    let started = Instant::now();
    let port = server.port.to_string();
    let publications = format!("publication_names={publication}");
    let status = Command::new(server.installation().program("pg_recvlogical"))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
        .args(["-d", "postgres", "--slot", slot, "--start", "--no-loop"])
        .args(["--endpos", end, "-f", "/dev/null", "-o", "proto_version=1"])
        .args(["-o", &publications, "-o", "messages=true"])
        .status()
        .expect("pg_recvlogical");
    assert!(status.success(), "pg_recvlogical on slot {slot}");
    let rate = backlog as f64 / started.elapsed().as_secs_f64();
    // The walsender exits with its client; its CPU reaches the postmaster once reaped.
    std::thread::sleep(Duration::from_millis(300));
    let per_message = |seconds: f64| seconds * 1e6 / backlog as f64;
    let drain = Drain {
        rate,
        walsender_us: per_message(reaped_cpu_seconds(server.postmaster_pid()) - server_before),
        primary_us: if std::ptr::eq(server, primary) {
            per_message(reaped_cpu_seconds(server.postmaster_pid()) - server_before)
        } else {
            per_message(reaped_cpu_seconds(primary.postmaster_pid()) - primary_before)
        },
    };
    eprintln!(
        "    {slot}: {rate:.0} msg/s, walsender {:.2} µs/msg",
        drain.walsender_us
    );
    drain
}

/// CPU of a process's children that ended and were waited for, user + system, seconds: cutime
/// and cstime, the 14th and 15th fields.
fn reaped_cpu_seconds(pid: u32) -> f64 {
    crate::debezium::stat_seconds(pid, 13)
}

fn append(data: &std::path::Path, lines: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut f| f.write_all(lines.as_bytes()))
        .expect("append to postgresql.conf");
}
