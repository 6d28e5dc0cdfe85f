//! Publishes left without an answer by a channel that closed under them. lapin fails the pending
//! confirms of a channel as it closes, but a publish that races the close can register its
//! confirm after that (its frames then go out after close-ok, and RabbitMQ closes the connection
//! for it): nothing ever answers it. A batch waits for every confirm of it, so one such publish
//! held every queue back for good (found by a hostile audit: topic-permission refusals under CPU
//! contention). Each channel a batch publishes on is watched; once it has been closed for
//! [`GRACE`], its publishes still waiting give up, and their messages are sent again.

use std::time::Duration;

use tokio::time::Instant;

use futures::future::{FutureExt, Shared};
use lapin::Channel;
use tokio::sync::oneshot;

/// How long a closed channel's publishes may still wait: lapin answers the others at once.
const GRACE: Duration = Duration::from_secs(2);

/// Resolves when the publish's channel has been closed for [`GRACE`].
pub type Abandoned = Shared<oneshot::Receiver<()>>;

/// What is watched of a channel (a trait so that the rule can be tested without a broker).
pub trait Watchable: Clone {
    fn id(&self) -> u16;
    fn is_open(&self) -> bool;
}

impl Watchable for Channel {
    fn id(&self) -> u16 {
        Channel::id(self)
    }

    fn is_open(&self) -> bool {
        self.status().connected()
    }
}

struct Watched<C> {
    channel: C,
    closed_since: Option<Instant>,
    abandon: Option<oneshot::Sender<()>>,
    abandoned: Abandoned,
}

/// The channels one batch publishes on.
pub struct Orphans<C = Channel>(Vec<Watched<C>>);

impl<C> Default for Orphans<C> {
    fn default() -> Self {
        Orphans(Vec::new())
    }
}

impl<C: Watchable> Orphans<C> {
    /// What a publish on `channel` waits on besides its confirm.
    pub fn watch(&mut self, channel: &C) -> Abandoned {
        if let Some(watched) = self.0.iter().find(|w| w.channel.id() == channel.id()) {
            return watched.abandoned.clone();
        }
        let (abandon, abandoned) = oneshot::channel();
        let abandoned = abandoned.shared();
        self.0.push(Watched {
            channel: channel.clone(),
            closed_since: None,
            abandon: Some(abandon),
            abandoned: abandoned.clone(),
        });
        abandoned
    }

    /// Looks at each channel (called about every second while the batch waits): the publishes of
    /// one closed for [`GRACE`] give up.
    pub fn check(&mut self) {
        for watched in &mut self.0 {
            if watched.channel.is_open() {
                continue;
            }
            let since = *watched.closed_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= GRACE {
                if let Some(abandon) = watched.abandon.take() {
                    tracing::warn!(
                        channel = watched.channel.id(),
                        "amqp: publishes on a closed channel had no answer; sending them again"
                    );
                    let _ = abandon.send(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    #[derive(Clone)]
    struct Fake(u16, Arc<AtomicBool>);

    impl Watchable for Fake {
        fn id(&self) -> u16 {
            self.0
        }

        fn is_open(&self) -> bool {
            self.1.load(Ordering::SeqCst)
        }
    }

    /// A publish whose confirm nobody will answer gives up once its channel has been closed for
    /// GRACE; one on a channel still open keeps waiting.
    #[tokio::test(start_paused = true)]
    async fn a_closed_channels_publishes_give_up_after_the_grace_and_no_others() {
        let (open, closed) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicBool::new(true)),
        );
        let mut orphans = Orphans::default();
        let stuck = orphans.watch(&Fake(1, closed.clone()));
        let same_channel = orphans.watch(&Fake(1, closed.clone()));
        let other = orphans.watch(&Fake(2, open.clone()));
        closed.store(false, Ordering::SeqCst);
        orphans.check();
        assert!(
            stuck.clone().now_or_never().is_none(),
            "not before the grace"
        );
        tokio::time::advance(GRACE).await;
        orphans.check();
        assert!(stuck.now_or_never().is_some());
        assert!(same_channel.now_or_never().is_some());
        assert!(other.now_or_never().is_none(), "its channel is open");
    }
}
