//! Where messages come from: the logical replication slot.

pub mod decode;
pub mod pgoutput;
mod replication;
pub mod setup;

pub use replication::{
    make_failover_slot, Remedy, ReplicationSource, SlotSettings, SourceError, SourceEvent,
};
