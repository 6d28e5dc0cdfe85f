//! The in-flight window: sends waiting for their acknowledgement, and failed sends waiting to be
//! sent again, in their original order.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};

use super::tracker::TxId;
use crate::message::Message;
use crate::router::Route;
use crate::sink::{Sink, SinkError};

/// One message on its way, with what is needed to send it again.
pub struct Entry {
    /// Stream order.
    pub seq: u64,
    pub tx: TxId,
    pub route: Route,
    pub message: Arc<Message>,
    pub attempts: u32,
    pub permanent_failures: u32,
}

type Sending = BoxFuture<'static, (Entry, Result<(), SinkError>)>;

pub struct Window {
    max_in_flight: usize,
    in_flight: FuturesUnordered<Sending>,
    /// Failed sends waiting for the window to settle, by sequence number.
    failed: BTreeMap<u64, Entry>,
    /// Re-sent messages not yet settled; intake waits for them.
    retries_in_flight: usize,
}

impl Window {
    pub fn new(max_in_flight: usize) -> Window {
        Window {
            max_in_flight,
            in_flight: FuturesUnordered::new(),
            failed: BTreeMap::new(),
            retries_in_flight: 0,
        }
    }

    /// Hands the message to the sink (which fixes its order on the wire) and keeps its ack.
    pub fn dispatch(&mut self, mut entry: Entry, sink: &dyn Sink) {
        entry.attempts += 1;
        if entry.attempts > 1 {
            self.retries_in_flight += 1;
        }
        let ack = sink.send(&entry.route.destination, &entry.message);
        self.in_flight
            .push(Box::pin(async move { (entry, ack.await) }));
    }

    /// Room for one more message besides `waiting` others, no failed message waiting to be sent
    /// again, and no re-sent one still unacknowledged: a message sent behind a retry could
    /// otherwise overtake it if the retry fails again.
    pub fn can_accept(&self, waiting: usize) -> bool {
        self.failed.is_empty()
            && self.retries_in_flight == 0
            && self.in_flight.len() + waiting < self.max_in_flight
    }

    /// Nothing in flight and nothing failed.
    pub fn is_settled(&self) -> bool {
        self.in_flight.is_empty() && self.failed.is_empty()
    }

    /// Messages not yet acknowledged: in flight or waiting to be re-sent.
    pub fn len(&self) -> usize {
        self.in_flight.len() + self.failed.len()
    }

    /// The next send that settled; `None` at once when nothing is in flight. Cancel-safe: a send
    /// that settled stays in the window until this returns it.
    pub async fn next_settled(&mut self) -> Option<(Entry, Result<(), SinkError>)> {
        let (entry, result) = self.in_flight.next().await?;
        if entry.attempts > 1 {
            self.retries_in_flight -= 1;
        }
        Some((entry, result))
    }

    /// Keeps a failed send until the window settles.
    pub fn park(&mut self, entry: Entry) {
        self.failed.insert(entry.seq, entry);
    }

    /// The most attempts any parked send has had, if any is parked.
    pub fn parked_attempts(&self) -> Option<u32> {
        self.failed.values().map(|e| e.attempts).max()
    }

    /// The parked sends, in stream order.
    pub fn take_parked(&mut self) -> impl Iterator<Item = Entry> {
        std::mem::take(&mut self.failed).into_values()
    }
}
