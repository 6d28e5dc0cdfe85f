//! Publisher confirms, each matched to its own message. lapin gives a message the broker returned
//! (unroutable, sent `mandatory`) to whichever confirm it completes next, and it completes the
//! confirms of one ack covering many messages in hash order: the return can land on any confirm,
//! and the unroutable message's own confirm would read as acknowledged. So the returned message's
//! id says which message it was.
//!
//! Why a whole batch decides every message of it: the sink puts a batch on the channel only when
//! every confirm of the batch before is complete, and answers a batch only when every confirm of
//! it is complete ([`settle`]). The broker sends a message's return before its ack, and lapin hands
//! each return it holds to the next confirm it completes, so a message's return is carried by a
//! confirm completed no later than its own: one of its own batch, which is all in hand. No
//! inference from the order in which tasks are woken (0.2.1 settled at "quiet points" so inferred,
//! and lost a message when a confirm carrying a return was woken late).

use std::collections::HashMap;

use tokio::sync::oneshot;

use crate::sink::SinkError;

/// The broker's answer to one publish.
#[derive(Debug)]
pub struct Confirmed {
    pub ack: bool,
    /// The return lapin handed to this confirm: the returned message's id (from its `message_id`
    /// property; `None` if it had none) and the broker's reason. Often another message's.
    pub returned: Option<(Option<String>, String)>,
}

/// One publish's outcome from lapin, before it is matched with the broker's returns.
pub struct Settled {
    /// The message id, as sent in the `message_id` property.
    pub id: String,
    pub ack: oneshot::Sender<Result<(), SinkError>>,
    /// The broker's answer, or why the publish failed.
    pub result: Result<Confirmed, SinkError>,
}

/// Answers each message of a batch whose confirms are all complete (nothing else was in flight on
/// its channel): unroutable if the broker returned its id, whichever confirm carried the return.
pub fn settle(batch: Vec<Settled>) {
    let mut returned: HashMap<String, String> = HashMap::new();
    for settled in &batch {
        if let Ok(Confirmed {
            returned: Some((id, reason)),
            ..
        }) = &settled.result
        {
            // A return without a message id can only be the confirm's own message's: every
            // message is sent with its id.
            let id = id.clone().unwrap_or_else(|| settled.id.clone());
            returned.insert(id, reason.clone());
        }
    }
    for settled in batch {
        let own_return = returned.remove(&settled.id);
        let outcome = match (settled.result, own_return) {
            (Err(e), _) => Err(e),
            (Ok(_), Some(reason)) => Err(SinkError::Permanent(format!(
                "amqp: unroutable, returned by the broker: {reason}"
            ))),
            (Ok(Confirmed { ack: false, .. }), None) => Err(SinkError::Transient(
                "amqp: the broker nacked the message".into(),
            )),
            (Ok(Confirmed { ack: true, .. }), None) => Ok(()),
        };
        let _ = settled.ack.send(outcome);
    }
    for (id, reason) in returned {
        // Every return precedes its own message's ack, so it is one of this batch's.
        tracing::warn!(%id, %reason, "amqp: a return for no message of the batch");
    }
}

#[cfg(test)]
mod tests {
    use rand::seq::SliceRandom;
    use rand::Rng;

    use super::*;

    type Outcome = oneshot::Receiver<Result<(), SinkError>>;

    fn settled(id: &str, result: Result<Confirmed, SinkError>) -> (Settled, Outcome) {
        let (ack, outcome) = oneshot::channel();
        let settled = Settled {
            id: id.to_owned(),
            ack,
            result,
        };
        (settled, outcome)
    }

    #[allow(clippy::unnecessary_wraps)] // the confirm's type: Ok as lapin's acks are
    fn acked(returned: Option<&str>) -> Result<Confirmed, SinkError> {
        Ok(Confirmed {
            ack: true,
            returned: returned.map(|id| (Some(id.to_owned()), "312 NO_ROUTE".to_owned())),
        })
    }

    /// lapin's rule, over one batch: the broker sends each unroutable message's return before its
    /// ack, acks cover runs of messages, and lapin completes the confirms of one ack in any order,
    /// each taking the oldest return waiting. Exactly the unroutable messages are refused, the
    /// others delivered, whichever confirm carried whose return.
    #[test]
    fn each_message_is_answered_by_its_own_return_whichever_confirm_carried_it() {
        let mut rng = rand::rng();
        for round in 0..2_000 {
            let total = rng.random_range(1..60);
            let unroutable: Vec<bool> = (0..total).map(|_| rng.random_bool(0.2)).collect();
            let mut results: Vec<Option<Result<Confirmed, SinkError>>> =
                (0..total).map(|_| None).collect();
            let mut waiting = std::collections::VecDeque::new();
            let mut next = 0;
            while next < total {
                let last = rng.random_range(next..total);
                let mut tags: Vec<usize> = (next..=last).collect();
                for &tag in &tags {
                    if unroutable[tag] {
                        waiting.push_back(format!("m{tag}"));
                    }
                }
                tags.shuffle(&mut rng);
                for tag in tags {
                    results[tag] = Some(acked(waiting.pop_front().as_deref()));
                }
                next = last + 1;
            }
            let (batch, mut outcomes): (Vec<_>, Vec<_>) = results
                .into_iter()
                .enumerate()
                .map(|(i, r)| settled(&format!("m{i}"), r.unwrap()))
                .unzip();
            settle(batch);
            for (i, outcome) in outcomes.iter_mut().enumerate() {
                let outcome = outcome.try_recv().expect("answered");
                if unroutable[i] {
                    assert!(
                        matches!(outcome, Err(SinkError::Permanent(_))),
                        "round {round}: unroutable m{i} read as {outcome:?}"
                    );
                } else {
                    assert!(outcome.is_ok(), "round {round}: routable m{i}: {outcome:?}");
                }
            }
        }
    }

    #[test]
    fn nacks_and_failed_publishes_are_sent_again() {
        let (nacked, mut nack_outcome) = settled(
            "n",
            Ok(Confirmed {
                ack: false,
                returned: None,
            }),
        );
        let (failed, mut failed_outcome) =
            settled("f", Err(SinkError::Transient("channel closed".into())));
        settle(vec![nacked, failed]);
        assert!(matches!(
            nack_outcome.try_recv(),
            Ok(Err(SinkError::Transient(_)))
        ));
        assert!(matches!(
            failed_outcome.try_recv(),
            Ok(Err(SinkError::Transient(_)))
        ));
    }
}
