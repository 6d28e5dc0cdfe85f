//! `outbox._bench_checks(iterations)`: what each check publish keeps costs per call, timed in
//! the server (built only with the `bench` feature, by bench/publish.sh). BENCHMARKS.md
//! reports it.

use pgrx::prelude::*;
use pgrx::PgMemoryContexts;
use std::time::Instant;

use crate::jsonb::Jsonb;
use crate::publish::check_queue_name;
use crate::size::{check_json_size, check_size, headers_len, SizeLimit};
use crate::table::MessagesTable;

#[pg_extern(sql = r#"
CREATE FUNCTION outbox._bench_checks(payload text, iterations integer)
RETURNS TABLE (step text, ns_per_call double precision) VOLATILE
LANGUAGE c AS 'MODULE_PATHNAME', '@FUNCTION_NAME@';
REVOKE EXECUTE ON FUNCTION outbox._bench_checks(text, integer) FROM PUBLIC;
"#)]
fn bench_checks(
    payload: &str,
    iterations: i32,
) -> TableIterator<'static, (name!(step, String), name!(ns_per_call, f64))> {
    let payload = json(payload);
    let empty = json("{}");
    let headers = json(
        r#"{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "content-type": "application/json"}"#,
    );
    let key = None;
    let mut rows = Vec::new();
    let mut row = |step: &str, ns: f64| rows.push((step.to_string(), ns));
    let checked = time(iterations, || drop(MessagesTable::open_and_check("bench")));
    let kept = time(iterations, || drop(MessagesTable::open("bench")));
    row(
        "table form: open outbox.messages and its indexes, checks run (0.2.0: every call)",
        checked,
    );
    row("table form: open outbox.messages and its indexes, checks kept (0.2.1: until the table changes)", kept);
    row(
        "  the table checks themselves (saved per call)",
        checked - kept,
    );
    row(
        "read-only transaction",
        time(iterations, || {
            // SAFETY: a plain read of the transaction's flag.
            std::hint::black_box(unsafe { pg_sys::XactReadOnly });
        }),
    );
    row(
        "queue name",
        time(iterations, || {
            let _ = std::hint::black_box(check_queue_name(std::hint::black_box("orders")));
        }),
    );
    row(
        "headers '{}'",
        time(iterations, || {
            std::hint::black_box(empty.is_object() && empty.is_empty_object());
        }),
    );
    row(
        "headers with 2 values",
        time(iterations, || {
            std::hint::black_box(headers.is_valid_headers());
        }),
    );
    row(
        "size rule (stored size, then the JSON text length of headers and payload)",
        time(iterations, || {
            let headers = headers_len(&empty);
            check_size(
                "bench",
                SizeLimit::Setting,
                key,
                headers,
                payload.datum(),
                true,
            );
            std::hint::black_box(check_json_size(
                "bench",
                SizeLimit::Setting,
                key,
                headers,
                &payload,
            ));
        }),
    );
    row(
        "wal form: the payload's JSON text printed (not a check: what the envelope carries)",
        time(iterations, || {
            let mut text = Vec::with_capacity(payload.text_len() + 3);
            payload.print_text(&mut text);
            std::hint::black_box(text);
        }),
    );
    row(
        "wal form: the payload's JSON text by jsonb_out, converted to UTF-8 (0.2.0)",
        time(iterations, || {
            std::hint::black_box(payload.to_text());
        }),
    );
    TableIterator::new(rows)
}

fn json(text: &str) -> Jsonb {
    let text = std::ffi::CString::new(text).expect("no NUL in a JSON text");
    // SAFETY: jsonb_in with a NUL-terminated JSON text returns a jsonb datum.
    unsafe {
        Jsonb::from_datum(
            pgrx::direct_function_call_as_datum(
                pg_sys::jsonb_in,
                &[Some(pg_sys::Datum::from(text.as_ptr()))],
            )
            .expect("jsonb_in returns a value"),
        )
    }
}

/// Runs `step` `iterations` times, freeing what it allocates every 1,000 calls; ns per call.
fn time(iterations: i32, mut step: impl FnMut()) -> f64 {
    let mut scratch = PgMemoryContexts::new("pg_outbox bench");
    let start = Instant::now();
    for i in 0..iterations {
        // SAFETY: the closure's allocations are not used after the reset.
        unsafe { scratch.switch_to(|_| step()) };
        if i % 1000 == 999 {
            // SAFETY: as above.
            unsafe { scratch.reset() };
        }
    }
    start.elapsed().as_nanos() as f64 / f64::from(iterations.max(1))
}
