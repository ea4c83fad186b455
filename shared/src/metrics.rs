//! Prometheus metrics. Off unless `KAIROS_METRICS_ADDR` is set; then the
//! process serves `GET /metrics` on that address. Recording a metric when
//! no exporter is installed costs next to nothing, so the hot paths record
//! unconditionally.

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder};
use std::net::SocketAddr;

/// Buckets for lateness and durations, in seconds: fine below 10 ms, where
/// Kairos aims, coarse above.
const BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Milliseconds in a second: histograms are in seconds, instants in Unix ms.
const MS_PER_SECOND: f64 = 1000.0;

/// The exporter could not start on `addr` (taken, or not allowed).
#[derive(Debug, thiserror::Error)]
#[error("KAIROS_METRICS_ADDR {addr}: {source}")]
pub struct MetricsError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why the exporter refused.
    #[source]
    pub source: BuildError,
}

/// Starts the exporter on `addr`. Must run inside the tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(BUCKETS)
        .and_then(PrometheusBuilder::install)
        .map_err(|source| MetricsError { addr, source })
}

/// Seconds between two Unix-ms instants, for histograms (never negative).
pub fn seconds_between(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms.saturating_sub(from_ms)).max(0) as f64 / MS_PER_SECOND
}
