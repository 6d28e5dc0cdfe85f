//! The one shape every outbox message has once decoded, whichever storage form carried it.

use std::borrow::Cow;
use std::collections::BTreeMap;

use base64::Engine;
use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::lsn::{Lsn, Position};

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: Uuid,
    pub queue: String,
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub payload: Payload,
    pub created_at: DateTime<Utc>,
    /// The commit LSN of the transaction that published it.
    pub commit_lsn: Lsn,
    /// Its place among the outbox messages of that transaction, from 1 (0: not from the stream,
    /// as in a replay). With `commit_lsn`, its [`Position`] in the slot's stream.
    pub index: u32,
    /// When that transaction committed (for the commit → ack latency).
    pub committed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// JSON text, as PostgreSQL's `jsonb` output renders it.
    Json(String),
    /// `publish_bytes`: opaque bytes.
    Bytes(Vec<u8>),
}

impl Payload {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Json(text) => text.as_bytes(),
            Payload::Bytes(bytes) => bytes,
        }
    }

    pub fn content_type(&self) -> &'static str {
        match self {
            Payload::Json(_) => "application/json",
            Payload::Bytes(_) => "application/octet-stream",
        }
    }
}

/// Whether a header is the content type (header names compare without case, as in HTTP).
pub fn is_content_type(header: &str) -> bool {
    header.eq_ignore_ascii_case("content-type")
}

impl Message {
    /// Where it is in the slot's stream: every decoding of the same WAL gives the same.
    pub fn position(&self) -> Position {
        Position {
            commit_lsn: self.commit_lsn,
            index: self.index,
        }
    }

    /// What the message takes in memory, near enough: queue, key, headers and payload.
    pub fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.queue.len()
            + self.key.as_ref().map_or(0, String::len)
            + headers
            + self.payload.as_bytes().len()
    }

    /// The publisher's `content-type` header if it set one, else what the payload form implies.
    pub fn content_type(&self) -> &str {
        self.headers
            .iter()
            .find(|(key, _)| is_content_type(key))
            .map_or(self.payload.content_type(), |(_, value)| value.as_str())
    }

    /// RFC 3339, UTC, microseconds: the `outbox-created-at` header and the JSON field. Written
    /// by hand: chrono's formatter showed up in the Kafka path's profile (once per message).
    pub fn created_at_rfc3339(&self) -> String {
        let t = &self.created_at;
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.timestamp_subsec_micros().min(999_999)
        )
    }

    /// The stdout sink's line: one JSON object, payload verbatim (or base64 for bytes).
    pub fn to_json_line(&self) -> String {
        let line = self.json_line();
        let mut text = line.head.into_bytes();
        text.extend_from_slice(&line.payload);
        text.extend_from_slice(line.tail.as_bytes());
        String::from_utf8(text).expect("JSON text is UTF-8")
    }

    /// [`Message::to_json_line`] in three pieces, so that a writer takes the payload from the
    /// message itself instead of a copy of it inside the line (a 60 MB message is held once less).
    pub fn json_line(&self) -> JsonLine<'_> {
        #[derive(Serialize)]
        struct Head<'a> {
            id: &'a Uuid,
            queue: &'a str,
            key: &'a Option<String>,
            headers: &'a BTreeMap<String, String>,
        }
        let mut head = serde_json::to_string(&Head {
            id: &self.id,
            queue: &self.queue,
            key: &self.key,
            headers: &self.headers,
        })
        .expect("a message serializes");
        head.pop(); // the closing brace: the payload and created_at follow
        let (field, payload) = match &self.payload {
            // jsonb output is always valid JSON; should it ever not be, it goes as a JSON string.
            Payload::Json(text) if serde_json::from_str::<&RawValue>(text).is_ok() => {
                ("payload", Cow::Borrowed(text.as_bytes()))
            }
            Payload::Json(text) => (
                "payload",
                Cow::Owned(serde_json::to_vec(text).expect("a string serializes")),
            ),
            Payload::Bytes(bytes) => {
                let mut quoted = Vec::with_capacity(bytes.len() * 4 / 3 + 8);
                quoted.push(b'"');
                quoted.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(bytes)
                        .as_bytes(),
                );
                quoted.push(b'"');
                ("payload_base64", Cow::Owned(quoted))
            }
        };
        head.push_str(&format!(",\"{field}\":"));
        JsonLine {
            head,
            payload,
            tail: format!(",\"created_at\":\"{}\"}}", self.created_at_rfc3339()),
        }
    }
}

/// A stdout line as written: `head`, `payload`, `tail`, then a newline.
pub struct JsonLine<'a> {
    pub head: String,
    pub payload: Cow<'a, [u8]>,
    pub tail: String,
}

/// What a quarantine keeps of a message's raw content (its length is in the reason).
pub const QUARANTINE_KEEP: usize = 64 * 1024;

/// Something in the outbox's place that `outbox.publish` did not write: kept in the dead letters,
/// never delivered.
#[derive(Debug, PartialEq)]
pub struct Quarantined {
    /// What the message claimed, when it could be read.
    pub id: Option<Uuid>,
    /// The start of the raw content (wal form) or of the row's values (table form): at most
    /// [`QUARANTINE_KEEP`] bytes, so a forged message of up to 1 GB costs no more than its frame and the
    /// replication client's one copy of it.
    pub raw: Vec<u8>,
    pub reason: String,
    pub commit_lsn: Lsn,
    /// Its place among the outbox messages of its transaction (from 1).
    pub position: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: Payload) -> Message {
        Message {
            id: Uuid::parse_str("0190b8a0-0000-7000-8000-000000000001").unwrap(),
            queue: "orders".into(),
            key: Some("o-1".into()),
            headers: BTreeMap::from([("tenant".into(), "acme".into())]),
            payload,
            created_at: DateTime::parse_from_rfc3339("2026-11-23T07:43:13.123456Z")
                .unwrap()
                .to_utc(),
            commit_lsn: Lsn(1),
            index: 1,
            committed_at: Utc::now(),
        }
    }

    #[test]
    fn json_line_keeps_the_payload_verbatim() {
        let line =
            message(Payload::Json(r#"{"total": 12.50, "items": [1, 2]}"#.into())).to_json_line();
        assert_eq!(
            line,
            r#"{"id":"0190b8a0-0000-7000-8000-000000000001","queue":"orders","key":"o-1","headers":{"tenant":"acme"},"payload":{"total": 12.50, "items": [1, 2]},"created_at":"2026-11-23T07:43:13.123456Z"}"#
        );
    }

    #[test]
    fn created_at_is_rfc3339_with_microseconds() {
        let mut m = message(Payload::Bytes(vec![]));
        assert_eq!(m.created_at_rfc3339(), "2026-11-23T07:43:13.123456Z");
        m.created_at = DateTime::parse_from_rfc3339("0999-01-02T03:04:05Z")
            .unwrap()
            .to_utc();
        assert_eq!(m.created_at_rfc3339(), "0999-01-02T03:04:05.000000Z");
    }

    #[test]
    fn json_line_carries_bytes_as_base64() {
        let line = message(Payload::Bytes(vec![0, 159, 255])).to_json_line();
        assert!(line.contains(r#""payload_base64":"AJ//""#), "{line}");
        assert!(!line.contains(r#""payload":"#), "{line}");
    }
}
