//! Where messages come from: the logical replication slot.

pub mod decode;
pub mod pgoutput;
mod replication;

pub use replication::{
    make_failover_slot, ReplicationSource, SlotSettings, SourceError, SourceEvent,
};
