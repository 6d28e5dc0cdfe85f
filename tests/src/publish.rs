//! Publishing test traffic and checking what arrived: every message carries its global index `i`
//! and its key, so loss, duplicates and per-key order can be counted at the far end.

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio_postgres::Client;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Storage {
    Table,
    Wal,
    /// Alternating per transaction.
    Mixed,
}

/// Publishes messages `first..first+count` on `queue` in transactions of 1 to 50 messages, keys
/// `k-0..k-{keys-1}`, payload `{"i": i, "key": key}`. Returns the number of transactions.
pub async fn publish_range(
    db: &Client,
    queue: &str,
    first: u64,
    count: u64,
    keys: u64,
    storage: Storage,
) -> usize {
    let headers = r#"'{"test": "yes"}'"#;
    publish_range_with(db, queue, first, count, keys, storage, headers).await
}

/// Headers for [`publish_range_with`]: a W3C `traceparent` of its own per message, sampled.
pub const SAMPLED: &str = "jsonb_build_object('traceparent', '00-' || md5(i::text) || '-' \
     || left(md5('s' || i), 16) || '-01')";
/// The same, one message in ten sampled.
pub const SAMPLED_ONE_IN_TEN: &str =
    "jsonb_build_object('traceparent', '00-' || md5(i::text) || '-' \
     || left(md5('s' || i), 16) || CASE WHEN i % 10 = 0 THEN '-01' ELSE '-00' END)";
/// The same, not sampled.
pub const UNSAMPLED: &str = "jsonb_build_object('traceparent', '00-' || md5(i::text) || '-' \
     || left(md5('s' || i), 16) || '-00')";

/// [`publish_range`] with the headers of message `i` given as an SQL expression of `i` (jsonb).
pub async fn publish_range_with(
    db: &Client,
    queue: &str,
    first: u64,
    count: u64,
    keys: u64,
    storage: Storage,
    headers: &str,
) -> usize {
    let mut i = first;
    let end = first + count;
    let mut txs = 0;
    while i < end {
        let size = (1 + (i * 7919) % 50).min(end - i);
        let form = match storage {
            Storage::Table => "table",
            Storage::Wal => "wal",
            Storage::Mixed if txs % 2 == 0 => "table",
            Storage::Mixed => "wal",
        };
        db.batch_execute(&format!(
            "BEGIN; SET LOCAL pg_outbox.storage = '{form}';
             SELECT count(outbox.publish('{queue}', jsonb_build_object('i', i, 'key', 'k-' || i % {keys}),
                                          {headers}, 'k-' || i % {keys}))
               FROM generate_series({i}::bigint, {last}::bigint) AS i;
             COMMIT;",
            last = i + size - 1
        ))
        .await
        .expect("publish");
        i += size;
        txs += 1;
    }
    txs
}

/// A transaction that publishes and rolls back: `{"rolled_back": true}` must never arrive.
pub async fn publish_rolled_back(db: &Client, queue: &str, storage: Storage) {
    let form = if storage == Storage::Wal {
        "wal"
    } else {
        "table"
    };
    db.batch_execute(&format!(
        "BEGIN; SET LOCAL pg_outbox.storage = '{form}';
         SELECT outbox.publish('{queue}', '{{\"rolled_back\": true}}', '{{}}', 'k-0');
         ROLLBACK;"
    ))
    .await
    .expect("rolled-back publish");
}

/// One delivered message as the test sees it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub id: String,
    pub key: Option<String>,
    pub payload: serde_json::Value,
}

/// What a run delivered, checked against what was published.
#[derive(Debug)]
pub struct Tally {
    pub delivered: usize,
    pub distinct: usize,
    pub duplicates: usize,
}

/// Asserts that indexes `0..expected` all arrived, nothing rolled back arrived, and the first
/// arrival of each key's messages is in publish order. Returns the counts.
pub fn check_delivery(seen: &[Seen], expected: u64) -> Tally {
    check(seen, expected, true)
}

/// [`check_delivery`] without the order: for a broker that does not keep it (librdkafka's mock
/// cluster does not reject a batch that overtakes a retried one, as Kafka does).
pub fn check_no_loss(seen: &[Seen], expected: u64) -> Tally {
    check(seen, expected, false)
}

fn check(seen: &[Seen], expected: u64, in_order: bool) -> Tally {
    let mut ids = HashSet::new();
    let mut indexes = HashSet::new();
    let mut last_per_key: HashMap<String, u64> = HashMap::new();
    for s in seen {
        assert!(
            s.payload.get("rolled_back").is_none(),
            "a rolled-back message arrived: {s:?}"
        );
        let i = s.payload["i"]
            .as_u64()
            .unwrap_or_else(|| panic!("no index in {s:?}"));
        if !ids.insert(s.id.clone()) {
            continue; // a duplicate: order is judged on first arrivals
        }
        indexes.insert(i);
        let key = s.key.clone().expect("every test message has a key");
        if let Some(last) = last_per_key.insert(key.clone(), i) {
            assert!(
                !in_order || last < i,
                "key {key}: message {i} arrived after {last}"
            );
        }
    }
    let missing: Vec<u64> = (0..expected)
        .filter(|i| !indexes.contains(i))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "lost messages (first 10 indexes): {missing:?}; {} distinct of {expected}",
        indexes.len()
    );
    assert_eq!(indexes.len() as u64, expected, "unexpected extra indexes");
    Tally {
        delivered: seen.len(),
        distinct: ids.len(),
        duplicates: seen.len() - ids.len(),
    }
}

/// A file for a worker's stdout, in a directory that lives as long as the returned handle.
pub fn stdout_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stdout.jsonl");
    (dir, path)
}

/// Waits (at most a minute) until the stdout sink wrote `count` lines to `path`.
pub async fn wait_for_lines(path: &std::path::Path, count: usize) {
    crate::eventually(
        std::time::Duration::from_secs(60),
        &format!("{count} lines on stdout"),
        || async move { read_json_lines(path).len() >= count },
    )
    .await;
}

/// Lines the stdout sink wrote, parsed.
pub fn read_json_lines(path: &std::path::Path) -> Vec<Seen> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        // A SIGKILL can cut the last line short; a complete line was flushed before its ack.
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .map(|v| Seen {
            id: v["id"].as_str().unwrap().to_owned(),
            key: v["key"].as_str().map(str::to_owned),
            payload: v["payload"].clone(),
        })
        .collect()
}

/// Counts by queue, for quick assertions.
pub fn count_by<'a>(items: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for item in items {
        *counts.entry(item.to_owned()).or_default() += 1;
    }
    counts
}

/// The only row of `outbox.dead_letters`: (id, destination, error, attempts).
pub async fn only_dead_letter(db: &Client) -> (uuid::Uuid, String, String, i32) {
    let row = db
        .query_one(
            "SELECT id, destination, error, attempts FROM outbox.dead_letters",
            &[],
        )
        .await
        .expect("exactly one dead letter");
    (row.get(0), row.get(1), row.get(2), row.get(3))
}
