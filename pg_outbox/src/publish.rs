//! `outbox.publish`, `outbox.publish_bytes`, `outbox.publish_batch` and the id-preserving
//! `outbox._publish_message` used by redrive. Arguments are read as raw datums so a jsonb payload
//! is never converted on the way to storage.
//!
//! These C functions are SECURITY DEFINER without a `SET search_path` clause: they never resolve
//! a name through the search path (the table is found by explicit schema, types by OID), so the
//! clause would protect nothing, and on PostgreSQL 15 it costs about a third of a publish (a GUC
//! save and restore per call, measured in BENCHMARKS.md). The SQL-language functions keep it.

use crate::error;
use crate::jsonb::{self, Jsonb};
use crate::storage::{Message, Payload, Writer};
use pgrx::fcinfo::{pg_arg_is_null, pg_getarg, pg_getarg_datum_raw};
use pgrx::prelude::*;

const QUEUE_HINT: &str = "Queue names become Kafka topics and AMQP routing keys: use 1 to 249 of the characters A-Z a-z 0-9 . _ - (not \".\" or \"..\").";
const HEADERS_HINT: &str =
    "Pass a JSON object whose values are strings, e.g. '{\"traceparent\": \"00-...\"}', or '{}' for none.";

type FcInfo = pg_sys::FunctionCallInfo;

#[pg_extern(sql = r#"
CREATE FUNCTION outbox.publish(queue text, payload jsonb, headers jsonb DEFAULT '{}', key text DEFAULT NULL)
RETURNS uuid VOLATILE PARALLEL UNSAFE SECURITY DEFINER
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION outbox.publish(text, jsonb, jsonb, text) IS
    'Publishes a JSON message to queue in the current transaction; returns its id (UUIDv7).';
"#)]
fn publish(fcinfo: FcInfo) -> pgrx::Uuid {
    const F: &str = "outbox.publish";
    let payload = unsafe {
        Jsonb::from_datum(required(
            fcinfo,
            1,
            F,
            "payload",
            "Pass a JSON value, e.g. '{}'.",
        ))
    };
    publish_one(fcinfo, F, Payload::Json(payload))
}

#[pg_extern(sql = r#"
CREATE FUNCTION outbox.publish_bytes(queue text, payload bytea, headers jsonb DEFAULT '{}', key text DEFAULT NULL)
RETURNS uuid VOLATILE PARALLEL UNSAFE SECURITY DEFINER
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION outbox.publish_bytes(text, bytea, jsonb, text) IS
    'Publishes a binary message (Avro, Protobuf...) to queue in the current transaction; set a content-type header.';
"#)]
fn publish_bytes(fcinfo: FcInfo) -> pgrx::Uuid {
    const F: &str = "outbox.publish_bytes";
    required(
        fcinfo,
        1,
        F,
        "payload",
        "Pass a bytea value, e.g. '\\x00'::bytea.",
    );
    let datum = unsafe {
        pg_sys::Datum::from(pg_sys::pg_detoast_datum_packed(
            pg_getarg_datum_raw(fcinfo, 1).cast_mut_ptr(),
        ))
    };
    let bytes = unsafe { pgrx::varlena::varlena_to_byte_slice(datum.cast_mut_ptr()) };
    publish_one(fcinfo, F, Payload::Bytes { datum, bytes })
}

fn publish_one(fcinfo: FcInfo, function: &str, payload: Payload) -> pgrx::Uuid {
    let queue = queue_arg(fcinfo, 0, function);
    let headers = headers_arg(fcinfo, 2, function);
    let key = key_arg(unsafe { pg_getarg::<&str>(fcinfo, 3) }, function, "key");
    let message = Message {
        id: uuid::Uuid::now_v7(),
        queue,
        key,
        headers,
        payload,
        created_at: now(),
    };
    Writer::open().write(&message);
    pgrx::Uuid::from_bytes(*message.id.as_bytes())
}

#[pg_extern(sql = r#"
CREATE FUNCTION outbox.publish_batch(queue text, payloads jsonb[], headers jsonb DEFAULT '{}', keys text[] DEFAULT NULL)
RETURNS SETOF uuid VOLATILE PARALLEL UNSAFE SECURITY DEFINER ROWS 100
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION outbox.publish_batch(text, jsonb[], jsonb, text[]) IS
    'Publishes one message per element of payloads (keys[i] is the key of payloads[i]); returns their ids in order.';
"#)]
fn publish_batch(fcinfo: FcInfo) -> SetOfIterator<'static, pgrx::Uuid> {
    const F: &str = "outbox.publish_batch";
    let queue = queue_arg(fcinfo, 0, F);
    let payloads = required(
        fcinfo,
        1,
        F,
        "payloads",
        "Pass an array of JSON values, e.g. ARRAY['{}']::jsonb[].",
    );
    let payloads = unsafe { deconstruct(payloads, pg_sys::JSONBOID, F, "payloads") };
    let headers = headers_arg(fcinfo, 2, F);
    let keys = unsafe { pg_getarg::<Vec<Option<String>>>(fcinfo, 3) };
    if let Some(keys) = &keys {
        if keys.len() != payloads.len() {
            error::invalid(
                format!(
                    "{F}: payloads has {} elements but keys has {}",
                    payloads.len(),
                    keys.len()
                ),
                "Pass one key per payload (NULL elements for no key), or NULL for no keys at all.",
            );
        }
    }
    let created_at = now();
    let writer = Writer::open();
    let mut ids = Vec::with_capacity(payloads.len());
    for (i, payload) in payloads.into_iter().enumerate() {
        let Some(payload) = payload else {
            error::null_argument(
                F,
                &format!("payloads[{}]", i + 1),
                "Every element of payloads must be a JSON value.",
            );
        };
        let key = keys.as_ref().and_then(|keys| keys[i].as_deref());
        let message = Message {
            id: uuid::Uuid::now_v7(),
            queue,
            key: key_arg(key, F, "keys element"),
            headers: unsafe { Jsonb::from_datum(headers.datum()) },
            payload: Payload::Json(unsafe { Jsonb::from_datum(payload) }),
            created_at,
        };
        writer.write(&message);
        ids.push(pgrx::Uuid::from_bytes(*message.id.as_bytes()));
    }
    drop(writer);
    SetOfIterator::new(ids)
}

/// Re-publishes a message with its original id (used by `outbox.redrive`). Not granted to anyone.
#[pg_extern(sql = r#"
CREATE FUNCTION outbox._publish_message(id uuid, queue text, key text, payload jsonb, payload_bytes bytea, headers jsonb)
RETURNS uuid VOLATILE PARALLEL UNSAFE SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#)]
fn publish_message(fcinfo: FcInfo) -> pgrx::Uuid {
    const F: &str = "outbox._publish_message";
    let id = unsafe { pg_getarg::<pgrx::Uuid>(fcinfo, 0) }
        .unwrap_or_else(|| error::null_argument(F, "id", "Pass the id of the message."));
    let queue = queue_arg(fcinfo, 1, F);
    let key = key_arg(unsafe { pg_getarg::<&str>(fcinfo, 2) }, F, "key");
    let payload = if unsafe { pg_arg_is_null(fcinfo, 3) } {
        let datum = required(
            fcinfo,
            4,
            F,
            "payload_bytes",
            "Pass payload or payload_bytes.",
        );
        let datum =
            unsafe { pg_sys::Datum::from(pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr())) };
        Payload::Bytes {
            datum,
            bytes: unsafe { pgrx::varlena::varlena_to_byte_slice(datum.cast_mut_ptr()) },
        }
    } else {
        Payload::Json(unsafe { Jsonb::from_datum(pg_getarg_datum_raw(fcinfo, 3)) })
    };
    let headers = headers_arg(fcinfo, 5, F);
    let message = Message {
        id: uuid::Uuid::from_bytes(*id.as_bytes()),
        queue,
        key,
        headers,
        payload,
        created_at: now(),
    };
    Writer::open().write(&message);
    id
}

fn now() -> pg_sys::TimestampTz {
    unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }
}

fn required(fcinfo: FcInfo, index: usize, function: &str, name: &str, hint: &str) -> pg_sys::Datum {
    if unsafe { pg_arg_is_null(fcinfo, index) } {
        error::null_argument(function, name, hint);
    }
    unsafe { pg_getarg_datum_raw(fcinfo, index) }
}

fn queue_arg<'a>(fcinfo: FcInfo, index: usize, function: &str) -> &'a str {
    let queue = unsafe { pg_getarg::<&'a str>(fcinfo, index) }
        .unwrap_or_else(|| error::null_argument(function, "queue", QUEUE_HINT));
    if let Err(problem) = check_queue_name(queue) {
        error::invalid(
            format!("{function}: invalid queue name \"{queue}\": {problem}"),
            QUEUE_HINT,
        );
    }
    queue
}

/// Checks a queue name against `^[A-Za-z0-9._-]{1,249}$` (and Kafka's ban on "." and "..").
pub fn check_queue_name(queue: &str) -> Result<(), String> {
    if queue.is_empty() {
        return Err("it is empty".into());
    }
    if queue.len() > 249 {
        return Err(format!(
            "it is {} characters long, the limit is 249",
            queue.len()
        ));
    }
    if let Some(bad) = queue
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("character {bad:?} is not allowed"));
    }
    if queue == "." || queue == ".." {
        return Err("\".\" and \"..\" are not valid Kafka topic names".into());
    }
    Ok(())
}

fn key_arg<'a>(key: Option<&'a str>, function: &str, name: &str) -> Option<&'a str> {
    if key == Some("") {
        error::invalid(
            format!("{function}: {name} must not be an empty string"),
            "Pass NULL for a message without a key.",
        );
    }
    key
}

fn headers_arg(fcinfo: FcInfo, index: usize, function: &str) -> Jsonb {
    if unsafe { pg_arg_is_null(fcinfo, index) } {
        // NULL means "no headers", like the default.
        return unsafe { Jsonb::from_datum(jsonb::empty_object()) };
    }
    let headers = unsafe { Jsonb::from_datum(pg_getarg_datum_raw(fcinfo, index)) };
    if !headers.is_object() {
        error::invalid(
            format!(
                "{function}: headers must be a JSON object, got a JSON {}",
                headers.kind()
            ),
            HEADERS_HINT,
        );
    }
    if !headers.is_empty_object() {
        let text = headers.to_text();
        if let Err(problem) = check_headers(&text) {
            error::invalid(format!("{function}: {problem}"), HEADERS_HINT);
        }
    }
    headers
}

/// Header values must be strings (Kafka and AMQP headers are strings to every consumer) and
/// names must not use the `outbox-` prefix, which the worker reserves for its own headers.
pub fn check_headers(json: &str) -> Result<(), String> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("headers are not a JSON object: {e}"))?;
    for (name, value) in &map {
        if name.is_empty() {
            return Err("a header name is empty".into());
        }
        if name.to_ascii_lowercase().starts_with("outbox-") {
            return Err(format!(
                "header \"{name}\" uses the reserved prefix \"outbox-\""
            ));
        }
        if !value.is_string() {
            return Err(format!("header \"{name}\" must be a string, got {value}"));
        }
    }
    Ok(())
}

/// The elements of a one-dimensional array argument (NULL elements as `None`).
unsafe fn deconstruct(
    datum: pg_sys::Datum,
    element_type: pg_sys::Oid,
    function: &str,
    name: &str,
) -> Vec<Option<pg_sys::Datum>> {
    let array: *mut pg_sys::ArrayType =
        unsafe { pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) }.cast();
    let dims = unsafe { (*array).ndim };
    if dims > 1 {
        error::invalid(
            format!("{function}: {name} must be a one-dimensional array, got {dims} dimensions"),
            "Pass a flat array.",
        );
    }
    let (mut elems, mut nulls, mut count) = (std::ptr::null_mut(), std::ptr::null_mut(), 0);
    let (mut typlen, mut typbyval, mut typalign) = (0i16, false, 0 as std::ffi::c_char);
    unsafe {
        pg_sys::get_typlenbyvalalign(element_type, &mut typlen, &mut typbyval, &mut typalign);
        pg_sys::deconstruct_array(
            array,
            element_type,
            typlen.into(),
            typbyval,
            typalign,
            &mut elems,
            &mut nulls,
            &mut count,
        );
        (0..count as usize)
            .map(|i| (!*nulls.add(i)).then(|| *elems.add(i)))
            .collect()
    }
}
