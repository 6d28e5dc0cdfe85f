//! Trace context (feature `otel`): the creation context a published message carries, and the
//! `process` span of [`crate::Inbox::process_once`]. The spans are `tracing` spans, exported by
//! whatever `tracing-opentelemetry` layer the application installed; attributes follow the
//! OpenTelemetry messaging semantic conventions 1.45. Without the feature, nothing here costs.

use crate::Headers;
#[cfg(feature = "otel")]
pub(crate) use otel::*;

/// What [`crate::Inbox::process_once`] needs of a message: its id and, to continue its trace,
/// its queue and headers (a [`crate::received::Received`] has them; an id alone has neither).
pub trait InboxMessage {
    /// The `outbox-id`.
    fn message_id(&self) -> std::borrow::Cow<'_, str>;
    fn queue(&self) -> Option<&str> {
        None
    }
    fn headers(&self) -> Option<&Headers> {
        None
    }
}

impl InboxMessage for str {
    fn message_id(&self) -> std::borrow::Cow<'_, str> {
        self.into()
    }
}

impl InboxMessage for String {
    fn message_id(&self) -> std::borrow::Cow<'_, str> {
        self.as_str().into()
    }
}

#[cfg(any(feature = "kafka", feature = "amqp"))]
impl InboxMessage for crate::received::Received {
    fn message_id(&self) -> std::borrow::Cow<'_, str> {
        self.id.to_string().into()
    }
    fn queue(&self) -> Option<&str> {
        self.queue.as_deref()
    }
    fn headers(&self) -> Option<&Headers> {
        Some(&self.headers)
    }
}

/// The headers a publish writes, with its creation context; and the `create` span, if it made
/// one. Without the `otel` feature: the caller's headers, unchanged.
pub(crate) struct Creation<'a> {
    headers: std::borrow::Cow<'a, Headers>,
    #[cfg(feature = "otel")]
    span: Option<tracing::Span>,
}

impl<'a> Creation<'a> {
    #[cfg(not(feature = "otel"))]
    pub fn new(headers: &'a Headers, _queue: &str, _count: usize) -> Creation<'a> {
        Creation {
            headers: std::borrow::Cow::Borrowed(headers),
        }
    }

    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Runs the publishing statement (inside the `create` span, if there is one) and records the
    /// ids it returned.
    pub async fn publish<T, E>(
        &self,
        statement: impl std::future::Future<Output = Result<T, E>>,
        ids: impl Fn(&T) -> Vec<uuid::Uuid>,
    ) -> Result<T, E> {
        #[cfg(feature = "otel")]
        if let Some(span) = &self.span {
            use tracing::Instrument;
            let result = statement.instrument(span.clone()).await;
            record_ids(span, result.as_ref().map(ids));
            return result;
        }
        let _ = &ids;
        statement.await
    }
}

#[cfg(feature = "otel")]
mod otel {
    use std::borrow::Cow;

    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::{Status, TraceContextExt};
    use opentelemetry::Context;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{Creation, InboxMessage};
    use crate::Headers;

    const TRACEPARENT: &str = "traceparent";

    impl<'a> Creation<'a> {
        /// The caller's `traceparent`, if it set one; else the current span's context; else
        /// that of a new `create {queue}` PRODUCER span. A creation context is never changed
        /// afterwards: the worker's `send` and the consumer's `process` spans link to it.
        pub fn new(headers: &'a Headers, queue: &str, count: usize) -> Creation<'a> {
            let unchanged = Creation {
                headers: Cow::Borrowed(headers),
                span: None,
            };
            if headers
                .iter()
                .any(|(name, _)| name.eq_ignore_ascii_case(TRACEPARENT))
            {
                return unchanged;
            }
            let current = tracing::Span::current().context();
            if current.span().span_context().is_valid() {
                return Creation {
                    headers: Cow::Owned(inject(headers, &current)),
                    span: None,
                };
            }
            let span = tracing::info_span!(
                "create",
                otel.name = %format!("create {queue}"),
                otel.kind = "producer",
                otel.status_code = tracing::field::Empty,
                messaging.system = "pg_outbox",
                messaging.operation.type = "create",
                messaging.operation.name = "create",
                messaging.destination.name = queue,
                messaging.batch.message_count = count as i64,
                messaging.message.id = tracing::field::Empty,
            );
            let created = span.context();
            if !created.span().span_context().is_valid() {
                // No OpenTelemetry layer is installed: there is no trace to continue.
                return unchanged;
            }
            Creation {
                headers: Cow::Owned(inject(headers, &created)),
                span: Some(span),
            }
        }
    }

    /// The ids a publish returned, on its `create` span (one id: `messaging.message.id`).
    pub(super) fn record_ids<E>(span: &tracing::Span, ids: Result<Vec<uuid::Uuid>, &E>) {
        match ids {
            Ok(ids) if ids.len() == 1 => {
                span.record("messaging.message.id", ids[0].to_string());
            }
            Ok(_) => {}
            Err(_) => span.set_status(Status::error("the publish failed")),
        }
    }

    fn inject(headers: &Headers, cx: &Context) -> Headers {
        struct Into(Headers);
        impl Injector for Into {
            fn set(&mut self, key: &str, value: String) {
                let headers = std::mem::take(&mut self.0);
                self.0 = headers.with(key, value);
            }
        }
        let mut into = Into(headers.clone());
        TraceContextPropagator::new().inject_context(cx, &mut into);
        into.0
    }

    pub(super) fn extract(headers: &Headers) -> Context {
        struct From<'a>(&'a Headers);
        impl Extractor for From<'_> {
            /// The exact name first, then without case (as in HTTP): the worker's rule too.
            fn get(&self, key: &str) -> Option<&str> {
                self.0.get(key).or_else(|| {
                    self.0
                        .iter()
                        .find(|(name, _)| name.eq_ignore_ascii_case(key))
                        .map(|(_, value)| value)
                })
            }
            fn keys(&self) -> Vec<&str> {
                self.0.iter().map(|(name, _)| name).collect()
            }
        }
        TraceContextPropagator::new().extract(&From(headers))
    }

    /// The `process` CONSUMER span of one message: linked to its creation context, and its
    /// child unless the caller is inside a span of its own (then that span is the parent).
    pub(crate) fn process_span<M: InboxMessage + ?Sized>(
        consumer: &str,
        message: &M,
    ) -> tracing::Span {
        let name = match message.queue() {
            Some(queue) => format!("process {queue}"),
            None => "process".to_owned(),
        };
        let span = tracing::info_span!(
            "process",
            otel.name = %name,
            otel.kind = "consumer",
            otel.status_code = tracing::field::Empty,
            messaging.system = "pg_outbox",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.consumer.group.name = consumer,
            messaging.message.id = %message.message_id(),
            messaging.destination.name = message.queue(),
            pg_outbox.duplicate = tracing::field::Empty,
        );
        let Some(headers) = message.headers() else {
            return span;
        };
        let creation = extract(headers);
        let creation = creation.span().span_context().clone();
        if creation.is_valid() {
            let ambient = tracing::Span::current().context();
            if !ambient.span().span_context().is_valid() {
                let _ = span.set_parent(Context::new().with_remote_span_context(creation.clone()));
            }
            span.add_link(creation);
        }
        span
    }

    /// How processing ended, on its span.
    pub(crate) fn processed(span: &tracing::Span, duplicate: bool, error: Option<String>) {
        span.record("pg_outbox.duplicate", duplicate);
        if let Some(error) = error {
            span.set_status(Status::error(error));
        }
    }

    #[cfg(test)]
    mod tests {
        use opentelemetry::trace::TraceContextExt;

        use crate::Headers;

        #[test]
        fn the_exact_header_name_wins_over_another_case_as_in_the_worker() {
            let a = "00-0af7651916cd43dd8448eb211c80319c-aaaaaaaaaaaaaaaa-01";
            let b = "00-0af7651916cd43dd8448eb211c80319c-bbbbbbbbbbbbbbbb-01";
            let headers = Headers::new().with("TraceParent", a).with("traceparent", b);
            let cx = super::extract(&headers);
            assert_eq!(
                cx.span().span_context().span_id().to_string(),
                "bbbbbbbbbbbbbbbb"
            );
            let headers = Headers::new().with("TRACEPARENT", a);
            let cx = super::extract(&headers);
            assert_eq!(
                cx.span().span_context().span_id().to_string(),
                "aaaaaaaaaaaaaaaa"
            );
        }
    }
}
