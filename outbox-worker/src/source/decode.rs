//! Both storage forms to one [`Message`]: a row inserted into `outbox.messages` (table form) and a
//! `pg_outbox` logical decoding message (wal form, envelope version 1).

use std::collections::BTreeMap;

use base64::Engine;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;
use uuid::Uuid;

use super::pgoutput::{Relation, Value};
use crate::lsn::Lsn;
use outbox_client::contract::{HEADER_REDRIVEN_BY, RESERVED_HEADER_PREFIX};

use crate::message::{Message, Payload};
use crate::rules;

/// The prefix of wal-form logical messages.
pub const MESSAGE_PREFIX: &str = "pg_outbox";

#[derive(Debug, Error)]
#[error("cannot decode outbox message{}: {problem}", id.map(|id| format!(" {id}")).unwrap_or_default())]
pub struct EnvelopeError {
    id: Option<Uuid>,
    problem: String,
    /// Written by a newer pg_outbox than this worker reads: stop and ask for an upgrade rather
    /// than quarantine a genuine message.
    newer: bool,
}

fn problem(problem: impl Into<String>) -> EnvelopeError {
    EnvelopeError {
        id: None,
        problem: problem.into(),
        newer: false,
    }
}

/// Which column of `outbox.messages` sits at which position, learnt from the Relation message.
#[derive(Debug, Clone)]
pub struct TableLayout {
    id: usize,
    queue: usize,
    key: usize,
    payload: usize,
    payload_bytes: usize,
    headers: usize,
    created_at: usize,
}

impl TableLayout {
    /// `None` for any relation other than `outbox.messages`.
    pub fn of(relation: &Relation) -> Result<Option<TableLayout>, EnvelopeError> {
        if relation.namespace != "outbox" || relation.name != "messages" {
            return Ok(None);
        }
        let column = |name: &str| {
            relation
                .columns
                .iter()
                .position(|c| c == name)
                .ok_or_else(|| problem(format!("outbox.messages has no column {name:?}")))
        };
        Ok(Some(TableLayout {
            id: column("id")?,
            queue: column("queue")?,
            key: column("key")?,
            payload: column("payload")?,
            payload_bytes: column("payload_bytes")?,
            headers: column("headers")?,
            created_at: column("created_at")?,
        }))
    }

    pub fn decode(&self, values: &[Value], commit_lsn: Lsn) -> Result<Message, EnvelopeError> {
        let text = |index: usize, name: &str| -> Result<Option<&str>, EnvelopeError> {
            match values.get(index) {
                Some(Value::Text(bytes)) => std::str::from_utf8(bytes)
                    .map(Some)
                    .map_err(|_| problem(format!("column {name} is not UTF-8"))),
                Some(Value::Null) => Ok(None),
                Some(Value::Unchanged) => Err(problem(format!(
                    "column {name} is an unchanged TOAST value"
                ))),
                None => Err(problem(format!("the row has no column {name}"))),
            }
        };
        let required = |index: usize, name: &str| {
            text(index, name)?.ok_or_else(|| problem(format!("column {name} is NULL")))
        };
        let id = parse_id(required(self.id, "id")?)?;
        let with_id = |mut e: EnvelopeError| {
            e.id = Some(id);
            e
        };
        let created_at =
            parse_timestamptz(required(self.created_at, "created_at").map_err(with_id)?)
                .map_err(with_id)?;
        let payload = match (
            text(self.payload, "payload"),
            text(self.payload_bytes, "payload_bytes"),
        ) {
            (Ok(Some(json)), _) => Payload::Json(json.to_owned()),
            (_, Ok(Some(hex))) => Payload::Bytes(parse_bytea(hex).map_err(with_id)?),
            (Err(e), _) | (_, Err(e)) => return Err(with_id(e)),
            _ => return Err(with_id(problem("both payload and payload_bytes are NULL"))),
        };
        Ok(Message {
            id,
            queue: required(self.queue, "queue").map_err(with_id)?.to_owned(),
            key: text(self.key, "key").map_err(with_id)?.map(str::to_owned),
            headers: parse_headers(required(self.headers, "headers").map_err(with_id)?)
                .map_err(with_id)?,
            payload,
            created_at,
            commit_lsn,
            index: 0,
            committed_at: created_at,
        })
    }
}

/// The wal form: the content of a `pg_outbox` logical decoding message.
pub fn decode_envelope(content: &[u8], commit_lsn: Lsn) -> Result<Message, EnvelopeError> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        id: Uuid,
        queue: String,
        key: Option<String>,
        created_at: DateTime<Utc>,
        headers: BTreeMap<String, String>,
        // `"payload": null` is a JSON null payload (0.2.0 published one), not a missing payload.
        #[serde(borrow, default, deserialize_with = "present")]
        payload: Option<&'a RawValue>,
        payload_base64: Option<String>,
    }
    // The version first: a newer envelope may have another shape, and must stop the worker
    // rather than be quarantined for not having this one. pg_outbox writes it first, so a
    // version-1 envelope is known by its first bytes; only another one is parsed twice (the
    // payload is most of an envelope).
    if !content.starts_with(br#"{"v":1,"#) {
        check_version(content)?;
    }
    let envelope: Envelope<'_> =
        serde_json::from_slice(content).map_err(|e| problem(format!("bad envelope: {e}")))?;
    let payload = match (envelope.payload, envelope.payload_base64) {
        (Some(json), None) => Payload::Json(json.get().to_owned()),
        (None, Some(b64)) => Payload::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| EnvelopeError {
                    id: Some(envelope.id),
                    problem: format!("bad payload_base64: {e}"),
                    newer: false,
                })?,
        ),
        _ => {
            return Err(EnvelopeError {
                id: Some(envelope.id),
                problem: "the envelope needs exactly one of payload and payload_base64".into(),
                newer: false,
            })
        }
    };
    Ok(Message {
        id: envelope.id,
        queue: envelope.queue,
        key: envelope.key,
        headers: envelope.headers,
        payload,
        created_at: envelope.created_at,
        commit_lsn,
        index: 0,
        committed_at: envelope.created_at,
    })
}

/// The envelope's version: 1, or an error (a newer one stops the worker: `newer`).
fn check_version(content: &[u8]) -> Result<(), EnvelopeError> {
    #[derive(Deserialize)]
    struct Version {
        v: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Version>(content) {
        Ok(Version { v: Some(v) }) if v.as_u64() == Some(1) => Ok(()),
        Ok(Version { v: Some(v) }) if v.as_u64().is_some_and(|v| v > 1) => Err(EnvelopeError {
            id: None,
            problem: format!(
                "envelope version {v} is newer than this worker understands (1): upgrade \
                     outbox-worker"
            ),
            newer: true,
        }),
        Ok(Version { v: Some(v) }) => Err(problem(format!(
            "envelope version {v} is not one pg_outbox writes"
        ))),
        Ok(Version { v: None }) => Err(problem("bad envelope: no version \"v\"")),
        Err(e) => Err(problem(format!("bad envelope: {e}"))),
    }
}

/// A row of `outbox.messages` read over SQL (`replay`: id, queue, key, payload::text, payload_bytes,
/// headers::text, created_at), as the stream would have carried it, checked by the publish rules.
pub fn message_of_row(row: &tokio_postgres::Row) -> Result<Message, String> {
    let id: Uuid = row.get(0);
    let payload = match (
        row.get::<_, Option<String>>(3),
        row.get::<_, Option<Vec<u8>>>(4),
    ) {
        (Some(json), None) => Payload::Json(json),
        (None, Some(bytes)) => Payload::Bytes(bytes),
        _ => {
            return Err(format!(
                "message {id}: not exactly one of payload, payload_bytes"
            ))
        }
    };
    let headers: BTreeMap<String, String> = serde_json::from_str(&row.get::<_, String>(5))
        .map_err(|e| format!("message {id}: headers are not an object of strings: {e}"))?;
    let message = Message {
        id,
        queue: row.get(1),
        key: row.get(2),
        headers,
        payload,
        created_at: row.get(6),
        commit_lsn: Lsn(0),
        index: 0,
        committed_at: Utc::now(),
    };
    check_publish_rules(&message).map_err(|e| e.to_string())?;
    Ok(message)
}

/// A field that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// The rules `outbox.publish` enforces, checked again on what the slot delivers: a message that
/// breaks them was not written by publish (a superuser's hand, or a future bug) and is
/// quarantined rather than sent.
pub fn check_publish_rules(message: &Message) -> Result<(), EnvelopeError> {
    let queue = &message.queue;
    let problem = if !rules::is_valid_queue(queue) {
        format!("invalid queue name {queue:?}")
    } else if message.key.as_deref() == Some("") {
        "the key is an empty string".into()
    } else if message.key.as_deref().is_some_and(|k| k.contains('\0'))
        || message
            .headers
            .iter()
            .any(|(k, v)| k.contains('\0') || v.contains('\0'))
        || matches!(&message.payload, Payload::Json(json) if has_nul_escape(json))
    {
        "it holds a NUL character (\\u0000), which PostgreSQL's text and jsonb cannot store".into()
    } else if let Some(name) = message.headers.keys().find(|name| {
        name.is_empty()
            || (name
                .to_ascii_lowercase()
                .starts_with(RESERVED_HEADER_PREFIX)
                // The one pg_outbox's redrive sets (no publisher can), spelt exactly so.
                && name.as_str() != HEADER_REDRIVEN_BY)
    }) {
        format!("header {name:?} is empty or uses the reserved prefix \"outbox-\"")
    } else {
        return Ok(());
    };
    Err(EnvelopeError {
        id: Some(message.id),
        problem,
        newer: false,
    })
}

/// Whether JSON text holds the escape `\u0000` (not an escaped backslash followed by `u0000`).
fn has_nul_escape(json: &str) -> bool {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes[i + 1..].starts_with(b"u0000") {
                return true;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

impl EnvelopeError {
    /// A wal-form message where pg_outbox is the SQL install: any role can write one there
    /// (`pg_logical_emit_message` cannot be revoked without superuser), so none is trusted.
    pub fn untrusted_wal_form() -> EnvelopeError {
        problem(
            "a wal-form message in a database with the SQL install, where pg_logical_emit_message \
             is open to every role and outbox.publish writes only the table form: not trusted",
        )
    }

    /// Written by a newer pg_outbox: the worker must stop, not quarantine it.
    pub fn is_newer_version(&self) -> bool {
        self.newer
    }

    /// The id the message claimed, when it could be read.
    pub fn claimed_id(&self) -> Option<Uuid> {
        self.id
    }
}

fn parse_id(text: &str) -> Result<Uuid, EnvelopeError> {
    Uuid::parse_str(text).map_err(|e| problem(format!("bad id {text:?}: {e}")))
}

fn parse_headers(text: &str) -> Result<BTreeMap<String, String>, EnvelopeError> {
    serde_json::from_str(text)
        .map_err(|e| problem(format!("headers are not an object of strings: {e}")))
}

/// bytea in `bytea_output = hex`, the default and what the replication session uses.
fn parse_bytea(text: &str) -> Result<Vec<u8>, EnvelopeError> {
    let hex = text
        .strip_prefix("\\x")
        .ok_or_else(|| problem("payload_bytes is not in hex bytea format"))?;
    if hex.len() % 2 != 0 {
        return Err(problem("payload_bytes has an odd number of hex digits"));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| problem("payload_bytes has a non-hex digit"))
}

/// timestamptz text in DateStyle ISO with TimeZone UTC, both pinned on the replication session:
/// `2026-11-23 07:46:14.494952+00`.
fn parse_timestamptz(text: &str) -> Result<DateTime<Utc>, EnvelopeError> {
    let local = text
        .strip_suffix("+00")
        .ok_or_else(|| problem(format!("created_at {text:?} is not in UTC")))?;
    NaiveDateTime::parse_from_str(local, "%Y-%m-%d %H:%M:%S%.f")
        .map(|t| t.and_utc())
        .map_err(|e| problem(format!("bad created_at {text:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> TableLayout {
        let relation = Relation {
            id: 1,
            namespace: "outbox".into(),
            name: "messages".into(),
            columns: [
                "id",
                "queue",
                "key",
                "payload",
                "payload_bytes",
                "headers",
                "created_at",
            ]
            .map(String::from)
            .to_vec(),
        };
        TableLayout::of(&relation).unwrap().unwrap()
    }

    fn text(s: &str) -> Value {
        Value::Text(s.as_bytes().to_vec())
    }

    #[test]
    fn a_row_decodes() {
        let values = [
            text("01a2075e-ab60-72df-a257-c9236de1f4c9"),
            text("orders"),
            text("k-1"),
            Value::Null,
            text("\\x00ff10"),
            text(r#"{"a": "b"}"#),
            text("2026-11-23 07:46:14.494952+00"),
        ];
        let message = layout().decode(&values, Lsn(7)).unwrap();
        assert_eq!(message.payload, Payload::Bytes(vec![0, 255, 16]));
        assert_eq!(message.headers["a"], "b");
        assert_eq!(message.created_at_rfc3339(), "2026-11-23T07:46:14.494952Z");
        assert_eq!(message.commit_lsn, Lsn(7));
    }

    #[test]
    fn a_bad_row_names_the_message_and_the_problem() {
        let values = [
            text("01a2075e-ab60-72df-a257-c9236de1f4c9"),
            text("orders"),
            Value::Null,
            Value::Null,
            Value::Null,
            text("{}"),
            text("2026-11-23 07:46:14+00"),
        ];
        let err = layout().decode(&values, Lsn(7)).unwrap_err().to_string();
        assert_eq!(
            err,
            "cannot decode outbox message 01a2075e-ab60-72df-a257-c9236de1f4c9: both payload and payload_bytes are NULL"
        );
    }

    #[test]
    fn other_tables_are_not_the_outbox() {
        let relation = Relation {
            id: 1,
            namespace: "public".into(),
            name: "messages".into(),
            columns: vec![],
        };
        assert!(TableLayout::of(&relation).unwrap().is_none());
    }

    #[test]
    fn an_envelope_decodes() {
        let content = br#"{"v":1,"id":"01a2075e-ab60-72df-a257-c9236de1f4c9","queue":"q","key":null,"created_at":"2026-11-23T07:46:14.494952Z","headers":{},"payload":{"n": [1, 2]}}"#;
        let message = decode_envelope(content, Lsn(9)).unwrap();
        assert_eq!(message.payload, Payload::Json(r#"{"n": [1, 2]}"#.into()));
        assert_eq!(message.key, None);
        let bytes = br#"{"v":1,"id":"01a2075e-ab60-72df-a257-c9236de1f4c9","queue":"q","key":"k","created_at":"2026-11-23T07:46:14Z","headers":{"h":"v"},"payload_base64":"AP8="}"#;
        assert_eq!(
            decode_envelope(bytes, Lsn(9)).unwrap().payload,
            Payload::Bytes(vec![0, 255])
        );
    }

    #[test]
    fn envelopes_breaking_publish_rules_are_refused() {
        for (queue, headers) in [("a/b", "{}"), ("", "{}"), ("q", r#"{"outbox-id":"x"}"#)] {
            let content = format!(
                r#"{{"v":1,"id":"01a2075e-ab60-72df-a257-c9236de1f4c9","queue":"{queue}","key":null,"created_at":"2026-11-23T07:46:14Z","headers":{headers},"payload":1}}"#
            );
            let message = decode_envelope(content.as_bytes(), Lsn(9)).unwrap();
            assert!(check_publish_rules(&message).is_err(), "{content}");
        }
    }

    /// `outbox.redrive` names who redrove a message in the one reserved header pg_outbox sets.
    #[test]
    fn the_redrive_header_is_the_one_reserved_name_allowed() {
        for (headers, allowed) in [
            (r#"{"outbox-redriven-by":"ops"}"#, true),
            (r#"{"Outbox-Redriven-By":"ops"}"#, false),
            (r#"{"outbox-redriven-by-x":"ops"}"#, false),
            (r#"{"outbox-queue":"q"}"#, false),
        ] {
            let content = format!(
                r#"{{"v":1,"id":"01a2075e-ab60-72df-a257-c9236de1f4c9","queue":"q","key":null,"created_at":"2026-11-23T07:46:14Z","headers":{headers},"payload":1}}"#
            );
            let message = decode_envelope(content.as_bytes(), Lsn(9)).unwrap();
            assert_eq!(check_publish_rules(&message).is_ok(), allowed, "{headers}");
        }
    }

    #[test]
    fn a_nul_anywhere_is_against_the_rules_an_escaped_backslash_is_not() {
        let envelope = |key: &str, headers: &str, payload: &str| {
            format!(
                r#"{{"v":1,"id":"01a2075e-ab60-72df-a257-c9236de1f4c9","queue":"q","key":{key},"created_at":"2026-11-23T07:46:14Z","headers":{headers},"payload":{payload}}}"#
            )
        };
        for content in [
            envelope("null", "{}", r#"{"a":"x\u0000y"}"#),
            envelope(r#""k\u0000""#, "{}", "1"),
            envelope("null", r#"{"h":"\u0000"}"#, "1"),
        ] {
            let message = decode_envelope(content.as_bytes(), Lsn(9)).unwrap();
            assert!(check_publish_rules(&message).is_err(), "{content}");
        }
        let fine = envelope("null", "{}", r#"{"a":"x\\u0000y"}"#);
        let message = decode_envelope(fine.as_bytes(), Lsn(9)).unwrap();
        assert!(check_publish_rules(&message).is_ok(), "{fine}");
    }

    #[test]
    fn a_null_payload_is_a_payload() {
        let content = br#"{"v":1,"id":"01a2075e-ab60-72df-a257-c9236de1f4c9","queue":"q","key":null,"created_at":"2026-11-23T07:46:14Z","headers":{},"payload":null}"#;
        let message = decode_envelope(content, Lsn(9)).unwrap();
        assert_eq!(message.payload, Payload::Json("null".into()));
        let neither = br#"{"v":1,"id":"01a2075e-ab60-72df-a257-c9236de1f4c9","queue":"q","key":null,"created_at":"2026-11-23T07:46:14Z","headers":{}}"#;
        assert!(decode_envelope(neither, Lsn(9)).is_err());
    }

    #[test]
    fn a_future_envelope_of_another_shape_still_says_upgrade() {
        let content =
            br#"{"v":2,"id":"01a2075e-ab60-72df-a257-c9236de1f4c9","dest":"q","payload":1}"#;
        assert!(decode_envelope(content, Lsn(9))
            .unwrap_err()
            .is_newer_version());
        for content in [
            &br#"{"v":0,"id":"x"}"#[..],
            br#"{"v":"2"}"#,
            br#"{"id":"x"}"#,
            b"[]",
        ] {
            let err = decode_envelope(content, Lsn(9)).unwrap_err();
            assert!(!err.is_newer_version(), "{err}");
            assert!(!err.to_string().contains("newer"), "{err}");
        }
    }

    #[test]
    fn a_future_envelope_version_says_upgrade() {
        let content = br#"{"v":2,"id":"01a2075e-ab60-72df-a257-c9236de1f4c9","queue":"q","key":null,"created_at":"2026-11-23T07:46:14Z","headers":{},"payload":1}"#;
        let err = decode_envelope(content, Lsn(9)).unwrap_err();
        assert!(err.is_newer_version());
        assert!(err.to_string().contains("upgrade outbox-worker"), "{err}");
    }
}
