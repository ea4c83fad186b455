//! Prometheus metrics. Each process has one recorder, installed by
//! [`recorder`] on first use: the scheduler installs it at start and
//! serves the text format at `/metrics` on its HTTP API
//! (`KAIROS_HTTP_ADDR`); with `KAIROS_METRICS_ADDR` set, any process also
//! serves it at `http://ADDR/metrics` ([`install`]). A process that never
//! installs it (a worker without `KAIROS_METRICS_ADDR`) records nothing,
//! at next to no cost, so the hot paths record unconditionally.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

/// Buckets for lateness and durations, in seconds: fine below 10 ms, where
/// Kairos aims, coarse above.
const BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Milliseconds in a second: histograms are in seconds, instants in Unix ms.
const MS_PER_SECOND: f64 = 1000.0;

/// How often histogram samples are folded into their buckets between
/// scrapes (a scrape folds them too).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The Prometheus text format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics exporter could not start on `addr`.
#[derive(Debug, thiserror::Error)]
#[error("KAIROS_METRICS_ADDR {addr}: {cause}")]
pub struct MetricsError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why: the address is taken or not allowed, or the program embedding
    /// Kairos installed a metrics recorder of its own.
    pub cause: String,
}

/// This process's recorder, installed on the first call. `None` when the
/// program embedding Kairos installed another `metrics` recorder first:
/// Kairos's metrics then go to that one.
pub fn recorder() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            let upkeep = handle.clone();
            // A thread rather than a task: it outlives any one runtime
            // (tests run several in one process).
            let _ = std::thread::Builder::new()
                .name("kairos-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                });
            Some(handle)
        })
        .clone()
}

/// Every metric of this process in the Prometheus text format; `None`
/// when another recorder took the metrics (see [`recorder`]).
pub fn render() -> Option<String> {
    recorder().map(|h| h.render())
}

/// Installs the recorder and serves `GET /metrics` on `addr` (no token:
/// keep the address private) until the process ends. Binds at once, so a
/// taken address fails at start. Must run inside the tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    let fail = |cause: String| MetricsError { addr, cause };
    let handle = recorder()
        .ok_or_else(|| fail("another metrics recorder is installed in this program".into()))?;
    let listener = std::net::TcpListener::bind(addr).map_err(|e| fail(e.to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| fail(e.to_string()))?;
    tokio::spawn(serve(listener, handle));
    Ok(())
}

/// Answers each connection on `listener`: `/metrics`, else 404.
async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(cause = %e, "metrics: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let handle = handle.clone();
            async move { Ok::<_, std::convert::Infallible>(answer(&req, &handle)) }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn answer<B>(req: &Request<B>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if req.uri().path() == "/metrics" {
        (StatusCode::OK, CONTENT_TYPE, handle.render())
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: metrics are at /metrics\n".to_string(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

/// Seconds between two Unix-ms instants, for histograms (never negative).
pub fn seconds_between(from_ms: i64, to_ms: i64) -> f64 {
    (to_ms.saturating_sub(from_ms)).max(0) as f64 / MS_PER_SECOND
}
