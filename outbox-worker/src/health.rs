//! `/health/ready`: whether the worker is delivering, as far as it can tell.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::sink::Sink;

/// Ready = the replication slot is held, nothing stalls delivery (a dead letter that cannot be
/// written), and every sink says it can deliver.
pub struct Health {
    streaming: AtomicBool,
    stalled: AtomicBool,
    sinks: Vec<Arc<dyn Sink>>,
}

impl Health {
    pub fn new(sinks: Vec<Arc<dyn Sink>>) -> Arc<Health> {
        Arc::new(Health {
            streaming: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            sinks,
        })
    }

    pub fn set_streaming(&self, streaming: bool) {
        self.streaming.store(streaming, Ordering::Release);
    }

    /// Delivery waits on something other than a broker (the dead-letter table).
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::Release);
    }

    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }

    pub fn ready(&self) -> bool {
        self.streaming.load(Ordering::Acquire)
            && !self.stalled.load(Ordering::Acquire)
            && self.sinks.iter().all(|s| s.is_ready())
    }
}
