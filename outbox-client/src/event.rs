use crate::Headers;
use serde::Serialize;

/// A domain event: its type says where it goes, so services publish events, not strings.
///
/// ```
/// # use outbox_client::{Event, Headers};
/// #[derive(serde::Serialize)]
/// struct PaymentCaptured { payment_id: String, order_id: i64 }
///
/// impl Event for PaymentCaptured {
///     const QUEUE: &'static str = "payments";
///     fn key(&self) -> Option<String> { Some(self.order_id.to_string()) }
///     fn headers(&self) -> Headers { Headers::new().with("event-type", "PaymentCaptured") }
/// }
/// ```
pub trait Event: Serialize {
    /// The queue (Kafka topic / AMQP routing key) of this event type.
    const QUEUE: &'static str;

    /// The ordering key: events with the same key are delivered in commit order.
    fn key(&self) -> Option<String> {
        None
    }

    fn headers(&self) -> Headers {
        Headers::new()
    }
}
