//! Reading what the worker put on a broker message: the outbox id (for [`crate::Inbox`]), the
//! queue, the creation time and the user headers.

use crate::contract::{HEADER_CREATED_AT, HEADER_ID, HEADER_QUEUE};
use crate::Headers;
use uuid::Uuid;

/// The outbox metadata of a message received from Kafka or RabbitMQ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// `outbox-id`: pass it to [`crate::Inbox::process_once`].
    pub id: Uuid,
    /// `outbox-queue`, when present.
    pub queue: Option<String>,
    /// `outbox-created-at` (RFC 3339), when present.
    pub created_at: Option<String>,
    /// Every header that is not an `outbox-*` header (`content-type` and `traceparent` included).
    pub headers: Headers,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceivedError {
    #[error("the message has no outbox-id: it was not produced by outbox-worker")]
    MissingId,
    #[error("outbox-id {0:?} is not a UUID")]
    InvalidId(String),
    #[error("header {0:?} is not valid UTF-8")]
    NotUtf8(String),
}

fn from_pairs<'a>(
    message_id: Option<&str>,
    pairs: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> Result<Received, ReceivedError> {
    let (mut id, mut queue, mut created_at) = (message_id.map(str::to_string), None, None);
    let mut headers = Headers::new();
    for (name, value) in pairs {
        let value = std::str::from_utf8(value.unwrap_or_default())
            .map_err(|_| ReceivedError::NotUtf8(name.into()))?;
        match name {
            HEADER_ID => id = Some(value.to_string()),
            HEADER_QUEUE => queue = Some(value.to_string()),
            HEADER_CREATED_AT => created_at = Some(value.to_string()),
            _ => headers = headers.with(name, value),
        }
    }
    let id = id.ok_or(ReceivedError::MissingId)?;
    let id = Uuid::parse_str(&id).map_err(|_| ReceivedError::InvalidId(id))?;
    Ok(Received {
        id,
        queue,
        created_at,
        headers,
    })
}

/// Reads the outbox metadata from the headers of a Kafka message.
#[cfg(feature = "kafka")]
pub fn from_kafka<M: rdkafka::Message>(message: &M) -> Result<Received, ReceivedError> {
    use rdkafka::message::Headers as _;
    let headers: Vec<_> = message
        .headers()
        .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
        .unwrap_or_default();
    from_pairs(None, headers.into_iter())
}

/// Reads the outbox metadata from the properties of an AMQP message (`delivery.properties`):
/// the `message_id` property and the headers table.
#[cfg(feature = "amqp")]
pub fn from_amqp(properties: &lapin::BasicProperties) -> Result<Received, ReceivedError> {
    use lapin::types::AMQPValue;
    let table = properties.headers().as_ref();
    let pairs = table
        .into_iter()
        .flat_map(|t| t.inner().iter())
        .filter_map(|(name, value)| {
            let bytes: &[u8] = match value {
                AMQPValue::LongString(s) => s.as_bytes(),
                AMQPValue::ShortString(s) => s.as_str().as_bytes(),
                _ => return None,
            };
            Some((name.as_str(), Some(bytes)))
        });
    from_pairs(
        properties.message_id().as_ref().map(|id| id.as_str()),
        pairs,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "kafka")]
    #[test]
    fn reads_kafka_headers() {
        use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "outbox-id",
                value: Some("0190a3c4-5b6d-7e8f-9a0b-1c2d3e4f5a6b"),
            })
            .insert(Header {
                key: "outbox-queue",
                value: Some("orders"),
            })
            .insert(Header {
                key: "outbox-created-at",
                value: Some("2026-11-23T03:00:00.000000Z"),
            })
            .insert(Header {
                key: "traceparent",
                value: Some("00-abc-def-01"),
            });
        let message = OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "orders".into(),
            Timestamp::NotAvailable,
            0,
            7,
            Some(headers),
        );
        let received = from_kafka(&message).unwrap();
        assert_eq!(
            received.id.to_string(),
            "0190a3c4-5b6d-7e8f-9a0b-1c2d3e4f5a6b"
        );
        assert_eq!(received.queue.as_deref(), Some("orders"));
        assert_eq!(
            received.created_at.as_deref(),
            Some("2026-11-23T03:00:00.000000Z")
        );
        assert_eq!(
            received.headers,
            Headers::new().with("traceparent", "00-abc-def-01")
        );

        let bare = OwnedMessage::new(
            None,
            None,
            "orders".into(),
            Timestamp::NotAvailable,
            0,
            8,
            None,
        );
        assert_eq!(from_kafka(&bare), Err(ReceivedError::MissingId));
    }

    #[cfg(feature = "amqp")]
    #[test]
    fn reads_amqp_properties() {
        use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
        let mut table = FieldTable::default();
        table.insert(
            ShortString::from("outbox-queue"),
            AMQPValue::LongString(LongString::from("orders")),
        );
        table.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString(LongString::from("00-abc-def-01")),
        );
        let properties = lapin::BasicProperties::default()
            .with_message_id(ShortString::from("0190a3c4-5b6d-7e8f-9a0b-1c2d3e4f5a6b"))
            .with_headers(table);
        let received = from_amqp(&properties).unwrap();
        assert_eq!(
            received.id.to_string(),
            "0190a3c4-5b6d-7e8f-9a0b-1c2d3e4f5a6b"
        );
        assert_eq!(received.queue.as_deref(), Some("orders"));
        assert_eq!(received.headers.get("traceparent"), Some("00-abc-def-01"));

        let bad = lapin::BasicProperties::default().with_message_id(ShortString::from("nope"));
        assert_eq!(
            from_amqp(&bad),
            Err(ReceivedError::InvalidId("nope".into()))
        );
    }

    #[test]
    fn non_utf8_headers_are_reported_by_name() {
        let pairs = [("outbox-id", Some(&b"x"[..])), ("bin", Some(&[0xff][..]))];
        assert_eq!(
            from_pairs(None, pairs.into_iter()),
            Err(ReceivedError::NotUtf8("bin".into()))
        );
    }
}
