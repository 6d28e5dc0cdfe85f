//! Publisher confirms, each matched to its own message. lapin gives a message the broker returned
//! (unroutable, sent `mandatory`) to whichever confirm it completes next, and it completes the
//! confirms of one ack covering many messages in hash order: the return can land on any message
//! of the batch, and the unroutable one would read as acknowledged. So the returned message's id
//! says which message it was.
//!
//! Why that decides every message: the broker sends a message's return before its ack, and lapin
//! completes confirms one after another on its own thread, each taking the oldest waiting return.
//! A confirm that came back with no return found none waiting, so its own return, if any, went to
//! a confirm that lapin completed before it. That confirm must be in hand before this one is
//! settled: confirms are settled only at a quiet point, when every confirm lapin completed before
//! the last one collected has been collected too ([`Confirms::collect`]). A confirm that came back
//! with another message's return proves nothing about its own: its return may still be waiting
//! behind that one. It is sent again (at least once allows a duplicate; losing it does not), and
//! the unroutable message returns again.
//!
//! One more case breaks "lapin wakes it": a publish still waiting for its frames to be written
//! (`basic_publish` resolves only then) does not wait on its confirm yet, so lapin can complete
//! that confirm, handing it another message's return, without waking anyone. Seen: a retried
//! unroutable message settled as delivered while such a publish held its return. So no point is
//! quiet while a publish is still writing ([`Confirms::writing`]); its write completing wakes it.

use std::collections::HashMap;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;

use crate::sink::SinkError;

/// How many times one poll looks again for completed confirms before it yields to the runtime.
const LOOKS_PER_POLL: usize = 64;

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

#[derive(Default)]
pub struct Confirms {
    pending: FuturesUnordered<BoxFuture<'static, Settled>>,
    /// Completed confirms not yet settled: settling waits for a quiet point.
    collected: Vec<Settled>,
    /// Ids of messages the broker returned, with its reason, until their own confirm is settled.
    returned: HashMap<String, String>,
    /// Publishes whose frames are not written yet ([`Writing`]).
    writing: Arc<AtomicUsize>,
}

/// Held by a publish until `basic_publish` returned its confirm: while any is held, no point is
/// quiet.
pub struct Writing(Arc<AtomicUsize>);

impl Drop for Writing {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A waker that notes it was woken, and passes the wake on.
struct Noting {
    woken: AtomicBool,
    inner: Waker,
}

impl Wake for Noting {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.inner.wake_by_ref();
    }
}

impl Confirms {
    /// Taken before a publish starts writing, dropped once its confirm is awaited.
    pub fn writing(&self) -> Writing {
        self.writing.fetch_add(1, Ordering::SeqCst);
        Writing(self.writing.clone())
    }

    pub fn push(&mut self, publish: BoxFuture<'static, Settled>) {
        self.pending.push(publish);
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.collected.is_empty()
    }

    /// Waits for confirms, then settles every one completed so far.
    pub async fn settle_next(&mut self) {
        poll_fn(|cx| self.collect(cx)).await;
        let batch = std::mem::take(&mut self.collected);
        self.settle(batch);
    }

    /// Ready when at least one confirm is collected and none is left that lapin completed before
    /// it: the pending set gave nothing more in a poll that woke nothing. lapin's thread wakes a
    /// confirm's task before it completes the next confirm, so once a confirm is seen complete,
    /// every confirm completed before it is in `FuturesUnordered`'s queue, and a poll that finds
    /// that queue empty has yielded them all. (It may also answer "pending" with confirms still
    /// queued, when lapin's thread is mid-way through queueing another or when it yields to be
    /// fair; it then wakes itself, which is how those cases are told apart from a quiet point.)
    fn collect(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut quiet = false;
        for _ in 0..LOOKS_PER_POLL {
            let noting = Arc::new(Noting {
                woken: AtomicBool::new(false),
                inner: cx.waker().clone(),
            });
            let waker = Waker::from(noting.clone());
            match self
                .pending
                .poll_next_unpin(&mut Context::from_waker(&waker))
            {
                Poll::Ready(Some(settled)) => self.collected.push(settled),
                Poll::Ready(None) => {
                    quiet = true;
                    break;
                }
                Poll::Pending if noting.woken.load(Ordering::SeqCst) => {}
                Poll::Pending => {
                    quiet = true;
                    break;
                }
            }
        }
        // A publish still writing may hold a completed confirm nobody was woken for; its write
        // completing wakes this task.
        if quiet && self.writing.load(Ordering::SeqCst) > 0 {
            return Poll::Pending;
        }
        if quiet && !self.collected.is_empty() {
            return Poll::Ready(());
        }
        if !quiet {
            // Not quiet after many looks: let other tasks run, then look again.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Answers each message of `batch`: unroutable if the broker returned its id, whichever
    /// confirm carried the return.
    pub fn settle(&mut self, batch: Vec<Settled>) {
        for settled in &batch {
            if let Ok(Confirmed {
                returned: Some((id, reason)),
                ..
            }) = &settled.result
            {
                let id = id.clone().unwrap_or_else(|| settled.id.clone());
                self.returned.insert(id, reason.clone());
            }
        }
        for settled in batch {
            let returned = self.returned.remove(&settled.id);
            tracing::debug!(
                id = %settled.id,
                own_return = returned.is_some(),
                carried = ?settled.result.as_ref().ok().map(|c| (c.ack, c.returned.as_ref().map(|r| r.0.clone()))),
                pending = self.pending.len(),
                "confirm settled"
            );
            let outcome = match (settled.result, returned) {
                (Err(e), _) => Err(e),
                (Ok(_), Some(reason)) => Err(SinkError::Permanent(format!(
                    "amqp: unroutable, returned by the broker: {reason}"
                ))),
                (
                    Ok(Confirmed {
                        returned: Some(_), ..
                    }),
                    None,
                ) => Err(SinkError::Transient(
                    "amqp: the broker's confirm came with another message's return, so this \
                     one's own return may be still to come; sending it again"
                        .into(),
                )),
                (Ok(Confirmed { ack: false, .. }), None) => Err(SinkError::Transient(
                    "amqp: the broker nacked the message".into(),
                )),
                (Ok(Confirmed { ack: true, .. }), None) => Ok(()),
            };
            let _ = settled.ack.send(outcome);
        }
        // A return whose message is no longer in flight (it failed on a closed channel, or was
        // sent again) is claimed by no one.
        if self.is_empty() {
            self.returned.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::Mutex;

    use futures::FutureExt;
    use rand::seq::SliceRandom;
    use rand::Rng;

    use super::*;

    type Confirm = oneshot::Sender<Result<Confirmed, SinkError>>;
    type Outcome = oneshot::Receiver<Result<(), SinkError>>;

    /// A publish whose frames are written when `sent` fires and whose confirm is `confirm`'s.
    fn publish(
        id: &str,
        sent: Option<oneshot::Receiver<()>>,
    ) -> (BoxFuture<'static, Settled>, Confirm, Outcome) {
        let (confirm, confirmed) = oneshot::channel();
        let (ack, outcome) = oneshot::channel();
        let id = id.to_owned();
        let future = async move {
            if let Some(sent) = sent {
                let _ = sent.await;
            }
            let result = confirmed.await.expect("confirmed");
            Settled { id, ack, result }
        };
        (future.boxed(), confirm, outcome)
    }

    /// A publish whose task wakes itself `busy` times before it waits for its confirm (a write
    /// still in progress, say): `FuturesUnordered` yields to be fair when two such tasks are met.
    fn busy_publish(
        id: &str,
        busy: Arc<AtomicUsize>,
    ) -> (BoxFuture<'static, Settled>, Confirm, Outcome) {
        let (inner, confirm, outcome) = publish(id, None);
        let future = async move {
            poll_fn(|cx| {
                if busy.load(Ordering::SeqCst) == 0 {
                    return Poll::Ready(());
                }
                busy.fetch_sub(1, Ordering::SeqCst);
                cx.waker().wake_by_ref();
                Poll::Pending
            })
            .await;
            inner.await
        };
        (future.boxed(), confirm, outcome)
    }

    #[allow(clippy::unnecessary_wraps)] // the confirm's type: Ok as lapin's acks are
    fn acked(returned: Option<&str>) -> Result<Confirmed, SinkError> {
        Ok(Confirmed {
            ack: true,
            returned: returned.map(|id| (Some(id.to_owned()), "312 NO_ROUTE".to_owned())),
        })
    }

    /// Polls `settle_next` once, as the publisher task's `select!` does (a fresh future each time).
    fn poll_once(confirms: &mut Confirms) -> Poll<()> {
        let waker = futures::task::noop_waker();
        let mut settle = Box::pin(confirms.settle_next());
        settle.as_mut().poll(&mut Context::from_waker(&waker))
    }

    /// 0.2.1 settled the confirms `FuturesUnordered` gave before it first answered "pending". It
    /// answers so when it meets two tasks that woke themselves, with completed confirms still
    /// queued behind them: here x's confirm (no return) came out, while c's, which lapin completed
    /// first and which carries x's return, stayed queued. x read as delivered: lost.
    #[test]
    fn a_return_carried_by_a_confirm_still_queued_is_not_missed() {
        let mut confirms = Confirms::default();
        let (x_sent, sent) = oneshot::channel();
        let (x, x_confirm, mut x_outcome) = publish("x", Some(sent));
        let (c, c_confirm, mut c_outcome) = publish("c", None);
        let busy = Arc::new(AtomicUsize::new(1_000));
        let (d1, d1_confirm, mut d1_outcome) = busy_publish("d1", busy.clone());
        let (d2, d2_confirm, mut d2_outcome) = busy_publish("d2", busy);
        for publish in [x, c, d1, d2] {
            confirms.push(publish);
        }
        assert!(poll_once(&mut confirms).is_pending());
        // x's frames are written: its task is queued, behind d1 and d2.
        x_sent.send(()).unwrap();
        assert!(poll_once(&mut confirms).is_pending());
        // One ack for c and x: lapin completes c first, which takes x's waiting return, then x.
        c_confirm.send(acked(Some("x"))).unwrap();
        x_confirm.send(acked(None)).unwrap();
        while poll_once(&mut confirms).is_pending() {
            assert!(x_outcome.try_recv().is_err(), "x settled before c was seen");
        }
        assert!(
            matches!(x_outcome.try_recv(), Ok(Err(SinkError::Permanent(_)))),
            "x was returned by the broker: it must be reported unroutable"
        );
        assert!(
            matches!(c_outcome.try_recv(), Ok(Err(SinkError::Transient(_)))),
            "c's confirm carried x's return: c's own return may still come, so it is sent again"
        );
        d1_confirm.send(acked(None)).unwrap();
        d2_confirm.send(acked(None)).unwrap();
        while poll_once(&mut confirms).is_pending() {}
        assert_eq!(d1_outcome.try_recv(), Ok(Ok(())));
        assert_eq!(d2_outcome.try_recv(), Ok(Ok(())));
        assert!(confirms.is_empty());
    }

    /// Seen end to end: c's publish is still writing (waiting on `basic_publish`, not on its
    /// confirm) when lapin completes c's confirm with x's return, and x's with none. Nothing wakes
    /// c; x is woken. Settling x then would read it as delivered: it must wait for c's write.
    #[test]
    fn a_confirm_completed_while_its_publish_is_still_writing_is_waited_for() {
        let mut confirms = Confirms::default();
        let (x, x_confirm, mut x_outcome) = publish("x", None);
        let (c_written, written) = oneshot::channel::<()>();
        let writing = confirms.writing();
        let (c_inner, c_confirm, mut c_outcome) = publish("c", None);
        let c = async move {
            let _ = written.await;
            drop(writing);
            c_inner.await
        };
        confirms.push(x);
        confirms.push(c.boxed());
        assert!(poll_once(&mut confirms).is_pending());
        c_confirm.send(acked(Some("x"))).unwrap();
        x_confirm.send(acked(None)).unwrap();
        for _ in 0..10 {
            assert!(poll_once(&mut confirms).is_pending());
            assert!(
                x_outcome.try_recv().is_err(),
                "x settled while c was writing"
            );
        }
        c_written.send(()).unwrap();
        while poll_once(&mut confirms).is_pending() {}
        assert!(
            matches!(x_outcome.try_recv(), Ok(Err(SinkError::Permanent(_)))),
            "x was returned by the broker: it must be reported unroutable"
        );
        assert!(matches!(
            c_outcome.try_recv(),
            Ok(Err(SinkError::Transient(_)))
        ));
        assert!(confirms.is_empty());
    }

    /// lapin on its own thread: multiple acks completing confirms in any order, each taking the
    /// oldest waiting return, while the publisher task settles them. No unroutable message may
    /// ever be settled as delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_unroutable_message_reads_as_delivered_whatever_the_completion_order() {
        for round in 0..200 {
            let mut confirms = Confirms::default();
            let mut rng = rand::rng();
            let total = rng.random_range(1..60);
            let unroutable: Vec<bool> = (0..total).map(|_| rng.random_bool(0.2)).collect();
            let mut lapin = Vec::new();
            let mut outcomes = Vec::new();
            let busy = Arc::new(AtomicUsize::new(rng.random_range(0..50)));
            for i in 0..total {
                let id = format!("m{i}");
                let (future, confirm, outcome) = if rng.random_bool(0.3) {
                    busy_publish(&id, busy.clone())
                } else {
                    publish(&id, None)
                };
                confirms.push(future);
                lapin.push(Some(confirm));
                outcomes.push(outcome);
            }
            let lapin = Arc::new(Mutex::new(lapin));
            let broker = {
                let lapin = lapin.clone();
                let unroutable = unroutable.clone();
                std::thread::spawn(move || {
                    let mut rng = rand::rng();
                    let mut waiting = std::collections::VecDeque::new();
                    let mut next = 0;
                    while next < total {
                        // Returns come before their message's ack; one ack covers up to `last`.
                        let last = rng.random_range(next..total);
                        let mut tags: Vec<usize> = (next..=last).collect();
                        for &tag in &tags {
                            if unroutable[tag] {
                                waiting.push_back(format!("m{tag}"));
                            }
                        }
                        tags.shuffle(&mut rng);
                        for tag in tags {
                            let returned = waiting.pop_front();
                            let confirm = lapin.lock().unwrap()[tag].take().unwrap();
                            let _ = confirm.send(acked(returned.as_deref()));
                        }
                        next = last + 1;
                        if rng.random_bool(0.3) {
                            std::thread::yield_now();
                        }
                    }
                })
            };
            while !confirms.is_empty() {
                confirms.settle_next().await;
            }
            broker.join().unwrap();
            for (i, outcome) in outcomes.iter_mut().enumerate() {
                let outcome = outcome.try_recv().expect("settled");
                if unroutable[i] {
                    assert!(
                        outcome.is_err(),
                        "round {round}: unroutable m{i} read as delivered"
                    );
                }
            }
        }
    }
}
