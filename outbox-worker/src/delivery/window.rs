//! The in-flight window: sends waiting for their acknowledgement, and failed sends waiting to be
//! sent again. A pipelined sink's failed sends wait for the window to settle and go again in their
//! original order, intake paused meanwhile (a later message of the partition must not overtake
//! them); a per-key sink's failed send waits out its own backoff while everything else flows (the
//! later messages of its key wait for it in [`super::keys`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};

use super::tracker::TxId;
use crate::message::Message;
use crate::router::Route;
use crate::sink::{Receipt, Sink, SinkError};

/// One message on its way, with what is needed to send it again.
pub struct Entry {
    /// Stream order.
    pub seq: u64,
    pub tx: TxId,
    pub route: Route,
    pub message: Arc<Message>,
    pub attempts: u32,
    pub permanent_failures: u32,
    /// When the worker took it in: its trace span's start.
    pub started: SystemTime,
    /// Sent behind other messages of its key before it was acknowledged (a pipelined sink): a
    /// failure pauses intake and its retry goes in stream order.
    pub pipelined: bool,
}

type Sending = BoxFuture<'static, (Entry, Result<Receipt, SinkError>)>;

pub struct Window {
    max_in_flight: usize,
    in_flight: FuturesUnordered<Sending>,
    /// Failed sends waiting for the window to settle, by sequence number.
    failed: BTreeMap<u64, Entry>,
    /// Re-sent pipelined messages not yet settled; intake waits for them.
    retries_in_flight: usize,
    /// Failed sends of per-key sinks, each waiting out its own backoff.
    backing_off: FuturesUnordered<BoxFuture<'static, Entry>>,
}

/// What the window has to report.
pub enum Event {
    /// A send settled.
    Settled(Entry, Result<Receipt, SinkError>),
    /// A per-key send's backoff has passed: send it again.
    RetryDue(Entry),
}

impl Window {
    pub fn new(max_in_flight: usize) -> Window {
        Window {
            max_in_flight,
            in_flight: FuturesUnordered::new(),
            failed: BTreeMap::new(),
            retries_in_flight: 0,
            backing_off: FuturesUnordered::new(),
        }
    }

    /// Hands the message to the sink (which fixes its order on the wire) and keeps its ack.
    pub fn dispatch(&mut self, mut entry: Entry, sink: &dyn Sink) {
        entry.attempts += 1;
        if entry.attempts > 1 && entry.pipelined {
            self.retries_in_flight += 1;
        }
        let ack = sink.send(&entry.route.destination, &entry.message);
        self.in_flight
            .push(Box::pin(async move { (entry, ack.await) }));
    }

    /// Room for one more message besides `waiting` others, no failed pipelined message waiting
    /// to be sent again, and no re-sent one still unacknowledged: a message sent behind a retry
    /// could otherwise overtake it if the retry fails again.
    pub fn can_accept(&self, waiting: usize) -> bool {
        self.failed.is_empty()
            && self.retries_in_flight == 0
            && self.len() + waiting < self.max_in_flight
    }

    /// Nothing in flight and nothing failed.
    pub fn is_settled(&self) -> bool {
        self.in_flight.is_empty() && self.failed.is_empty() && self.backing_off.is_empty()
    }

    /// Nothing in flight (failed sends may wait).
    pub fn nothing_in_flight(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Messages not yet acknowledged: in flight or waiting to be re-sent.
    pub fn len(&self) -> usize {
        self.in_flight.len() + self.failed.len() + self.backing_off.len()
    }

    /// The next send that settled or per-key retry that is due; `None` at once when there is
    /// neither to wait for. Cancel-safe: both stay in the window until this returns them.
    pub async fn next_event(&mut self) -> Option<Event> {
        if self.in_flight.is_empty() && self.backing_off.is_empty() {
            return None;
        }
        tokio::select! {
            Some((entry, result)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                if entry.attempts > 1 && entry.pipelined {
                    self.retries_in_flight -= 1;
                }
                Some(Event::Settled(entry, result))
            }
            Some(entry) = self.backing_off.next(), if !self.backing_off.is_empty() => {
                Some(Event::RetryDue(entry))
            }
        }
    }

    /// Keeps a failed per-key send for `backoff`, then hands it back ([`Event::RetryDue`]).
    pub fn back_off(&mut self, entry: Entry, backoff: std::time::Duration) {
        self.backing_off.push(Box::pin(async move {
            tokio::time::sleep(backoff).await;
            entry
        }));
    }

    /// Keeps a failed pipelined send until the window settles.
    pub fn park(&mut self, entry: Entry) {
        self.failed.insert(entry.seq, entry);
    }

    /// The sequence number of the oldest parked send, if any is parked.
    pub fn first_parked(&self) -> Option<u64> {
        self.failed.keys().next().copied()
    }

    /// The parked sends, in stream order.
    pub fn take_parked(&mut self) -> impl Iterator<Item = Entry> {
        std::mem::take(&mut self.failed).into_values()
    }
}
