//! Prometheus metrics. Each process has one recorder, installed by
//! [`recorder`] on first use: the scheduler installs it at start and
//! serves the text format at `/metrics` on its HTTP API
//! (`KAIROS_HTTP_ADDR`); with `KAIROS_METRICS_ADDR` set, any process also
//! serves it at `http://ADDR/metrics` ([`install`]); a worker also serves
//! it next to its probes on `KAIROS_WORKER_HTTP_ADDR`, through the same
//! small listener ([`bind`], [`serve`]). A process that never installs it
//! (a worker with neither address) records nothing, at next to no cost, so
//! the hot paths record unconditionally.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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

/// An HTTP listener of Kairos's (the metrics exporter, a worker's probes)
/// could not start on `addr`.
#[derive(Debug, thiserror::Error)]
#[error("{setting} {addr}: {cause}")]
pub struct MetricsError {
    /// The setting that named the address (`KAIROS_METRICS_ADDR`...).
    pub setting: &'static str,
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why: the address is taken or not allowed, or the program embedding
    /// Kairos installed a metrics recorder of its own.
    pub cause: String,
}

/// One answer of a [`serve`]d listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Reply {
            status,
            content_type: "application/json",
            body: body.to_string(),
        }
    }

    /// `/metrics`: every metric in the Prometheus text format, or 404
    /// when another recorder took them (see [`recorder`]).
    pub fn metrics() -> Self {
        match render() {
            Some(body) => Reply {
                status: 200,
                content_type: CONTENT_TYPE,
                body,
            },
            None => Reply {
                status: 404,
                content_type: "text/plain",
                body: "metrics go to the recorder of the program embedding Kairos\n".into(),
            },
        }
    }
}

/// What a [`serve`]d listener answers a `GET` of each path with.
pub type Answer = std::sync::Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// A label put on every metric of the process: set by [`label_process`]
/// before the recorder is installed.
static PROCESS_LABEL: OnceLock<(String, String)> = OnceLock::new();

/// Puts `key="value"` on every metric this process exports (a worker's
/// `worker="ID"`, so that a fleet's series can be told apart even where the
/// scraper adds no pod label). Takes effect only when called before the
/// recorder is installed, and only once per process (workers run in one
/// test process share one recorder): returns whether it did.
pub fn label_process(key: &str, value: &str) -> bool {
    PROCESS_LABEL
        .set((key.to_string(), value.to_string()))
        .is_ok()
        && !recorder_installed()
}

/// Whether [`recorder`] ran already.
fn recorder_installed() -> bool {
    HANDLE.get().is_some()
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// This process's recorder, installed on the first call. `None` when the
/// program embedding Kairos installed another `metrics` recorder first:
/// Kairos's metrics then go to that one.
pub fn recorder() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new().set_buckets(BUCKETS).ok()?;
            if let Some((key, value)) = PROCESS_LABEL.get() {
                builder = builder.add_global_label(key, value);
            }
            let recorder = builder.build_recorder();
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
    const SETTING: &str = "KAIROS_METRICS_ADDR";
    recorder().ok_or_else(|| MetricsError {
        setting: SETTING,
        addr,
        cause: "another metrics recorder is installed in this program".into(),
    })?;
    let listener = bind(SETTING, addr)?;
    let answer: Answer = std::sync::Arc::new(|path: &str| {
        if path == "/metrics" {
            Reply::metrics()
        } else {
            not_found("metrics are at /metrics")
        }
    });
    serve(listener, answer, CancellationToken::new()).map_err(|cause| MetricsError {
        setting: SETTING,
        addr,
        cause,
    })
}

/// A 404 saying where to look instead.
pub fn not_found(hint: &str) -> Reply {
    Reply {
        status: 404,
        content_type: "text/plain",
        body: format!("not found: {hint}\n"),
    }
}

/// Binds `addr` (named by `setting` in the error), so that a taken address
/// fails at start, before anything else runs.
pub fn bind(
    setting: &'static str,
    addr: SocketAddr,
) -> Result<std::net::TcpListener, MetricsError> {
    let fail = |cause: String| MetricsError {
        setting,
        addr,
        cause,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(|e| fail(e.to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    Ok(listener)
}

/// Answers `GET`s on `listener` with `answer` until `stop` fires. Must run
/// inside the tokio runtime.
pub fn serve(
    listener: std::net::TcpListener,
    answer: Answer,
    stop: CancellationToken,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        tokio::select! {
            () = accept(listener, answer) => {}
            () = stop.cancelled() => {}
        }
    });
    Ok(())
}

/// Answers each connection on `listener`.
async fn accept(listener: tokio::net::TcpListener, answer: Answer) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(cause = %e, "HTTP listener: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let answer = answer.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let reply = answer(req.uri().path());
            async move { Ok::<_, std::convert::Infallible>(response(reply)) }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(reply.body)));
    *response.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(reply.content_type) {
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
