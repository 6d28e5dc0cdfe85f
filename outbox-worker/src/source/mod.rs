//! Where messages come from: the logical replication slot.

pub mod decode;
pub mod pgoutput;
mod replication;
pub mod setup;
mod tls;

pub use replication::{Quarantined, ReplicationSource, SlotSettings, SourceError, SourceEvent};
