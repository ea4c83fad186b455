//! Logging and trace export of every Kairos binary: `KAIROS_LOG_FORMAT`
//! (`text` or `json`), the level filter `RUST_LOG`, and OpenTelemetry
//! export over OTLP/HTTP (`KAIROS_OTLP_ENDPOINT`, in builds with the cargo
//! feature `otlp`; see docs/OPERATIONS.md).

use clap::{Args, ValueEnum};

/// How log lines are written (to stderr for kairosctl, stdout otherwise).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, with colours on a terminal.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`,
    /// `fields` (with `message`), and the current span and its parents.
    Json,
}

/// The log format setting, shared by every binary.
#[derive(Args, Clone, Debug, Default)]
pub struct LogSettings {
    /// Log line format: `text` or `json` (one JSON object per line).
    #[arg(
        long,
        env = "KAIROS_LOG_FORMAT",
        value_name = "KAIROS_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

/// Trace export settings of the scheduler and the worker.
#[derive(Args, Clone, Debug, Default)]
pub struct OtlpSettings {
    /// OTLP/HTTP endpoint to export spans to, e.g.
    /// `http://otel-collector:4318` (`/v1/traces` is added). Off when unset.
    /// Needs a build with the cargo feature `otlp`.
    #[arg(
        long,
        env = "KAIROS_OTLP_ENDPOINT",
        value_name = "KAIROS_OTLP_ENDPOINT"
    )]
    pub otlp_endpoint: Option<String>,
}

/// Keeps trace export running; dropping it sends the spans still buffered
/// (bounded by a short timeout).
#[must_use = "dropping it stops trace export"]
pub struct TraceGuard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber: `format` lines filtered by `RUST_LOG`
/// (else `default_filter`), written to stderr when `stderr` is set, plus
/// OTLP export when `otlp` names an endpoint. `service` names the process
/// in exported traces (`service.name`). An error names the setting at
/// fault; the caller exits with it.
pub fn init(
    log: &LogSettings,
    otlp: Option<&OtlpSettings>,
    service: &'static str,
    default_filter: &str,
    stderr: bool,
) -> Result<TraceGuard, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let writer = move || -> Box<dyn std::io::Write> {
        if stderr {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::io::stdout())
        }
    };
    let fmt = match log.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(on_terminal(stderr))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(writer)
            .boxed(),
    };
    let endpoint = otlp.and_then(|o| o.otlp_endpoint.as_deref());
    let (otel, guard) = otlp_layer(endpoint, service)?;
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))?;
    Ok(guard)
}

/// Colours only on a terminal, not in a log file or collector.
fn on_terminal(stderr: bool) -> bool {
    use std::io::IsTerminal;
    if stderr {
        std::io::stderr().is_terminal()
    } else {
        std::io::stdout().is_terminal()
    }
}

/// Without the `otlp` feature, an endpoint is a configuration error: the
/// operator asked for traces this build cannot send.
#[cfg(not(feature = "otlp"))]
fn otlp_layer(
    endpoint: Option<&str>,
    _service: &'static str,
) -> Result<(Option<tracing_subscriber::layer::Identity>, TraceGuard), String> {
    match endpoint {
        Some(_) => Err(NO_OTLP.to_string()),
        None => Ok((None, TraceGuard {})),
    }
}

/// What a build without the `otlp` feature says when asked to export.
#[cfg(not(feature = "otlp"))]
pub const NO_OTLP: &str =
    "KAIROS_OTLP_ENDPOINT is set, but this build has no OpenTelemetry export: \
     build with `cargo build --release --features otlp` (see docs/OPERATIONS.md#tracing) \
     or unset KAIROS_OTLP_ENDPOINT";

/// Makes the caller's span (from `traceparent`) the parent of `span` in
/// exported traces. Nothing to do without OTLP export.
#[cfg(not(feature = "otlp"))]
pub(crate) fn set_parent(
    _span: &tracing::Span,
    _tp: &crate::trace::TraceParent,
    _state: Option<&str>,
) {
}

/// Whether spans are exported (OTLP on): the scheduler opens its per-task
/// spans only then, so the hot path pays nothing otherwise.
#[cfg(not(feature = "otlp"))]
pub fn exporting() -> bool {
    false
}

#[cfg(feature = "otlp")]
mod otlp {
    use super::TraceGuard;
    use crate::trace::TraceParent;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// Set once export is on.
    static EXPORTING: AtomicBool = AtomicBool::new(false);

    /// How long one export request may take.
    const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

    /// The OTLP layer for `endpoint` (none when unset). The endpoint is
    /// the collector's base URL (`http://host:4318`); `/v1/traces` is
    /// added unless it is there already.
    pub(super) fn layer<S>(
        endpoint: Option<&str>,
        service: &'static str,
    ) -> Result<
        (
            Option<
                tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>,
            >,
            TraceGuard,
        ),
        String,
    >
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_otlp::{Protocol, WithExportConfig};

        let Some(endpoint) = endpoint else {
            return Ok((None, TraceGuard { provider: None }));
        };
        let endpoint = endpoint.trim().trim_end_matches('/');
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(format!(
                "KAIROS_OTLP_ENDPOINT: {endpoint:?} is not an http:// or https:// URL (OTLP over HTTP, e.g. http://otel-collector:4318)"
            ));
        }
        // reqwest's client is built on rustls without a provider of its
        // own: the ring provider Kairos uses everywhere (kept if the
        // embedding program installed one first).
        crate::tls::install_crypto_provider();
        let url = if endpoint.ends_with("/v1/traces") {
            endpoint.to_string()
        } else {
            format!("{endpoint}/v1/traces")
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("KAIROS_OTLP_ENDPOINT: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .build();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer(service);
        EXPORTING.store(true, Ordering::Relaxed);
        let layer = tracing_opentelemetry::layer().with_tracer(tracer);
        Ok((
            Some(layer),
            TraceGuard {
                provider: Some(provider),
            },
        ))
    }

    /// Makes the span `tp` names the remote parent of `span`.
    pub(crate) fn set_parent(span: &tracing::Span, tp: &TraceParent, state: Option<&str>) {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if !exporting() {
            return;
        }
        let state = state
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let parent = SpanContext::new(
            TraceId::from_bytes(tp.trace_id),
            SpanId::from_bytes(tp.parent_id),
            TraceFlags::new(tp.flags),
            true,
            state,
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(parent);
        let _ = span.set_parent(cx);
    }

    /// Whether spans are exported.
    pub fn exporting() -> bool {
        EXPORTING.load(Ordering::Relaxed)
    }
}

#[cfg(feature = "otlp")]
pub use otlp::exporting;
#[cfg(feature = "otlp")]
use otlp::layer as otlp_layer;
#[cfg(feature = "otlp")]
pub(crate) use otlp::set_parent;
