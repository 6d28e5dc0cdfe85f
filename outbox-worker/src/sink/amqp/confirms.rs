//! Publisher confirms, each matched to its own message. lapin gives a message the broker returned
//! (unroutable, sent `mandatory`) to whichever confirm it completes next, and it completes the
//! confirms of one ack covering many messages in hash order: the return can land on any message
//! of the batch, and the unroutable one would read as acknowledged. So the returned message's id
//! says which message it was, and confirms are settled in batches of all that have completed.
//!
//! Why that decides every message: the broker sends a message's return before its ack, and lapin
//! completes confirms one after another, each taking the oldest waiting return. A confirm that
//! came back with no return found none waiting, so its own return, if any, went to a confirm
//! completed before it, which is already in hand here (same batch or an earlier one). A confirm
//! that came back with another message's return proves nothing about its own: its return may
//! still be waiting behind that one. It is sent again (at least once allows a duplicate; losing
//! it does not), and the unroutable message returns again.

use std::collections::HashMap;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use lapin::publisher_confirm::Confirmation;
use tokio::sync::oneshot;

use crate::sink::SinkError;

/// One publish's outcome from lapin, before it is matched with the broker's returns.
pub struct Settled {
    /// The message id, as sent in the `message_id` property.
    pub id: String,
    pub ack: oneshot::Sender<Result<(), SinkError>>,
    /// The broker's answer, or why the publish failed.
    pub result: Result<Confirmation, SinkError>,
}

#[derive(Default)]
pub struct Confirms {
    pending: FuturesUnordered<BoxFuture<'static, Settled>>,
    /// Ids of messages the broker returned, with its reason, until their own confirm is settled.
    returned: HashMap<String, String>,
}

impl Confirms {
    pub fn push(&mut self, publish: BoxFuture<'static, Settled>) {
        self.pending.push(publish);
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Waits for a confirm, then settles it with every other that has completed.
    pub async fn settle_next(&mut self) {
        let Some(first) = self.pending.next().await else {
            return std::future::pending().await;
        };
        let mut batch = vec![first];
        while let Some(Some(settled)) = self.pending.next().now_or_never() {
            batch.push(settled);
        }
        self.settle(batch);
    }

    /// Answers each message of `batch`: unroutable if the broker returned its id, whichever
    /// confirm carried the return.
    pub fn settle(&mut self, batch: Vec<Settled>) {
        for settled in &batch {
            if let Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r))) = &settled.result {
                let id = r
                    .properties
                    .message_id()
                    .as_ref()
                    .map_or_else(|| settled.id.clone(), |id| id.as_str().to_owned());
                self.returned
                    .insert(id, format!("{} {}", r.reply_code, r.reply_text));
            }
        }
        for settled in batch {
            let returned = self.returned.remove(&settled.id);
            let outcome = match (settled.result, returned) {
                (Err(e), _) => Err(e),
                (Ok(_), Some(reason)) => Err(SinkError::Permanent(format!(
                    "amqp: unroutable, returned by the broker: {reason}"
                ))),
                (Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_))), None) => {
                    Err(SinkError::Transient(
                        "amqp: the broker's confirm came with another message's return, so this \
                         one's own return may be still to come; sending it again"
                            .into(),
                    ))
                }
                (Ok(Confirmation::Nack(_)), None) => Err(SinkError::Transient(
                    "amqp: the broker nacked the message".into(),
                )),
                (Ok(_), None) => Ok(()),
            };
            let _ = settled.ack.send(outcome);
        }
        // A return whose message failed on a closed channel is not claimed by anyone else.
        if self.pending.is_empty() {
            self.returned.clear();
        }
    }
}
