//! What becomes of a message once it is decoded, for `run` and `replay` alike: sent on its route,
//! or dead-lettered (no route matches, or the broker refused it `max_attempts` times). A dead
//! letter is committed before the stream moves on, so the slot never passes it first.

use crate::claims::{Decision, Ownership};
use crate::dead_letters::{DeadLetters, NotWritten};
use crate::delivery::{self, Delivery, TxId, Undeliverable};
use crate::fatal::Fatal;
use crate::message::Message;
use crate::router::{Destination, Router};
use crate::{telemetry, traces};

/// What a stream (or a replay) works with, borrowed for its lifetime.
pub struct Parts<'a> {
    pub router: &'a mut Router,
    pub delivery: &'a mut Delivery,
    pub dead_letters: &'a mut DeadLetters,
    /// Which queues this slot delivers ([`crate::claims`]).
    pub ownership: &'a mut Ownership,
}

/// Where a message went.
#[derive(Debug)]
pub enum Routed {
    Sent,
    DeadLettered,
    /// An exactly-once sink already has it, committed by an earlier run.
    AlreadyDelivered,
    /// Another slot delivers its queue.
    OtherSlot,
    /// Nowhere yet: its queue moved to this slot at `at` from slot `before`
    /// ([`crate::claims::Decision::AfterMove`]); route it again once that is settled.
    AfterMove {
        message: Box<Message>,
        before: String,
        at: crate::lsn::Lsn,
    },
}

impl Parts<'_> {
    /// Sends `message` on its route, or dead-letters it when no route matches its queue.
    pub async fn route(&mut self, tx: TxId, message: Message) -> Result<Routed, NotWritten> {
        match self.ownership.decide(&message.queue, message.commit_lsn) {
            Decision::Deliver => {}
            Decision::AfterMove { before, at } => {
                return Ok(Routed::AfterMove {
                    message: Box::new(message),
                    before,
                    at,
                })
            }
            Decision::Skip => {
                metrics::counter!(telemetry::SKIPPED, "reason" => "other_slot").increment(1);
                return Ok(Routed::OtherSlot);
            }
            Decision::Unclaimed => {
                let error = format!(
                    "no slot delivers queue {:?}: no claim of outbox.queue_claims takes it and \
                     there is no catch-all slot",
                    message.queue
                );
                tracing::error!(id = %message.id, queue = %message.queue, "{error}; dead-lettering it");
                return self
                    .dead_letter_unrouted(&message, "(unclaimed)", &error)
                    .await;
            }
        }
        if self.dead_letters.written_earlier(&message) {
            tracing::info!(id = %message.id, queue = %message.queue,
                "dead-lettered by an earlier run before the slot moved past it; not sent again");
            metrics::counter!(telemetry::SKIPPED, "reason" => "dead_lettered_earlier").increment(1);
            return Ok(Routed::DeadLettered);
        }
        if let Some(route) = self.router.route(&message.queue) {
            if self.delivery.already_delivered(&route, &message) {
                tracing::debug!(id = %message.id, position = %message.position(),
                    "already committed in Kafka by an earlier run; not sent again");
                metrics::counter!(telemetry::SKIPPED, "reason" => "already_delivered").increment(1);
                return Ok(Routed::AlreadyDelivered);
            }
            self.delivery.send(tx, route, message);
            return Ok(Routed::Sent);
        }
        let error = format!("no route matches queue {:?}", message.queue);
        tracing::error!(id = %message.id, queue = %message.queue, "{error}; dead-lettering it");
        self.dead_letter_unrouted(&message, "(no route)", &error)
            .await
    }

    /// A message no sink is asked to deliver, set aside at once.
    async fn dead_letter_unrouted(
        &mut self,
        message: &Message,
        destination: &str,
        error: &str,
    ) -> Result<Routed, NotWritten> {
        let started = std::time::SystemTime::now();
        delivery::count_dead_letter("", message);
        self.dead_letters
            .write(message, destination, error, 1)
            .await?;
        traces::send(traces::Send {
            system: "pg_outbox",
            sink: None,
            destination: &Destination::None,
            message,
            started,
            attempts: 1,
            outcome: traces::Outcome::DeadLettered(error),
        });
        Ok(Routed::DeadLettered)
    }

    /// Handles what [`Delivery::progress`] returned: a message refused for good goes to the dead
    /// letters. Called from a `select!` branch's body, never raced: once the write started it
    /// finishes, so a dead letter cannot be dropped half way.
    pub async fn settle_one(
        &mut self,
        settled: Result<Option<Undeliverable>, Fatal>,
    ) -> Result<(), NotWritten> {
        let Some(u) = settled? else { return Ok(()) };
        let destination = format!("{}:{}", u.sink, u.destination);
        tracing::error!(
            id = %u.message.id, queue = %u.message.queue, destination, attempts = u.attempts,
            error = %u.error, "dead-lettering a message the broker refused"
        );
        self.dead_letters
            .write(&u.message, &destination, &u.error.to_string(), u.attempts)
            .await?;
        self.delivery.dead_lettered(&u);
        Ok(())
    }
}

/// A dead letter not written: `Ok(true)` when shutdown was requested meanwhile (stop; the message
/// stays unconfirmed), an error when a missing right stops the worker.
pub fn shutdown_requested<T>(written: Result<T, NotWritten>) -> anyhow::Result<bool> {
    match written {
        Ok(_) => Ok(false),
        Err(NotWritten::Shutdown) => Ok(true),
        Err(NotWritten::Fatal(fatal)) => Err(fatal.into()),
    }
}
