//! `outbox.publish`, `outbox.publish_bytes`, `outbox.publish_batch` and the id-preserving
//! `outbox._publish_message` used by redrive. Arguments are read as raw datums so a jsonb payload
//! is never converted on the way to storage.
//!
//! These C functions need no privilege of their own: they write with `heap_insert` and
//! `LogLogicalMessage`, which check none, so `EXECUTE` (granted to `outbox_publisher` only) is
//! the whole access rule and they run as the caller (SECURITY INVOKER: a definer's function costs
//! two catalog lookups on every statement that calls it). They never resolve a name through the
//! search path (the table is found by explicit schema, types by OID), so they need no `SET
//! search_path` clause either, which would cost about a third of a publish (BENCHMARKS.md).

use crate::args::Args;
use crate::error;
use crate::jsonb::{self, Jsonb};
use crate::message::{Message, Payload};
use crate::size::{check_converted_size, check_json_size, check_size, headers_len, SizeLimit};
use crate::storage::Writer;
use crate::varlena::{database_is_utf8, Varlena};
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;

/// The header `outbox.redrive` adds, naming who redrove the message (the worker's
/// `outbox_client::contract::HEADER_REDRIVEN_BY`): the one reserved name a caller may set, and
/// only through `_publish_message`, which only pg_outbox's own functions can call.
const HEADER_REDRIVEN_BY: &str = "outbox-redriven-by";

const QUEUE_HINT: &str = "Queue names become Kafka topics and AMQP routing keys: use 1 to 249 of the characters A-Z a-z 0-9 . _ - (not \".\" or \"..\").";
const HEADERS_HINT: &str =
    "Pass a JSON object whose values are strings, e.g. '{\"traceparent\": \"00-...\"}', or '{}' for none.";

type FcInfo = pg_sys::FunctionCallInfo;

#[pg_extern(sql = r#"
CREATE FUNCTION outbox.publish(queue text, payload jsonb, headers jsonb DEFAULT '{}', key text DEFAULT NULL)
RETURNS uuid VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION outbox.publish(text, jsonb, jsonb, text) IS
    'Publishes a JSON message to queue in the current transaction; returns its id (UUIDv7).';
"#)]
fn publish(fcinfo: FcInfo) -> pgrx::Uuid {
    // SAFETY: PostgreSQL's fcinfo for the declaration above.
    let args = unsafe { Args::new(fcinfo, "outbox.publish") };
    let payload = args.required(1, "payload", "Pass a JSON value, e.g. '{}'.");
    publish_one(args, PayloadDatum::Json(payload))
}

#[pg_extern(sql = r#"
CREATE FUNCTION outbox.publish_bytes(queue text, payload bytea, headers jsonb DEFAULT '{}', key text DEFAULT NULL)
RETURNS uuid VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION outbox.publish_bytes(text, bytea, jsonb, text) IS
    'Publishes a binary message (Avro, Protobuf...) to queue in the current transaction; set a content-type header.';
"#)]
fn publish_bytes(fcinfo: FcInfo) -> pgrx::Uuid {
    // SAFETY: PostgreSQL's fcinfo for the declaration above.
    let args = unsafe { Args::new(fcinfo, "outbox.publish_bytes") };
    let payload = args.required(1, "payload", "Pass a bytea value, e.g. '\\x00'::bytea.");
    publish_one(args, PayloadDatum::Bytes(payload))
}

fn publish_one(args: Args, payload: PayloadDatum) -> pgrx::Uuid {
    let f = args.function;
    let writer = Writer::open(f);
    let queue = queue_arg(args, 0);
    let headers = headers_arg(args, 2, None);
    let key = key_arg(args.varlena(3), f, "key");
    let id = write_checked(
        &writer,
        f,
        uuid::Uuid::now_v7(),
        queue,
        key,
        headers,
        payload,
        now(),
    );
    pgrx::Uuid::from_bytes(*id.as_bytes())
}

/// A non-NULL payload argument, not read yet.
#[derive(Clone, Copy)]
enum PayloadDatum {
    /// A jsonb datum.
    Json(pg_sys::Datum),
    /// A bytea datum.
    Bytes(pg_sys::Datum),
}

/// The one path every publish takes once its arguments are checked: the size rule before the
/// payload is read (an oversized TOASTed value is never detoasted), the rule on the JSON text,
/// then the write. Returns the id.
#[allow(clippy::too_many_arguments)]
fn write_checked(
    writer: &Writer,
    function: &str,
    id: uuid::Uuid,
    queue: Varlena<'_>,
    key: Option<Varlena<'_>>,
    headers: Jsonb,
    payload: PayloadDatum,
    created_at: pg_sys::TimestampTz,
) -> uuid::Uuid {
    let (datum, is_json) = match payload {
        PayloadDatum::Json(datum) => (datum, true),
        PayloadDatum::Bytes(datum) => (datum, false),
    };
    let headers_text_len = headers_len(&headers);
    check_size(
        function,
        SizeLimit::Setting,
        key.as_ref(),
        headers_text_len,
        datum,
        is_json,
    );
    let payload = match payload {
        PayloadDatum::Json(datum) => {
            // SAFETY: a non-NULL jsonb datum (the variant).
            let value = unsafe { Jsonb::from_datum(datum) };
            let text_len = check_json_size(
                function,
                SizeLimit::Setting,
                key.as_ref(),
                headers_text_len,
                &value,
            );
            Payload::Json { value, text_len }
        }
        // SAFETY: a non-NULL bytea datum (the variant).
        PayloadDatum::Bytes(datum) => Payload::Bytes(unsafe { Varlena::from_datum(datum) }),
    };
    if !database_is_utf8() {
        let payload = match &payload {
            Payload::Json { value, .. } => Ok(value),
            Payload::Bytes(bytes) => Err(bytes.bytes.len()),
        };
        check_converted_size(
            function,
            SizeLimit::Setting,
            key.as_ref(),
            &headers,
            payload,
        );
    }
    let message = Message {
        id,
        queue,
        key,
        headers,
        headers_text_len,
        payload,
        created_at,
    };
    writer.write(&message);
    id
}

#[pg_extern(sql = r#"
CREATE FUNCTION outbox.publish_batch(queue text, payloads jsonb[], headers jsonb DEFAULT '{}', keys text[] DEFAULT NULL)
RETURNS SETOF uuid VOLATILE PARALLEL UNSAFE ROWS 100
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
COMMENT ON FUNCTION outbox.publish_batch(text, jsonb[], jsonb, text[]) IS
    'Publishes one message per element of payloads (keys[i] is the key of payloads[i]); returns their ids in order.';
"#)]
fn publish_batch(fcinfo: FcInfo) -> SetOfIterator<'static, pgrx::Uuid> {
    // SAFETY: PostgreSQL's fcinfo for the declaration above.
    let args = unsafe { Args::new(fcinfo, "outbox.publish_batch") };
    let f = args.function;
    let writer = Writer::open(f);
    let queue = queue_arg(args, 0);
    let payloads = args.required(
        1,
        "payloads",
        "Pass an array of JSON values, e.g. ARRAY['{}']::jsonb[].",
    );
    // SAFETY: argument 1 is declared jsonb[].
    let payloads = unsafe { deconstruct(payloads, pg_sys::JSONBOID, f, "payloads") };
    let headers = headers_arg(args, 2, None);
    // SAFETY: argument 3 is declared text[].
    let keys = args
        .datum(3)
        .map(|keys| unsafe { deconstruct(keys, pg_sys::TEXTOID, f, "keys") });
    if let Some(keys) = &keys {
        if keys.len() != payloads.len() {
            error::invalid(
                format!(
                    "{f}: payloads has {} elements but keys has {}",
                    payloads.len(),
                    keys.len()
                ),
                "Pass one key per payload (NULL elements for no key), or NULL for no keys at all.",
            );
        }
    }
    let created_at = now();
    let mut ids = Vec::new();
    if ids.try_reserve_exact(payloads.len()).is_err() {
        error::raise(
            PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY,
            format!(
                "{f}: out of memory for the ids of {} messages",
                payloads.len()
            ),
            "Publish fewer messages per call.",
        );
    }
    // What one element allocates (detoasted values, the heap tuple, index insertion scratch)
    // is freed after it, so a batch of a million stays within a few megabytes.
    let mut per_element = PgMemoryContexts::new("pg_outbox publish_batch element");
    for i in 0..payloads.len() {
        let Some(payload) = payloads.get(i) else {
            error::null_argument(
                f,
                &format!("payloads[{}]", i + 1),
                "Every element of payloads must be a JSON value.",
            );
        };
        let key = keys.as_ref().and_then(|keys| keys.get(i));
        // SAFETY: switch_to restores the previous context when the closure returns or unwinds;
        // nothing allocated inside outlives the element (the id is copied out).
        let id = unsafe {
            per_element
                .switch_to(|_| batch_element(&writer, f, queue, &headers, key, payload, created_at))
        };
        // SAFETY: nothing of the element is used any more.
        unsafe { per_element.reset() };
        ids.push(pgrx::Uuid::from_bytes(*id.as_bytes()));
    }
    drop(writer);
    SetOfIterator::new(ids)
}

/// One element of `publish_batch`: `key` a text datum, `payload` a jsonb datum.
fn batch_element(
    writer: &Writer,
    function: &str,
    queue: Varlena<'_>,
    headers: &Jsonb,
    key: Option<pg_sys::Datum>,
    payload: pg_sys::Datum,
    created_at: pg_sys::TimestampTz,
) -> uuid::Uuid {
    // SAFETY: elements of a text[] are text datums.
    let key = key.map(|k| unsafe { Varlena::from_datum(k) });
    let key = key_arg(key, function, "keys element");
    write_checked(
        writer,
        function,
        uuid::Uuid::now_v7(),
        queue,
        key,
        headers.clone(),
        PayloadDatum::Json(payload),
        created_at,
    )
}

/// Re-publishes a message with its original id (used by `outbox.redrive`). Not granted to anyone.
#[pg_extern(sql = r#"
CREATE FUNCTION outbox._publish_message(id uuid, queue text, key text, payload jsonb, payload_bytes bytea, headers jsonb)
RETURNS uuid VOLATILE PARALLEL UNSAFE SET search_path = pg_catalog, pg_temp
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
"#)]
fn publish_message(fcinfo: FcInfo) -> pgrx::Uuid {
    // SAFETY: PostgreSQL's fcinfo for the declaration above.
    let args = unsafe { Args::new(fcinfo, "outbox._publish_message") };
    let f = args.function;
    let writer = Writer::open(f);
    let id = args
        .uuid(0)
        .unwrap_or_else(|| error::null_argument(f, "id", "Pass the id of the message."));
    let queue = queue_arg(args, 1);
    let key = key_arg(args.varlena(2), f, "key");
    // Redrive names who redrove the message in the one reserved header a caller may set.
    let headers = headers_arg(args, 5, Some(HEADER_REDRIVEN_BY));
    let payload = match args.datum(3) {
        Some(json) => PayloadDatum::Json(json),
        None => {
            PayloadDatum::Bytes(args.required(4, "payload_bytes", "Pass payload or payload_bytes."))
        }
    };
    write_checked(&writer, f, id, queue, key, headers, payload, now());
    pgrx::Uuid::from_bytes(*id.as_bytes())
}

fn now() -> pg_sys::TimestampTz {
    // SAFETY: a plain read of the transaction's start time.
    unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }
}

fn queue_arg<'a>(args: Args, index: usize) -> Varlena<'a> {
    let queue = args
        .varlena(index)
        .unwrap_or_else(|| error::null_argument(args.function, "queue", QUEUE_HINT));
    // Lossy only for the message: a valid name is ASCII, so anything else is refused. At most
    // 1 kB of it is copied (a Rust allocation as large as the argument could abort the server).
    let shown = &queue.bytes[..queue.bytes.len().min(1024)];
    let name = String::from_utf8_lossy(shown);
    let problem = if queue.bytes.len() > 249 {
        Err(format!(
            "it is {} characters long, the limit is 249",
            queue.bytes.len()
        ))
    } else {
        check_queue_name(&name)
    };
    if let Err(problem) = problem {
        let name = if shown.len() < queue.bytes.len() {
            format!("{name}...")
        } else {
            name.into_owned()
        };
        error::invalid(
            format!(
                "{}: invalid queue name \"{name}\": {problem}",
                args.function
            ),
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

fn key_arg<'a>(key: Option<Varlena<'a>>, function: &str, name: &str) -> Option<Varlena<'a>> {
    if key.is_some_and(|key| key.bytes.is_empty()) {
        error::invalid(
            format!("{function}: {name} must not be an empty string"),
            "Pass NULL for a message without a key.",
        );
    }
    key
}

fn headers_arg(args: Args, index: usize, reserved_allowed: Option<&str>) -> Jsonb {
    let function = args.function;
    // SAFETY: the headers argument is declared jsonb; NULL means "no headers", like the default.
    let headers =
        unsafe { Jsonb::from_datum(args.datum(index).unwrap_or_else(jsonb::empty_object)) };
    if !headers.is_object() {
        error::invalid(
            format!(
                "{function}: headers must be a JSON object, got a JSON {}",
                headers.kind()
            ),
            HEADERS_HINT,
        );
    }
    // The binary check allocates nothing; only a bad value is printed, to name the problem.
    if !headers.is_empty_object() && !headers.is_valid_headers() {
        // Named by parsing the text on the Rust heap: only for headers of a sane size.
        if headers.text_len() > 64 * 1024 {
            error::invalid(
                format!("{function}: headers must be a JSON object whose names are not empty nor start with \"outbox-\" and whose values are strings"),
                HEADERS_HINT,
            );
        }
        let text = headers.to_text();
        if let Err(problem) = check_headers(&text, reserved_allowed) {
            error::invalid(format!("{function}: {problem}"), HEADERS_HINT);
        }
    }
    headers
}

/// Header values must be strings (Kafka and AMQP headers are strings to every consumer) and
/// names must not use the `outbox-` prefix, which the worker reserves for its own headers (but
/// `reserved_allowed`, which pg_outbox itself sets).
pub fn check_headers(json: &str, reserved_allowed: Option<&str>) -> Result<(), String> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| format!("headers are not a JSON object: {e}"))?;
    for (name, value) in &map {
        if name.is_empty() {
            return Err("a header name is empty".into());
        }
        if name.to_ascii_lowercase().starts_with("outbox-")
            && reserved_allowed.is_none_or(|allowed| name != allowed)
        {
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

/// The elements of a one-dimensional array argument, as `deconstruct_array` lays them out
/// (palloc'd for the call; no per-element copy on the Rust side).
struct Elements {
    datums: *mut pg_sys::Datum,
    nulls: *mut bool,
    count: usize,
}

impl Elements {
    fn len(&self) -> usize {
        self.count
    }

    /// Element `i` (0-based), `None` for NULL.
    fn get(&self, i: usize) -> Option<pg_sys::Datum> {
        assert!(i < self.count, "element {i} of {}", self.count);
        // SAFETY: deconstruct_array filled `count` entries of both arrays.
        unsafe { (!*self.nulls.add(i)).then(|| *self.datums.add(i)) }
    }
}

/// # Safety
/// `datum` must be a non-NULL array whose elements are of `element_type`.
unsafe fn deconstruct(
    datum: pg_sys::Datum,
    element_type: pg_sys::Oid,
    function: &str,
    name: &str,
) -> Elements {
    // SAFETY: an array datum (contract); detoasted into the current memory context.
    let array: *mut pg_sys::ArrayType =
        unsafe { pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) }.cast();
    // SAFETY: a detoasted array header.
    let dims = unsafe { (*array).ndim };
    if dims > 1 {
        error::invalid(
            format!("{function}: {name} must be a one-dimensional array, got {dims} dimensions"),
            "Pass a flat array.",
        );
    }
    let (mut datums, mut nulls, mut count) = (std::ptr::null_mut(), std::ptr::null_mut(), 0);
    let (mut typlen, mut typbyval, mut typalign) = (0i16, false, 0 as std::ffi::c_char);
    // SAFETY: the element type's storage parameters come from the catalog, and
    // deconstruct_array checks the array's element type against it.
    unsafe {
        pg_sys::get_typlenbyvalalign(element_type, &mut typlen, &mut typbyval, &mut typalign);
        pg_sys::deconstruct_array(
            array,
            element_type,
            typlen.into(),
            typbyval,
            typalign,
            &mut datums,
            &mut nulls,
            &mut count,
        );
    }
    Elements {
        datums,
        nulls,
        count: count as usize,
    }
}
