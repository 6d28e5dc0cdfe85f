//! The ordered ack tracker: which prefix of the stream is fully acknowledged.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// Transactions in stream order, each with its count of unacknowledged messages.
#[derive(Debug, Default)]
pub struct AckTracker {
    /// Id of `txs[0]`.
    first: u64,
    txs: VecDeque<Tx>,
}

#[derive(Debug)]
struct Tx {
    pending: usize,
    /// Set at commit.
    end_lsn: Option<Lsn>,
}

pub type TxId = u64;

impl AckTracker {
    pub fn begin(&mut self) -> TxId {
        self.txs.push_back(Tx {
            pending: 0,
            end_lsn: None,
        });
        self.first + self.txs.len() as u64 - 1
    }

    fn tx(&mut self, id: TxId) -> &mut Tx {
        let index = (id - self.first) as usize;
        &mut self.txs[index]
    }

    pub fn sent(&mut self, id: TxId) {
        self.tx(id).pending += 1;
    }

    pub fn acked(&mut self, id: TxId) {
        self.tx(id).pending -= 1;
    }

    pub fn commit(&mut self, id: TxId, end_lsn: Lsn) {
        self.tx(id).end_lsn = Some(end_lsn);
    }

    /// Forgets the open (uncommitted) transaction at the end, if any: after a lost replication
    /// connection it is streamed again in full.
    pub fn abandon_open(&mut self) {
        if self.txs.back().is_some_and(|tx| tx.end_lsn.is_none()) {
            self.txs.pop_back();
        }
    }

    /// Pops every leading transaction that is committed and fully acknowledged; returns the
    /// commit end of the last one: the slot can be confirmed up to there.
    pub fn confirmable(&mut self) -> Option<Lsn> {
        let mut lsn = None;
        while let Some(Tx {
            pending: 0,
            end_lsn: Some(end),
        }) = self.txs.front()
        {
            lsn = Some(*end);
            self.txs.pop_front();
            self.first += 1;
        }
        lsn
    }

    /// Every committed transaction is acknowledged ([`AckTracker::confirmable`] popped them):
    /// at most the open one is left.
    pub fn only_open_left(&self) -> bool {
        self.txs.iter().all(|tx| tx.end_lsn.is_none())
    }

    /// No transaction open or waiting for acknowledgements.
    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_fully_acked_committed_prefixes() {
        let mut t = AckTracker::default();
        let a = t.begin();
        t.sent(a);
        t.sent(a);
        t.commit(a, Lsn(100));
        let b = t.begin();
        t.sent(b);
        t.commit(b, Lsn(200));
        let c = t.begin();
        t.sent(c);
        assert_eq!(t.confirmable(), None);
        t.acked(b);
        assert_eq!(t.confirmable(), None, "b is acked but a is not");
        t.acked(a);
        assert_eq!(t.confirmable(), None, "a still has one message pending");
        t.acked(a);
        assert_eq!(
            t.confirmable(),
            Some(Lsn(200)),
            "a and b both confirmable at once"
        );
        t.acked(c);
        assert_eq!(t.confirmable(), None, "c is not committed yet");
        t.commit(c, Lsn(300));
        assert_eq!(t.confirmable(), Some(Lsn(300)));
        assert!(t.is_empty());
    }

    #[test]
    fn an_empty_committed_transaction_is_confirmable() {
        let mut t = AckTracker::default();
        let a = t.begin();
        t.commit(a, Lsn(42));
        assert_eq!(t.confirmable(), Some(Lsn(42)));
    }

    #[test]
    fn an_abandoned_open_transaction_does_not_block() {
        let mut t = AckTracker::default();
        let a = t.begin();
        t.commit(a, Lsn(10));
        let b = t.begin();
        t.sent(b);
        t.abandon_open();
        assert_eq!(t.confirmable(), Some(Lsn(10)));
        assert!(t.is_empty());
        let c = t.begin();
        t.commit(c, Lsn(20));
        assert_eq!(t.confirmable(), Some(Lsn(20)));
    }
}
