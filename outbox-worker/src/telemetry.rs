//! Every metric the worker exports: its name, defined once, and its description, given once
//! (`# HELP` on `/metrics`).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

pub const PUBLISHED: &str = "outbox_messages_published_total";
pub const COMMIT_TO_ACK: &str = "outbox_commit_to_ack_seconds";
pub const SEND_FAILURES: &str = "outbox_send_failures_total";
pub const RETRIES: &str = "outbox_retries_total";
pub const DEAD_LETTERED: &str = "outbox_messages_dead_lettered_total";
pub const QUARANTINED: &str = "outbox_messages_quarantined_total";
pub const IN_FLIGHT: &str = "outbox_in_flight";
pub const IN_FLIGHT_BYTES: &str = "outbox_in_flight_bytes";
pub const CONFIRMED_LSN: &str = "outbox_confirmed_lsn";
pub const SLOT_LAG: &str = "outbox_slot_lag_bytes";
pub const SKIPPED: &str = "outbox_messages_skipped_total";
pub const KAFKA_TRANSACTIONS: &str = "outbox_kafka_transactions_total";

/// Registers the descriptions with the installed recorder.
pub fn describe() {
    describe_counter!(
        PUBLISHED,
        "Messages the broker acknowledged, by sink and queue"
    );
    describe_histogram!(
        COMMIT_TO_ACK,
        Unit::Seconds,
        "From the publishing transaction's commit to the broker's acknowledgement, by sink"
    );
    describe_counter!(
        SEND_FAILURES,
        "Failed send attempts, by sink, queue and kind (transient or permanent)"
    );
    describe_counter!(RETRIES, "Messages sent again after a failure, by sink");
    describe_counter!(
        DEAD_LETTERED,
        "Messages written to outbox.dead_letters instead of being delivered, by sink and queue"
    );
    describe_counter!(
        QUARANTINED,
        "Messages outbox.publish did not write (forged or undecodable), kept in outbox.dead_letters"
    );
    describe_counter!(
        SKIPPED,
        "Messages of the stream not sent again, by reason: already_delivered (an exactly-once \
         sink has them committed) or dead_lettered_earlier (a run dead-lettered them before the \
         slot moved past them)"
    );
    describe_counter!(
        KAFKA_TRANSACTIONS,
        "Kafka transactions of exactly-once sinks, by sink and outcome (committed or aborted)"
    );
    describe_gauge!(IN_FLIGHT, "Messages sent and not yet acknowledged");
    describe_gauge!(
        IN_FLIGHT_BYTES,
        "Bytes of the messages sent and not yet acknowledged (delivery.max_in_flight_bytes)"
    );
    describe_gauge!(
        CONFIRMED_LSN,
        "The position up to which the slot has been confirmed"
    );
    describe_gauge!(
        SLOT_LAG,
        Unit::Bytes,
        "WAL between the server's current position and the slot's confirmed position"
    );
}
