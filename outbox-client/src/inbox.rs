use crate::{Error, InboxMessage};
use tokio_postgres::{Client, Transaction};

/// Exactly-once effects for one consumer: a message id is processed at most once, in the same
/// transaction as the handler's writes (`outbox.try_mark_processed`).
#[derive(Debug, Clone)]
pub struct Inbox {
    consumer: String,
}

/// What [`Inbox::process_once`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed<T> {
    /// First delivery: the handler ran and its transaction committed.
    Done(T),
    /// Seen before: the handler did not run.
    Duplicate,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError<E> {
    /// The handler failed: its writes and the mark were rolled back, so a redelivery retries it.
    #[error("handler failed: {0}")]
    Handler(E),
    #[error(transparent)]
    Outbox(#[from] Error),
}

impl Inbox {
    /// `consumer` names this consumer (e.g. `"billing.order-placed"`); each consumer
    /// de-duplicates independently.
    pub fn new(consumer: impl Into<String>) -> Self {
        Inbox {
            consumer: consumer.into(),
        }
    }

    /// Opens a transaction, marks the message processed, runs `handler` in that transaction and
    /// commits. A duplicate skips the handler; a handler error rolls back its writes and the mark.
    /// Concurrent deliveries of the same id run the handler once: the second waits for the first.
    ///
    /// `message` is its `outbox-id` (`&str`) or, to continue its trace with the `otel` feature, the
    /// [`crate::received::Received`] read from the broker message: the handler then runs in a
    /// `process` span linked to the message's creation context.
    pub async fn process_once<M, T, E, F>(
        &self,
        client: &mut Client,
        message: &M,
        handler: F,
    ) -> Result<Processed<T>, ProcessError<E>>
    where
        M: InboxMessage + ?Sized,
        F: AsyncFnOnce(&Transaction<'_>) -> Result<T, E>,
    {
        #[cfg(feature = "otel")]
        {
            use tracing::Instrument;
            let span = crate::trace::process_span(&self.consumer, message);
            let outcome = self
                .process(client, &message.message_id(), handler)
                .instrument(span.clone())
                .await;
            let error = match &outcome {
                Err(ProcessError::Handler(_)) => Some("the handler failed".to_owned()),
                Err(ProcessError::Outbox(e)) => Some(e.to_string()),
                Ok(_) => None,
            };
            let duplicate = matches!(outcome, Ok(Processed::Duplicate));
            crate::trace::processed(&span, duplicate, error);
            outcome
        }
        #[cfg(not(feature = "otel"))]
        self.process(client, &message.message_id(), handler).await
    }

    async fn process<T, E, F>(
        &self,
        client: &mut Client,
        message_id: &str,
        handler: F,
    ) -> Result<Processed<T>, ProcessError<E>>
    where
        F: AsyncFnOnce(&Transaction<'_>) -> Result<T, E>,
    {
        let tx = client.transaction().await.map_err(Error::from)?;
        let first: bool = tx
            .query_one(
                "SELECT outbox.try_mark_processed($1, $2)",
                &[&self.consumer, &message_id],
            )
            .await
            .map_err(Error::from)?
            .get(0);
        if !first {
            tx.rollback().await.map_err(Error::from)?;
            return Ok(Processed::Duplicate);
        }
        match handler(&tx).await {
            Ok(value) => {
                tx.commit().await.map_err(Error::from)?;
                Ok(Processed::Done(value))
            }
            Err(e) => {
                tx.rollback().await.map_err(Error::from)?;
                Err(ProcessError::Handler(e))
            }
        }
    }

    /// Forgets marks older than `older_than` for this consumer; returns how many. Keep marks longer
    /// than the longest time a message can be redelivered.
    pub async fn purge(
        &self,
        client: &Client,
        older_than: std::time::Duration,
    ) -> Result<i64, Error> {
        let seconds = older_than.as_secs_f64();
        let row = client
            .query_one(
                "SELECT outbox.purge_processed(pg_catalog.make_interval(secs => $1), $2)",
                &[&seconds, &self.consumer],
            )
            .await?;
        Ok(row.get(0))
    }
}
