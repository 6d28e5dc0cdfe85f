//! The `wal` storage form: one transactional logical decoding message per outbox message, with
//! prefix `pg_outbox` and this content (version 1), a single JSON object on one line:
//!
//! ```text
//! {"v":1,"id":"<uuid>","queue":"<queue>","key":<string|null>,"created_at":"<RFC 3339, UTC, µs>",
//!  "headers":{<string values>},"payload":<the jsonb payload, verbatim>}
//! ```
//!
//! A `publish_bytes` message carries `"payload_base64":"<standard base64>"` instead of `payload`.
//! Keys always appear in this order and `payload`/`payload_base64` is last, so a decoder may also
//! stream it. JSON keeps the message readable in `test_decoding` and `pg_recvlogical` output.

use base64::Engine;

pub const PREFIX: &str = "pg_outbox";
pub const VERSION: u32 = 1;

/// UTF-8 JSON text as it appears in the envelope: already rendered, or printed straight into
/// the envelope's buffer (no intermediate copy).
pub enum Json<'a> {
    Text(&'a str),
    /// `len` bytes of UTF-8 JSON text that `print` appends; it may use 3 more bytes of room
    /// while printing.
    Printed {
        len: usize,
        print: &'a dyn Fn(&mut Vec<u8>),
    },
}

impl Json<'_> {
    fn len(&self) -> usize {
        match self {
            Json::Text(text) => text.len(),
            Json::Printed { len, .. } => *len,
        }
    }

    fn append_to(&self, out: &mut Vec<u8>) {
        match self {
            Json::Text(text) => out.extend_from_slice(text.as_bytes()),
            Json::Printed { print, .. } => print(out),
        }
    }
}

/// The payload of a message.
pub enum Payload<'a> {
    /// The JSON text `jsonb_out` prints.
    Json(Json<'a>),
    Bytes(&'a [u8]),
}

pub struct Envelope<'a> {
    pub id: uuid::Uuid,
    pub queue: &'a str,
    pub key: Option<&'a str>,
    /// RFC 3339 UTC timestamp.
    pub created_at: &'a str,
    /// JSON object text.
    pub headers: Json<'a>,
    pub payload: Payload<'a>,
}

impl Envelope<'_> {
    /// The envelope, in one allocation of [`Self::encoded_len_bound`] bytes made fallibly (the
    /// caller turns a failure into an ERROR): nothing below grows it.
    pub fn encode(&self) -> Result<Vec<u8>, std::collections::TryReserveError> {
        let mut out = Vec::new();
        out.try_reserve_exact(self.encoded_len_bound())?;
        out.extend_from_slice(b"{\"v\":");
        out.extend_from_slice(itoa(VERSION, &mut [0; 10]).as_bytes());
        out.extend_from_slice(b",\"id\":\"");
        out.extend_from_slice(
            self.id
                .hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .as_bytes(),
        );
        // Queue names are validated to [A-Za-z0-9._-], which needs no escaping.
        out.extend_from_slice(b"\",\"queue\":\"");
        out.extend_from_slice(self.queue.as_bytes());
        out.extend_from_slice(b"\",\"key\":");
        match self.key {
            Some(key) => push_json_string(&mut out, key),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"created_at\":\"");
        out.extend_from_slice(self.created_at.as_bytes());
        out.extend_from_slice(b"\",\"headers\":");
        self.headers.append_to(&mut out);
        match &self.payload {
            Payload::Json(json) => {
                out.extend_from_slice(b",\"payload\":");
                json.append_to(&mut out);
            }
            Payload::Bytes(bytes) => {
                out.extend_from_slice(b",\"payload_base64\":\"");
                let start = out.len();
                out.resize(start + bytes.len().div_ceil(3) * 4, 0);
                let written = base64::engine::general_purpose::STANDARD
                    .encode_slice(bytes, &mut out[start..])
                    .expect("room for the padded base64 of the payload");
                out.truncate(start + written);
                out.push(b'"');
            }
        }
        out.push(b'}');
        debug_assert!(out.len() <= self.encoded_len_bound());
        Ok(out)
    }

    fn payload_len(&self) -> usize {
        match &self.payload {
            Payload::Json(json) => json.len(),
            Payload::Bytes(bytes) => bytes.len().div_ceil(3) * 4,
        }
    }

    /// An upper bound of `encode().len()`, known before anything is allocated.
    pub fn encoded_len_bound(&self) -> usize {
        // The key may grow sixfold when escaped (\u00XX).
        160 + self.queue.len()
            + self.key.map_or(0, |k| k.len() * 6)
            + self.created_at.len()
            + self.headers.len()
            + self.payload_len()
    }
}

/// `value` in decimal, in `buffer`.
fn itoa(mut value: u32, buffer: &mut [u8; 10]) -> &str {
    let mut start = buffer.len();
    loop {
        start -= 1;
        buffer[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    std::str::from_utf8(&buffer[start..]).expect("ASCII digits")
}

/// `text` as a JSON string, escaped as serde_json escapes it, into `out` (reserved by the caller:
/// at most six bytes per input byte, plus the quotes).
fn push_json_string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    // Byte by byte: every byte of a multi-byte UTF-8 sequence is >= 0x80 and passes through.
    for &byte in text.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

/// Formats a PostgreSQL `timestamptz` (µs since 2000-01-01 UTC) as RFC 3339 in UTC.
pub fn rfc3339(timestamp: i64) -> String {
    const POSTGRES_EPOCH_IN_UNIX_MICROS: i64 = 946_684_800_000_000;
    chrono::DateTime::from_timestamp_micros(timestamp + POSTGRES_EPOCH_IN_UNIX_MICROS)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| "infinity".to_string())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn encodes_json_payload_verbatim_and_escapes_key() {
        let envelope = Envelope {
            id: uuid::Uuid::nil(),
            queue: "orders",
            key: Some("a\"b"),
            created_at: &rfc3339(0),
            headers: Json::Text(r#"{"traceparent": "00-ab"}"#),
            payload: Payload::Json(Json::Text(r#"{"total": 12.5}"#)),
        };
        let text = String::from_utf8(envelope.encode().unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"id":"00000000-0000-0000-0000-000000000000","queue":"orders","key":"a\"b","created_at":"2000-01-01T00:00:00.000000Z","headers":{"traceparent": "00-ab"},"payload":{"total": 12.5}}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["payload"]["total"], 12.5);
    }

    #[test]
    fn encodes_bytes_as_base64() {
        let envelope = Envelope {
            id: uuid::Uuid::nil(),
            queue: "q",
            key: None,
            created_at: "x",
            headers: Json::Text("{}"),
            payload: Payload::Bytes(&[0, 1, 2, 255]),
        };
        let parsed: serde_json::Value =
            serde_json::from_slice(&envelope.encode().unwrap()).unwrap();
        assert_eq!(parsed["payload_base64"], "AAEC/w==");
        assert!(parsed["key"].is_null());
        assert!(parsed.get("payload").is_none());
    }
}
