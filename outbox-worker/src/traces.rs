//! OpenTelemetry traces: one `send {destination}` PRODUCER span per message that reached its
//! end (acknowledged by the broker, or dead-lettered), child of and linked to the message's
//! creation context (its `traceparent` / `tracestate` headers, which go to the broker unchanged).
//!
//! Off unless an OTLP endpoint is configured (`telemetry.otlp_endpoint`, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): then the SDK's batch
//! processor exports over OTLP/HTTP from a thread of its own, off the delivery path. Sampling
//! follows the creation context's flag (`OTEL_TRACES_SAMPLER` replaces that rule): a message
//! without a sampled context costs a header lookup and nothing more.
//!
//! Attributes follow the OpenTelemetry messaging semantic conventions 1.45 ([`SEMCONV`]).

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Link, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::TelemetryConfig;
use crate::message::Message;
use crate::router::Destination;
use crate::sink::Receipt;

/// The semantic conventions version the attributes follow (messaging: Development status).
pub const SEMCONV: &str = "https://opentelemetry.io/schemas/1.45.0";

struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// The default sampler (follow the parent's flag, no span without a parent): an unsampled
    /// message is skipped before any span is built.
    parent_based: bool,
}

static TRACES: OnceLock<Traces> = OnceLock::new();

const SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(2);

/// A standard variable's value, if set and not blank.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The samplers `OTEL_TRACES_SAMPLER` may name (the SDK's; it would fall back to tracing every
/// message, roots included, on any other value).
const SAMPLERS: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// Checks the standard `OTEL_*` variables the exporter reads where a bad value would not fail
/// but do something else (export nowhere, or trace everything): the error names the variable.
pub fn check_environment() -> Result<(), String> {
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        if let Some(value) = env(name) {
            if !value.trim().to_ascii_lowercase().starts_with("http://") {
                return Err(format!(
                    "{name} = {value:?}: an http:// URL is expected (OTLP/HTTP, e.g. \
                     http://localhost:4318); for TLS, send to a local OpenTelemetry Collector \
                     that forwards over TLS"
                ));
            }
        }
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(value) = env(name) {
            if value != "http/protobuf" {
                return Err(format!(
                    "{name} = {value:?}: the worker exports OTLP over HTTP with protobuf \
                     (\"http/protobuf\", port 4318 by convention) only"
                ));
            }
        }
    }
    if let Some(sampler) = env("OTEL_TRACES_SAMPLER") {
        if !SAMPLERS.contains(&sampler.as_str()) {
            return Err(format!(
                "OTEL_TRACES_SAMPLER = {sampler:?}: not a sampler the worker knows; one of {}",
                SAMPLERS.join(", ")
            ));
        }
        if sampler.ends_with("traceidratio") {
            let ratio = env("OTEL_TRACES_SAMPLER_ARG");
            let valid = ratio
                .as_deref()
                .and_then(|r| r.parse::<f64>().ok())
                .is_some_and(|r| (0.0..=1.0).contains(&r));
            if !valid {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER_ARG = {ratio:?}: {sampler} needs a ratio from 0 to 1"
                ));
            }
        }
    }
    Ok(())
}

/// Starts the exporter when an endpoint is configured; returns whether it did.
pub fn init(config: &TelemetryConfig) -> anyhow::Result<bool> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    let from_env = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .is_some();
    if config.otlp_endpoint.is_none() && !from_env {
        return Ok(false);
    }
    check_environment().map_err(anyhow::Error::msg)?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(base) = &config.otlp_endpoint {
        // A base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is: the traces path is appended.
        exporter = exporter.with_endpoint(format!("{}/v1/traces", base.trim_end_matches('/')));
    }
    let exporter = exporter.build().map_err(|e| {
        anyhow::anyhow!("telemetry.otlp_endpoint: the OTLP exporter cannot start: {e}")
    })?;
    let mut resource = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("outbox-worker");
    }
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    let parent_based = env("OTEL_TRACES_SAMPLER").is_none();
    if parent_based {
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)));
    }
    let provider = provider.build();
    let scope = opentelemetry::InstrumentationScope::builder("outbox-worker")
        .with_version(env!("CARGO_PKG_VERSION"))
        .with_schema_url(SEMCONV)
        .build();
    let tracer = provider.tracer_with_scope(scope);
    let _ = TRACES.set(Traces {
        provider,
        tracer,
        parent_based,
    });
    Ok(true)
}

/// Exports what is still batched (at the end of a run), for [`SHUTDOWN`] at most: a collector
/// that does not answer must not hold the stop.
pub fn shutdown() {
    if let Some(traces) = TRACES.get() {
        if let Err(e) = traces.provider.shutdown_with_timeout(SHUTDOWN) {
            tracing::warn!(error = %e, "telemetry: the last spans were not exported");
        }
    }
}

/// How a message's delivery ended.
pub enum Outcome<'a> {
    Delivered(Receipt),
    /// Written to `outbox.dead_letters`, with the broker's last refusal (or "no route").
    DeadLettered(&'a str),
}

/// One message's delivery, as its span tells it.
pub struct Send<'a> {
    /// `messaging.system`: `kafka`, `rabbitmq`, ...
    pub system: &'static str,
    /// The sink's name (none for a queue without a route).
    pub sink: Option<&'a str>,
    pub destination: &'a Destination,
    pub message: &'a Message,
    /// When the worker took it in (the span's start).
    pub started: SystemTime,
    pub attempts: u32,
    pub outcome: Outcome<'a>,
}

/// Records the span of one message's delivery, ending now.
pub fn send(send: Send<'_>) {
    let Some(traces) = TRACES.get() else { return };
    // The common case, read without parsing the context: no sampled parent, no span.
    if traces.parent_based && !sampled_flag(&send.message.headers) {
        return;
    }
    let creation = creation_context(&send.message.headers);
    let parent = creation.span().span_context().clone();
    if traces.parent_based && !parent.is_sampled() {
        return;
    }
    let message = send.message;
    let mut attributes = vec![
        KeyValue::new("messaging.system", send.system),
        KeyValue::new("messaging.operation.type", "send"),
        KeyValue::new("messaging.operation.name", "send"),
        KeyValue::new("messaging.message.id", message.id.to_string()),
        KeyValue::new("pg_outbox.queue", message.queue.clone()),
        KeyValue::new("pg_outbox.commit_lsn", message.commit_lsn.to_string()),
        KeyValue::new(
            "pg_outbox.committed_at",
            message
                .committed_at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        ),
        KeyValue::new("pg_outbox.attempts", i64::from(send.attempts)),
    ];
    if let Some(sink) = send.sink {
        attributes.push(KeyValue::new("messaging.client.id", sink.to_owned()));
        attributes.push(KeyValue::new("pg_outbox.sink", sink.to_owned()));
    }
    let name = match send.destination {
        Destination::None => "send".to_owned(),
        Destination::Topic(topic) => {
            attributes.push(KeyValue::new(
                "messaging.destination.name",
                topic.to_string(),
            ));
            if let Some(key) = &message.key {
                attributes.push(KeyValue::new(
                    "messaging.kafka.message.key",
                    truncated(key, MAX_KEY_ATTRIBUTE).to_owned(),
                ));
            }
            format!("send {topic}")
        }
        Destination::Exchange {
            exchange,
            routing_key,
        } => {
            attributes.push(KeyValue::new(
                "messaging.destination.name",
                exchange.to_string(),
            ));
            attributes.push(KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                routing_key.to_string(),
            ));
            // The default exchange has no name: the span is named after the routing key.
            let shown = if exchange.is_empty() {
                routing_key
            } else {
                exchange
            };
            format!("send {shown}")
        }
    };
    let status = match &send.outcome {
        Outcome::Delivered(receipt) => {
            attributes.push(KeyValue::new("pg_outbox.outcome", "delivered"));
            if let Some(partition) = receipt.partition {
                attributes.push(KeyValue::new(
                    "messaging.destination.partition.id",
                    partition.to_string(),
                ));
            }
            if let Some(offset) = receipt.offset {
                attributes.push(KeyValue::new("messaging.kafka.offset", offset));
            }
            // Left unset on success, as the conventions ask of instrumentation.
            Status::Unset
        }
        Outcome::DeadLettered(error) => {
            attributes.push(KeyValue::new("pg_outbox.outcome", "dead_lettered"));
            attributes.push(KeyValue::new("error.type", "dead_lettered"));
            Status::error(format!("dead-lettered: {error}"))
        }
    };
    let links = if parent.is_valid() {
        vec![Link::with_context(parent)]
    } else {
        Vec::new()
    };
    let mut span = traces
        .tracer
        .span_builder(name)
        .with_kind(SpanKind::Producer)
        .with_start_time(send.started)
        .with_attributes(attributes)
        .with_links(links)
        .start_with_context(&traces.tracer, &creation);
    use opentelemetry::trace::Span as _;
    span.set_status(status);
    span.end();
}

/// Whether the `traceparent` header's flags say sampled, read as the SDK reads them (trimmed,
/// the fourth `-`-separated field, hex) without parsing the rest: the full parse that follows
/// refuses what is malformed elsewhere. The header is found as [`creation_context`] finds it.
fn sampled_flag(headers: &BTreeMap<String, String>) -> bool {
    header(headers, "traceparent")
        .and_then(|value| value.trim().split_terminator('-').nth(3))
        .and_then(|flags| u8::from_str_radix(flags, 16).ok())
        .is_some_and(|flags| flags & 1 == 1)
}

/// A header by name: the exact name first, then without case (as in HTTP), the rule
/// outbox-client follows too.
fn header<'a>(headers: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .or_else(|| {
            headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value)
        })
        .map(String::as_str)
}

/// At most this many bytes of a message key go into its span: a span is kept in the SDK's queue
/// outside `delivery.max_in_flight_bytes`, and keys may be large.
const MAX_KEY_ATTRIBUTE: usize = 256;

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The message's creation context, from its W3C `traceparent` and `tracestate` headers.
fn creation_context(headers: &BTreeMap<String, String>) -> Context {
    struct Headers<'a>(&'a BTreeMap<String, String>);
    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            header(self.0, key)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(String::as_str).collect()
        }
    }
    TraceContextPropagator::new().extract(&Headers(headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_key_is_cut_on_a_character_boundary() {
        assert_eq!(truncated("abc", 256), "abc");
        let long = "é".repeat(200);
        let cut = truncated(&long, MAX_KEY_ATTRIBUTE);
        assert_eq!(cut.len(), 256);
        assert_eq!(truncated("aé", 2), "a");
    }

    #[test]
    fn the_exact_header_name_wins_over_another_case() {
        let headers = BTreeMap::from([
            ("TraceParent".to_owned(), "A".to_owned()),
            ("traceparent".to_owned(), "B".to_owned()),
        ]);
        assert_eq!(header(&headers, "traceparent"), Some("B"));
        let headers = BTreeMap::from([("TRACEPARENT".to_owned(), "A".to_owned())]);
        assert_eq!(header(&headers, "traceparent"), Some("A"));
    }

    #[test]
    fn the_creation_context_is_read_from_the_headers_whatever_their_case() {
        let headers = BTreeMap::from([(
            "TraceParent".to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        )]);
        let cx = creation_context(&headers);
        let span = cx.span();
        let parent = span.span_context();
        assert!(parent.is_valid() && parent.is_sampled());
        assert_eq!(
            parent.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        let unsampled = BTreeMap::from([(
            "traceparent".to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00".to_owned(),
        )]);
        assert!(!creation_context(&unsampled)
            .span()
            .span_context()
            .is_sampled());
        assert!(!creation_context(&BTreeMap::new())
            .span()
            .span_context()
            .is_valid());
    }
}
