use std::collections::BTreeMap;

/// User headers of a message: string names to string values. They reach Kafka and AMQP
/// consumers unchanged, beside the `outbox-*` headers the worker adds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(BTreeMap<String, String>);

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a header.
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.insert(name.into(), value.into());
        self
    }

    /// Sets the W3C `traceparent` header so a trace continues across the broker.
    pub fn with_traceparent(self, traceparent: impl Into<String>) -> Self {
        self.with("traceparent", traceparent)
    }

    /// Sets `content-type`, e.g. for `publish_bytes` payloads.
    pub fn with_content_type(self, content_type: impl Into<String>) -> Self {
        self.with("content-type", content_type)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect(),
        )
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Headers(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}
