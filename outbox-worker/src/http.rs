//! `/metrics` (Prometheus text) and `/health/live`, `/health/ready` over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::health::Health;

/// Installs the process-wide metrics recorder; latencies get histogram buckets from 1 ms to 60 s.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    const BUCKETS: [f64; 14] = [
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 15.0, 60.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)?
        .install_recorder()?;
    crate::telemetry::describe();
    Ok(handle)
}

/// Binds before anything else starts, so a busy port is a start-up error, not a silent one.
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener, ConfigError> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| ConfigError::Invalid(format!("http.listen = {listen}: cannot listen: {e}")))
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { metrics.render() }))
        .route("/health/live", get(|| async { "live\n" }))
        .route(
            "/health/ready",
            get(move || async move {
                if health.ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        );
    tracing::info!(listen = %listener.local_addr()?, "serving /metrics and /health");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}
