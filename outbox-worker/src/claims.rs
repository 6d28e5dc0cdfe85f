//! Which slot delivers which queues (`postgres.queues`, table `outbox.queue_claims`). A claim
//! takes the queues its globs match for messages committed at or after its `from_lsn`; a slot's
//! latest claim replaces its earlier ones; a queue no claim takes goes to the catch-all slot (the
//! one whose latest claim is empty, or that never claimed). Every worker decides from the same
//! history and the commit position in the WAL, so each message has exactly one owner, also
//! across a move of queues from one slot to another (`outbox-worker setup`).

use anyhow::{Context, Result};
use tokio_postgres::Client;

use crate::fatal::Fatal;
use crate::lsn::Lsn;
use crate::slot_publication::Prepared;

/// Claim globs: the characters of queue names and `*` (any run of them, `.` included).
pub fn check_glob(glob: &str) -> Result<(), String> {
    if glob.is_empty() {
        return Err("an empty glob matches no queue".into());
    }
    // Queue names are [A-Za-z0-9._-] (outbox.publish): anything else could match no queue.
    match glob
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-*".contains(*c)))
    {
        Some(c) => Err(format!(
            "{c:?} is not allowed: a queue set's globs have the characters of queue names \
             (A-Z a-z 0-9 . _ -) and * only"
        )),
        None => Ok(()),
    }
}

/// Whether some string matches both globs (`*`-only globs; a name without `*` is a literal).
pub fn overlap(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // seen[i][j]: the suffixes a[i..] and b[j..] were already found to share no string.
    let mut seen = vec![vec![false; b.len() + 1]; a.len() + 1];
    fn go(a: &[char], b: &[char], i: usize, j: usize, seen: &mut [Vec<bool>]) -> bool {
        if seen[i][j] {
            return false;
        }
        let found = match (a.get(i), b.get(j)) {
            (None, None) => true,
            (Some('*'), _) if go(a, b, i + 1, j, seen) => true,
            (Some('*'), Some(_)) if go(a, b, i, j + 1, seen) => true,
            (_, Some('*')) if go(a, b, i, j + 1, seen) => true,
            (Some(_), Some('*')) if go(a, b, i + 1, j, seen) => true,
            (Some(x), Some(y)) if *x != '*' && *y != '*' && x == y => go(a, b, i + 1, j + 1, seen),
            _ => false,
        };
        if !found {
            seen[i][j] = true;
        }
        found
    }
    go(&a, &b, 0, 0, &mut seen)
}

/// Whether `queue` matches `glob`.
pub fn matches(glob: &str, queue: &str) -> bool {
    // A queue name with a `*` of its own would match any glob's `*` here: compare it literally.
    if queue.contains('*') {
        return glob == queue;
    }
    overlap(glob, queue)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub slot: String,
    /// Empty: the catch-all.
    pub queues: Vec<String>,
    pub from: Lsn,
    /// The slot's own publication keeps its queues for every message committed after this
    /// position (`slot_publication`); `None`: the slot streams the shared publication.
    pub filtered_from: Option<Lsn>,
}

/// The whole history, in claim order, and every slot of `outbox.slots`.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    claims: Vec<Claim>,
    /// Every slot of `outbox.slots`: those that never claimed are catch-alls from the start.
    unclaimed_slots: Vec<String>,
}

/// Who delivers a queue's message committed at a position.
#[derive(Debug, PartialEq, Eq)]
pub enum Owner<'a> {
    Slot(&'a str),
    /// No claim takes it and there is no catch-all slot.
    Nobody,
    /// Several catch-all slots (set up by hand around setup's checks).
    Ambiguous,
}

impl Claims {
    pub fn new(claims: Vec<Claim>, unclaimed_slots: Vec<String>) -> Claims {
        Claims {
            claims,
            unclaimed_slots,
        }
    }

    /// No claim at all: every slot delivers every queue (0.2.1, one slot).
    pub fn is_empty(&self) -> bool {
        self.claims.is_empty()
    }

    /// Each slot's latest claim made at or before `at`.
    fn active(&self, at: Lsn) -> Vec<&Claim> {
        let mut latest: Vec<&Claim> = Vec::new();
        for claim in self.claims.iter().filter(|c| c.from <= at) {
            latest.retain(|c| c.slot != claim.slot);
            latest.push(claim);
        }
        latest
    }

    /// The owner of `queue`'s messages committed at `commit`.
    pub fn owner(&self, queue: &str, commit: Lsn) -> Owner<'_> {
        let active = self.active(commit);
        if let Some(claim) = active
            .iter()
            .rev()
            .find(|c| c.queues.iter().any(|g| matches(g, queue)))
        {
            return Owner::Slot(&claim.slot);
        }
        let mut catch_all = active
            .iter()
            .filter(|c| c.queues.is_empty())
            .map(|c| c.slot.as_str())
            .chain(
                self.unclaimed_slots
                    .iter()
                    .map(String::as_str)
                    .filter(|s| !self.claims.iter().any(|c| c.slot == *s)),
            );
        match (catch_all.next(), catch_all.next()) {
            (Some(slot), None) => Owner::Slot(slot),
            (None, _) => Owner::Nobody,
            (Some(_), Some(_)) => Owner::Ambiguous,
        }
    }

    /// The queues `slot` claims now (its latest claim): empty for the catch-all or a slot that
    /// never claimed.
    pub fn current(&self, slot: &str) -> Option<&Claim> {
        self.claims.iter().rev().find(|c| c.slot == slot)
    }

    /// The globs of every claim of `slot` that may apply to a message committed after `at`: the
    /// one in force at `at` and every later one.
    pub fn globs_from(&self, slot: &str, at: Lsn) -> Vec<String> {
        let mine: Vec<&Claim> = self.claims.iter().filter(|c| c.slot == slot).collect();
        let first = mine.iter().rposition(|c| c.from <= at).unwrap_or(0);
        let mut globs: Vec<String> = mine[first..]
            .iter()
            .flat_map(|c| c.queues.iter().cloned())
            .collect();
        globs.sort();
        globs.dedup();
        globs
    }

    /// The catch-all slots now, `slot` left out.
    pub fn catch_alls_besides(&self, slot: &str) -> Vec<String> {
        let mut slots: Vec<String> = self
            .unclaimed_slots
            .iter()
            .filter(|s| *s != slot && self.current(s).is_none())
            .cloned()
            .collect();
        for claim in self.claims.iter().rev() {
            let latest = self.current(&claim.slot) == Some(claim);
            if latest && claim.slot != slot && claim.queues.is_empty() {
                slots.push(claim.slot.clone());
            }
        }
        slots.sort();
        slots.dedup();
        slots
    }

    /// The slots whose deliveries change if `slot` claimed `queues` now: those whose current
    /// globs overlap the new or the old queues of `slot`, and the catch-all, which gains or
    /// loses whatever no explicit claim takes.
    pub fn affected(&self, slot: &str, queues: &[String]) -> Vec<String> {
        let old = self
            .current(slot)
            .map(|c| c.queues.as_slice())
            .unwrap_or_default();
        let touched: Vec<&String> = queues.iter().chain(old).collect();
        let mut slots: Vec<String> = self
            .claims
            .iter()
            .map(|c| c.slot.clone())
            .filter(|s| s != slot)
            .collect();
        slots.sort();
        slots.dedup();
        slots.retain(|other| {
            let current = self.current(other).expect("a slot of the history");
            current
                .queues
                .iter()
                .any(|g| touched.iter().any(|q| overlap(g, q)))
        });
        slots.extend(self.catch_alls_besides(slot));
        slots.sort();
        slots.dedup();
        slots
    }
}

/// What a worker does with a message, by its queue's owner at its commit position.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Deliver,
    /// Another slot delivers it.
    Skip,
    /// No slot does: it is dead-lettered (every slot writes the same dead letter, kept once).
    Unclaimed,
    /// This slot's, since queues moved here at `at` from slot `before`, which may still be
    /// delivering what it had: first confirm `at` (so that `before` never waits for this slot
    /// in turn), then wait for `before` to confirm past `at` ([`Ownership::moved`]), then decide
    /// again.
    AfterMove {
        before: String,
        at: Lsn,
    },
}

/// This worker's slot and the claims it read at its start; and, when a queue moved to this
/// slot, the wait for the slot that had it to confirm past the move, so that the queue's
/// messages arrive in commit order across it.
pub struct Ownership {
    claims: Claims,
    slot: String,
    /// Each queue's owners over the stream, computed once per queue name.
    timelines: std::collections::HashMap<String, Timeline>,
    /// Moves whose previous slot confirmed past them.
    done: std::collections::HashSet<(String, Lsn)>,
    /// Decide every message by the claims now, not at its commit (a replay: the table keeps no
    /// commit position).
    now: bool,
}

/// A queue's owner from each claim position on, ascending (the first from position 0).
type Timeline = Vec<(Lsn, TimelineOwner)>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum TimelineOwner {
    Slot(String),
    Nobody,
    Ambiguous,
}

impl From<Owner<'_>> for TimelineOwner {
    fn from(owner: Owner<'_>) -> TimelineOwner {
        match owner {
            Owner::Slot(slot) => TimelineOwner::Slot(slot.to_owned()),
            Owner::Nobody => TimelineOwner::Nobody,
            Owner::Ambiguous => TimelineOwner::Ambiguous,
        }
    }
}

impl Ownership {
    pub fn new(claims: Claims, slot: &str) -> Ownership {
        Ownership {
            claims,
            slot: slot.to_owned(),
            timelines: Default::default(),
            done: Default::default(),
            now: false,
        }
    }

    /// For a replay: the queues `slot` delivers now.
    pub fn now(claims: Claims, slot: &str) -> Ownership {
        Ownership {
            now: true,
            ..Ownership::new(claims, slot)
        }
    }

    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// `queue`'s owners over the stream: the claims are fixed for a run, so once per queue.
    fn timeline(&mut self, queue: &str) -> &Timeline {
        let claims = &self.claims;
        self.timelines.entry(queue.to_owned()).or_insert_with(|| {
            let mut positions: Vec<Lsn> = claims.claims.iter().map(|c| c.from).collect();
            positions.push(Lsn(0));
            positions.sort_unstable();
            positions.dedup();
            let mut timeline: Timeline = Vec::new();
            for at in positions {
                let owner = TimelineOwner::from(claims.owner(queue, at));
                if timeline.last().is_none_or(|(_, last)| *last != owner) {
                    timeline.push((at, owner));
                }
            }
            timeline
        })
    }

    /// Whether this slot delivers `queue`'s message committed at `commit`.
    pub fn decide(&mut self, queue: &str, commit: Lsn) -> Decision {
        if self.claims.is_empty() {
            return Decision::Deliver;
        }
        let commit = if self.now { Lsn(u64::MAX) } else { commit };
        let (slot, now) = (self.slot.clone(), self.now);
        let timeline = self.timeline(queue);
        let index = timeline.partition_point(|(at, _)| *at <= commit) - 1;
        match &timeline[index].1 {
            TimelineOwner::Slot(owner) if *owner == slot => {}
            TimelineOwner::Slot(_) => return Decision::Skip,
            TimelineOwner::Nobody => return Decision::Unclaimed,
            // Two catch-alls (made by hand around setup's checks; `run` refuses to be one of
            // them): both deliver, a duplicate rather than a loss.
            TimelineOwner::Ambiguous => {
                tracing::warn!(queue, "several slots take the queues nobody claims (outbox.queue_claims); delivering it here too");
                return Decision::Deliver;
            }
        }
        if now {
            return Decision::Deliver;
        }
        // Every earlier owner must have confirmed past where it lost the queue, not only the
        // last one: after two moves in a row the one before may still owe older messages.
        let earlier: Vec<(String, Lsn)> = timeline[..=index]
            .windows(2)
            .filter_map(|pair| match &pair[0].1 {
                TimelineOwner::Slot(before) if *before != slot => Some((before.clone(), pair[1].0)),
                _ => None,
            })
            .collect();
        match earlier.into_iter().find(|owed| !self.done.contains(owed)) {
            Some((before, at)) => Decision::AfterMove { before, at },
            None => Decision::Deliver,
        }
    }

    /// Slot `before` confirmed past `at`: the queues that moved from it are delivered here.
    pub fn moved(&mut self, before: String, at: Lsn) {
        self.done.insert((before, at));
    }
}

/// The confirmed position of `slot` on `client`'s server; `None` when it has no such slot.
pub async fn confirmed_position(client: &Client, slot: &str) -> Result<Option<Lsn>> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots
              WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    match row.and_then(|r| r.get::<_, Option<String>>(0)) {
        Some(lsn) => Ok(Some(lsn.parse().map_err(|e| anyhow::anyhow!("{e}"))?)),
        None => Ok(None),
    }
}

/// [`load`] where the worker writes (`primary_url` while `url` is a standby); from the standby,
/// without the lock, while the primary is unreachable (no setup can run then).
pub async fn load_for(url: &str, primary_url: Option<&str>) -> Result<Claims> {
    match crate::pg::connect_writer(url, primary_url).await {
        Ok(mut writer) => load(&mut writer).await,
        Err(e) if primary_url.is_some() && e.downcast_ref::<Fatal>().is_none() => {
            tracing::warn!(error = %format!("{e:#}"), "cannot reach postgres.primary_url; reading the queue claims on the standby");
            let reader = crate::pg::connect(url).await?;
            if !exists(&reader).await? {
                return Ok(Claims::default());
            }
            read(&reader).await
        }
        Err(e) => Err(e),
    }
}

/// Whether the extension has `outbox.queue_claims` (0.2.2 and later).
pub async fn exists(client: &impl tokio_postgres::GenericClient) -> Result<bool> {
    Ok(client
        .query_one(
            "SELECT pg_catalog.to_regclass('outbox.queue_claims') IS NOT NULL",
            &[],
        )
        .await?
        .get(0))
}

/// Reads the history, waiting for a setup that is writing it (both take the lock of
/// `outbox.slots`). Without the table (an extension older than 0.2.2): no claims.
pub async fn load(client: &mut Client) -> Result<Claims> {
    let tx = client.transaction().await?;
    if !exists(&tx).await? {
        return Ok(Claims::default());
    }
    tx.batch_execute("LOCK TABLE outbox.slots IN SHARE MODE")
        .await
        .context("cannot lock outbox.slots to read the queue claims")?;
    let claims = read(&tx).await?;
    tx.commit().await?;
    Ok(claims)
}

async fn read(client: &impl tokio_postgres::GenericClient) -> Result<Claims> {
    let rows = client
        .query(
            "SELECT c.slot_name::text, c.queues, c.from_lsn::text, c.filtered_from::text,
                    s.slot_name IS NOT NULL AND c.claimed_at >= s.created_at
               FROM outbox.queue_claims c LEFT JOIN outbox.slots s ON s.slot_name = c.slot_name
              ORDER BY c.seq",
            &[],
        )
        .await
        .context("cannot read outbox.queue_claims")?;
    let mut retired: Vec<String> = Vec::new();
    let claims = rows
        .iter()
        .filter(|row| {
            let current: bool = row.get(4);
            if !current {
                retired.push(row.get(0));
            }
            current
        })
        .map(|row| {
            let from: String = row.get(2);
            let filtered_from: Option<String> = row.get(3);
            Ok(Claim {
                slot: row.get(0),
                queues: row.get(1),
                from: from.parse().map_err(|e| anyhow::anyhow!("{e}"))?,
                filtered_from: filtered_from
                    .map(|lsn| lsn.parse().map_err(|e| anyhow::anyhow!("{e}")))
                    .transpose()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let slots: Vec<String> = client
        .query("SELECT slot_name::text FROM outbox.slots", &[])
        .await
        .context("cannot read outbox.slots")?
        .iter()
        .map(|row| row.get(0))
        .collect();
    // A slot dropped with its row of outbox.slots (how a slot is retired) claims nothing more:
    // its queues go back to the catch-all, or are dead-lettered as unclaimed; and a slot of that
    // name made again later claims only what it claimed since (its row's created_at), or the
    // retired slot's claims would take back what the catch-all delivered meanwhile.
    if !retired.is_empty() {
        retired.sort();
        retired.dedup();
        tracing::warn!(slots = ?retired, "claims of slots without a row in outbox.slots, or made before their slot was made again, are ignored");
    }
    Ok(Claims::new(claims, slots))
}

/// What [`claim`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claiming {
    /// Its checks only: before the slot is made, so that a refusal leaves nothing behind.
    Check,
    /// Checks again and records: after the slot exists, so that the claim's position is in
    /// its stream; with what setup did to the slot's publication.
    Record(Prepared),
}

/// Records that `slot` delivers `queues` (empty: the catch-all) from now on, unless that is
/// already its claim; `true` when it records (or, checking, would). Refuses while a slot whose
/// deliveries change is streaming (its worker has the old history), a second catch-all, and a
/// set with no catch-all for the other queues. `decoding`: the standby where this slot is
/// decoded, whose workers the primary cannot see.
pub async fn claim(
    writer: &mut Client,
    decoding: Option<&Client>,
    settings: &crate::source::SlotSettings,
    claiming: Claiming,
) -> Result<bool> {
    let (slot, queues) = (settings.slot.as_str(), settings.queues.as_slice());
    let tx = writer.transaction().await?;
    if !exists(&tx).await? {
        if queues.is_empty() {
            return Ok(false);
        }
        return Err(Fatal::new(
            format!("postgres.queues = {queues:?} needs table outbox.queue_claims (pg_outbox 0.2.2)"),
            "ALTER EXTENSION pg_outbox UPDATE (or run the newer sql/pg_outbox.sql), as its installer",
        )
        .into());
    }
    tx.batch_execute("LOCK TABLE outbox.slots IN SHARE ROW EXCLUSIVE MODE")
        .await
        .context("cannot lock outbox.slots to claim queues")?;
    let claims = read(&tx).await?;
    let mine = claims.current(slot);
    // A publication made again is in place only from now: the claim says so.
    let remade = matches!(claiming, Claiming::Record(Prepared::Created(_)));
    if mine.is_some_and(|c| c.queues == queues) && !remade {
        return Ok(false);
    }
    let catch_alls = claims.catch_alls_besides(slot);
    if queues.is_empty() {
        // Without any set, every slot delivers every queue (several: a fan-out, as before 0.2.2).
        if claims.is_empty() {
            return Ok(false);
        }
        if let Some(other) = catch_alls.first() {
            return Err(Fatal::new(
                format!(
                    "slot {other:?} already takes every queue no other slot claims; slot {slot:?} \
                     cannot take them too"
                ),
                format!(
                    "give postgres.queues to slot {slot:?}, or if slot {other:?} is gone, \
                     SELECT pg_drop_replication_slot('{other}') and DELETE FROM outbox.slots \
                     WHERE slot_name = '{other}'"
                ),
            )
            .into());
        }
        if mine.is_none() {
            // A slot that never claimed is the catch-all already.
            return Ok(false);
        }
    } else {
        match catch_alls.as_slice() {
            [] => {
                return Err(Fatal::new(
                    format!(
                        "no slot takes the queues outside postgres.queues = {queues:?}: their \
                         messages would reach nobody"
                    ),
                    "set up a catch-all slot first (a worker without postgres.queues), then this \
                     one",
                )
                .into())
            }
            [_] => {}
            several => {
                return Err(Fatal::new(
                    format!(
                        "slots {several:?} each take every queue: which would give up \
                         {queues:?} to slot {slot:?}?"
                    ),
                    "queue sets need exactly one catch-all slot: give the others \
                     postgres.queues, or drop those no longer used (pg_drop_replication_slot and \
                     their row of outbox.slots)",
                )
                .into())
            }
        }
    }
    // The slot's own worker too: it read its claim when it started.
    let mut affected = claims.affected(slot, queues);
    affected.push(slot.to_owned());
    // A worker streams from the primary or from a standby: the primary cannot see the slots of
    // a standby (a hostile review: a standby worker kept delivering by its old set, and what it
    // skipped was lost), so this slot's standby is asked too.
    let (mut present, mut running) = slot_states(&tx, &affected).await?;
    if let Some(standby) = decoding {
        let (there, active) = slot_states(standby, &affected).await?;
        present.extend(there);
        running.extend(active);
    }
    running.sort();
    running.dedup();
    let unseen: Vec<&String> = affected
        .iter()
        .filter(|s| *s != slot && !present.contains(s))
        .filter(|s| !settings.stopped_elsewhere.contains(s))
        .collect();
    if !unseen.is_empty() {
        return Err(Fatal::new(
            format!(
                "slot {slot:?} claiming queues {queues:?} changes what slots {unseen:?} deliver, \
                 and they are decoded on a server this setup cannot see (another standby): their \
                 workers may be running"
            ),
            format!(
                "stop those workers, then run this setup again with --stopped-elsewhere {}",
                unseen
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        )
        .into());
    }
    if !running.is_empty() {
        return Err(Fatal::new(
            format!(
                "slot {slot:?} claiming queues {queues:?} changes what slots {running:?} deliver, \
                 and their workers are running"
            ),
            "stop those workers (SIGTERM), run this setup, then start them again: a worker reads \
             which queues are its own when it starts, and would deliver the moved ones too",
        )
        .into());
    }
    let Claiming::Record(prepared) = claiming else {
        return Ok(true);
    };
    // Where the slot's own publication holds from: where it was made, else where the slot's
    // last claim said (it has kept every set since), else here.
    let made = match prepared {
        Prepared::Created(at) => Some(at.to_string()),
        Prepared::Waited(_) | Prepared::Kept => None,
    };
    tx.execute(
        "INSERT INTO outbox.queue_claims (slot_name, queues, from_lsn, filtered_from)
         VALUES ($1, $2, pg_catalog.pg_current_wal_insert_lsn(),
                 CASE WHEN pg_catalog.cardinality($2::text[]) > 0 THEN
                     coalesce($3::text::pg_catalog.pg_lsn,
                              (SELECT c.filtered_from FROM outbox.queue_claims c
                                WHERE c.slot_name = $1
                                  AND c.claimed_at >= (SELECT s.created_at FROM outbox.slots s
                                                        WHERE s.slot_name = $1)
                                ORDER BY c.seq DESC LIMIT 1),
                              pg_catalog.pg_current_wal_insert_lsn())
                 END)",
        &[&slot, &queues, &made],
    )
    .await
    .context("cannot record the claim in outbox.queue_claims")?;
    tx.commit().await?;
    tracing::info!(slot, ?queues, changes_for = ?affected, "claimed queues");
    Ok(true)
}

/// Of `slots`, those on `client`'s server, and those of them being streamed.
async fn slot_states(
    client: &impl tokio_postgres::GenericClient,
    slots: &[String],
) -> Result<(Vec<String>, Vec<String>)> {
    let rows = client
        .query(
            "SELECT slot_name::text, active FROM pg_catalog.pg_replication_slots
              WHERE slot_name = ANY($1) AND database = pg_catalog.current_database()",
            &[&slots],
        )
        .await?;
    let present = rows.iter().map(|row| row.get(0)).collect();
    let active = rows
        .iter()
        .filter(|row| row.get::<_, bool>(1))
        .map(|row| row.get(0))
        .collect();
    Ok((present, active))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_overlap_when_some_name_matches_both() {
        for (a, b) in [
            ("orders", "orders"),
            ("orders.*", "*.eu"),
            ("*", "billing"),
            ("a*b", "*ab*"),
            ("a*", "*a"),
        ] {
            assert!(overlap(a, b), "{a} {b}");
            assert!(overlap(b, a), "{b} {a}");
        }
        for (a, b) in [
            ("orders", "billing"),
            ("orders.*", "billing.*"),
            ("a*b", "*c"),
            ("ab", "a*bc"),
        ] {
            assert!(!overlap(a, b), "{a} {b}");
            assert!(!overlap(b, a), "{b} {a}");
        }
        assert!(matches("orders.*", "orders.eu"));
        assert!(!matches("orders.*", "order"));
        assert!(!matches("a", "*"), "a queue named * is literal");
    }

    fn claim(slot: &str, queues: &[&str], from: u64) -> Claim {
        Claim {
            slot: slot.into(),
            queues: queues.iter().map(|q| q.to_string()).collect(),
            from: Lsn(from),
            filtered_from: None,
        }
    }

    #[test]
    fn each_message_has_one_owner_across_a_move() {
        // pg_outbox: the catch-all from the start; billing moves to b at 100, then b also
        // takes audit at 200 and gives billing back at 300.
        let claims = Claims::new(
            vec![claim("b", &["billing*"], 100), claim("b", &["audit"], 300)],
            vec!["pg_outbox".into(), "b".into()],
        );
        assert_eq!(
            claims.owner("billing.eu", Lsn(99)),
            Owner::Slot("pg_outbox")
        );
        assert_eq!(claims.owner("billing.eu", Lsn(100)), Owner::Slot("b"));
        assert_eq!(claims.owner("orders", Lsn(150)), Owner::Slot("pg_outbox"));
        assert_eq!(claims.owner("billing", Lsn(300)), Owner::Slot("pg_outbox"));
        assert_eq!(claims.owner("audit", Lsn(299)), Owner::Slot("pg_outbox"));
        assert_eq!(claims.owner("audit", Lsn(300)), Owner::Slot("b"));
        assert_eq!(claims.affected("c", &["aud*".into()]), ["b", "pg_outbox"]);
        assert_eq!(claims.affected("c", &["orders".into()]), ["pg_outbox"]);
        assert_eq!(claims.affected("b", &[]), ["pg_outbox"]);
    }

    #[test]
    fn a_swap_waits_each_way_once_then_delivers() {
        // b had x*, then takes y* and gives x* back to the catch-all at 100.
        let claims = Claims::new(
            vec![claim("b", &["x*"], 10), claim("b", &["y*"], 100)],
            vec!["all".into(), "b".into()],
        );
        let mut all = Ownership::new(claims.clone(), "all");
        let mut b = Ownership::new(claims, "b");
        let moved_at = |before: &str, at: u64| Decision::AfterMove {
            before: before.into(),
            at: Lsn(at),
        };
        assert_eq!(all.decide("x1", Lsn(50)), Decision::Skip);
        assert_eq!(b.decide("x1", Lsn(50)), moved_at("all", 10));
        b.moved("all".into(), Lsn(10));
        assert_eq!(b.decide("x1", Lsn(50)), Decision::Deliver);
        let moved = |before: &str| moved_at(before, 100);
        assert_eq!(all.decide("x1", Lsn(150)), moved("b"));
        assert_eq!(b.decide("y1", Lsn(150)), moved("all"));
        all.moved("b".into(), Lsn(100));
        assert_eq!(all.decide("x1", Lsn(150)), Decision::Deliver);
        assert_eq!(all.decide("y1", Lsn(150)), Decision::Skip);
        let mut replay = Ownership::now(b.claims().clone(), "b");
        assert_eq!(replay.decide("y1", Lsn(0)), Decision::Deliver);
        assert_eq!(replay.decide("x1", Lsn(0)), Decision::Skip);
        assert!(check_glob("b1, b2").is_err() && check_glob("é*").is_err());
        assert!(check_glob("orders.eu-1_*").is_ok());
    }

    #[test]
    fn after_two_moves_in_a_row_every_earlier_owner_is_waited_for() {
        // q: the catch-all's, then b's from 10, then c's from 20.
        let claims = Claims::new(
            vec![claim("b", &["q"], 10), claim("c", &["q"], 20)],
            vec!["all".into(), "b".into(), "c".into()],
        );
        let mut c = Ownership::new(claims, "c");
        let owed = |before: &str, at: u64| Decision::AfterMove {
            before: before.into(),
            at: Lsn(at),
        };
        assert_eq!(c.decide("q", Lsn(30)), owed("all", 10));
        c.moved("all".into(), Lsn(10));
        assert_eq!(c.decide("q", Lsn(30)), owed("b", 20));
        c.moved("b".into(), Lsn(20));
        assert_eq!(c.decide("q", Lsn(30)), Decision::Deliver);
    }

    #[test]
    fn a_later_claim_of_an_overlapping_set_wins_from_its_position() {
        let claims = Claims::new(
            vec![claim("a", &["orders*"], 10), claim("b", &["orders.eu"], 20)],
            vec!["all".into(), "a".into(), "b".into()],
        );
        assert_eq!(claims.owner("orders.eu", Lsn(19)), Owner::Slot("a"));
        assert_eq!(claims.owner("orders.eu", Lsn(20)), Owner::Slot("b"));
        assert_eq!(claims.owner("orders.us", Lsn(20)), Owner::Slot("a"));
        assert_eq!(claims.owner("x", Lsn(20)), Owner::Slot("all"));
        // b gives orders.eu back: a takes it again, so a's worker must be stopped too.
        assert_eq!(claims.affected("b", &["orders.us.*".into()]), ["a", "all"]);
        let no_catch_all = Claims::new(vec![claim("a", &["orders"], 10)], vec!["a".into()]);
        assert_eq!(no_catch_all.owner("x", Lsn(20)), Owner::Nobody);
    }
}
