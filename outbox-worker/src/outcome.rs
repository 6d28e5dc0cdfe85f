//! What becomes of a message once it is decoded, for `run` and `replay` alike: sent on its route,
//! or dead-lettered (no route matches, or the broker refused it `max_attempts` times). A dead
//! letter is committed before the stream moves on, so the slot never passes it first.

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
}

/// Where a message went.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    Sent,
    DeadLettered,
    /// An exactly-once sink already has it, committed by an earlier run.
    AlreadyDelivered,
}

impl Parts<'_> {
    /// Sends `message` on its route, or dead-letters it when no route matches its queue.
    pub async fn route(&mut self, tx: TxId, message: Message) -> Result<Routed, NotWritten> {
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
        let started = std::time::SystemTime::now();
        let error = format!("no route matches queue {:?}", message.queue);
        tracing::error!(id = %message.id, queue = %message.queue, "{error}; dead-lettering it");
        delivery::count_dead_letter("", &message);
        self.dead_letters
            .write(&message, "(no route)", &error, 1)
            .await?;
        traces::send(traces::Send {
            system: "pg_outbox",
            sink: None,
            destination: &Destination::None,
            message: &message,
            started,
            attempts: 1,
            outcome: traces::Outcome::DeadLettered(&error),
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
