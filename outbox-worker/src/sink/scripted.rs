//! A sink for tests that does what its script says: accept, reject, store then fail, hold the
//! acknowledgement until released, or answer slowly. It records what the "broker" stored, in the
//! broker's order, so tests can check order and count duplicates without a broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use super::{Ack, Receipt, Sink, SinkError};
use crate::message::Message;
use crate::router::Destination;

/// What the broker does with one send.
#[derive(Debug, Clone)]
pub enum Step {
    /// Stores the message and acknowledges it.
    Accept,
    /// Refuses the message: not stored.
    Reject(SinkError),
    /// Stores the message, then reports a failure (a lost acknowledgement: a duplicate follows).
    StoreThenFail(SinkError),
    /// Stores the message; the acknowledgement waits for [`ScriptedSink::release`].
    Hold,
    /// Stores the message and acknowledges it after this long.
    Slow(Duration),
}

type Matcher = Box<dyn Fn(&Message, u32) -> bool + Send + Sync>;

struct Rule {
    matches: Matcher,
    step: Step,
    /// How many more sends this rule applies to; `None` = always.
    remaining: Option<u32>,
}

/// One message the broker stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub id: Uuid,
    pub key: Option<String>,
    pub destination: String,
    /// 1 for the first send of this id.
    pub attempt: u32,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    attempts: HashMap<Uuid, u32>,
    stored: Vec<Stored>,
}

/// Accepts everything unless a rule says otherwise; the first matching rule with sends left wins.
pub struct ScriptedSink {
    state: Mutex<State>,
    released: watch::Sender<bool>,
}

impl ScriptedSink {
    pub fn new() -> Arc<ScriptedSink> {
        Arc::new(ScriptedSink {
            state: Mutex::default(),
            released: watch::Sender::new(false),
        })
    }

    /// Applies `step` to the sends `matches(message, attempt)` selects, at most `times` of them
    /// (`None` = all).
    pub fn on(
        &self,
        matches: impl Fn(&Message, u32) -> bool + Send + Sync + 'static,
        step: Step,
        times: Option<u32>,
    ) {
        self.state.lock().unwrap().rules.push(Rule {
            matches: Box::new(matches),
            step,
            remaining: times,
        });
    }

    /// Applies `step` to the first `times` sends of message `id`.
    pub fn on_id(&self, id: Uuid, step: Step, times: Option<u32>) {
        self.on(move |m, _| m.id == id, step, times);
    }

    /// Lets every held acknowledgement (and later ones) through.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// What the broker stored, in its order.
    pub fn stored(&self) -> Vec<Stored> {
        self.state.lock().unwrap().stored.clone()
    }

    /// Sends of message `id` so far.
    pub fn attempts(&self, id: Uuid) -> u32 {
        self.state
            .lock()
            .unwrap()
            .attempts
            .get(&id)
            .copied()
            .unwrap_or(0)
    }

    fn step(&self, destination: &str, message: &Message) -> Step {
        let mut state = self.state.lock().unwrap();
        let attempt = {
            let count = state.attempts.entry(message.id).or_default();
            *count += 1;
            *count
        };
        let step = state
            .rules
            .iter_mut()
            .find(|rule| rule.remaining != Some(0) && (rule.matches)(message, attempt))
            .map_or(Step::Accept, |rule| {
                if let Some(left) = &mut rule.remaining {
                    *left -= 1;
                }
                rule.step.clone()
            });
        if !matches!(step, Step::Reject(_)) {
            state.stored.push(Stored {
                id: message.id,
                key: message.key.clone(),
                destination: destination.to_owned(),
                attempt,
            });
        }
        step
    }
}

impl Sink for ScriptedSink {
    fn send(&self, destination: &Destination, message: &Arc<Message>) -> Ack {
        let step = self.step(&destination.to_string(), message);
        let mut released = self.released.subscribe();
        Box::pin(async move {
            let receipt = Receipt::default();
            match step {
                Step::Accept => Ok(receipt),
                Step::Reject(error) | Step::StoreThenFail(error) => Err(error),
                Step::Slow(delay) => {
                    tokio::time::sleep(delay).await;
                    Ok(receipt)
                }
                Step::Hold => {
                    let _ = released.wait_for(|&r| r).await;
                    Ok(receipt)
                }
            }
        })
    }
}
