//! Tracing across processes: a W3C `traceparent` set by the client rides
//! with the task through the delay queue, the retry and the dead letter,
//! and every attempt's handler span names its trace.

use kairos_shared::client::NewTask;
use kairos_shared::trace::{TraceParent, H_TRACEPARENT, H_TRACESTATE};
use kairos_tests::*;
use kairos_worker::{TaskContext, TaskError, Worker};
use lapin::types::AMQPValue;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// The fields of every `task` span this process opened, by span id.
#[derive(Clone, Default)]
struct SpanFields(Arc<Mutex<HashMap<u64, HashMap<String, String>>>>);

impl SpanFields {
    fn of(&self, id: &Id) -> HashMap<String, String> {
        let spans = self.0.lock().unwrap_or_else(|p| p.into_inner());
        spans.get(&id.into_u64()).cloned().unwrap_or_default()
    }
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber> Layer<S> for SpanFields {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "task" {
            let mut fields = HashMap::new();
            attrs.record(&mut Fields(&mut fields));
            let mut spans = self.0.lock().unwrap_or_else(|p| p.into_inner());
            spans.insert(id.into_u64(), fields);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut spans = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fields) = spans.get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
}

/// The process-wide span recorder (a test binary has one global
/// subscriber: each test asks for it before `TestEnv::new`, which would
/// install the test logger instead).
fn spans() -> SpanFields {
    static SPANS: OnceLock<SpanFields> = OnceLock::new();
    SPANS
        .get_or_init(|| {
            let spans = SpanFields::default();
            let subscriber = tracing_subscriber::registry().with(spans.clone());
            tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
            spans
        })
        .clone()
}

/// What a handler saw on one attempt: (task id, attempt, the span's
/// `trace_id` and `parent_span` fields, the `traceparent` header).
type Attempt = (String, u32, Option<String>, Option<String>, Option<String>);

/// Every attempt the handler saw, and a wake-up for each.
#[derive(Default)]
struct Seen {
    all: Mutex<Vec<Attempt>>,
    added: tokio::sync::Notify,
}

impl Seen {
    fn push(&self, attempt: Attempt) {
        self.all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(attempt);
        self.added.notify_waiters();
    }

    fn of(&self, id: &str) -> Vec<Attempt> {
        let all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().filter(|s| s.0 == id).cloned().collect()
    }

    /// Waits until each of `ids` ran at least once.
    async fn wait_for(&self, ids: &[&str], within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let added = self.added.notified();
            if ids.iter().all(|id| !self.of(id).is_empty()) {
                return;
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                panic!("not all of {ids:?} ran: {:?}", self.all.lock());
            }
        }
    }
}

/// A handler that records what its span and context say, and fails while
/// the task id starts with `fail`.
fn recording(spans: SpanFields, seen: Arc<Seen>) -> impl kairos_worker::Handler {
    move |ctx: TaskContext, _body: Vec<u8>| {
        let (spans, seen) = (spans.clone(), seen.clone());
        async move {
            let fields = tracing::Span::current()
                .id()
                .map(|id| spans.of(&id))
                .unwrap_or_default();
            let header = ctx.headers.inner().get(H_TRACEPARENT).map(|v| match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                other => format!("{other:?}"),
            });
            seen.push((
                ctx.id.clone(),
                ctx.attempt,
                fields.get("trace_id").cloned(),
                fields.get("parent_span").cloned(),
                header,
            ));
            if ctx.id.starts_with("fail") {
                Err(TaskError::retry("failing on purpose"))
            } else {
                Ok(())
            }
        }
    }
}

/// `POST /v1/tasks` with `body` and an HTTP `traceparent` header: the
/// status.
fn post_with_traceparent(port: u16, body: &str, traceparent: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let req = format!(
        "POST /v1/tasks HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\ntraceparent: {traceparent}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    raw.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_follows_the_task_through_delay_retry_and_dead_letter() {
    let spans = spans();
    let env = TestEnv::new("trace").await;
    let mut sc = env.scheduler_config();
    sc.retry_base_ms = 100;
    let addr = free_addr();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let seen = Arc::new(Seen::default());
    let worker = InProcess::worker(
        Worker::new(env.worker_config()).handler("test.traced", recording(spans, seen.clone())),
    );
    let client = env.client().await;

    // Delayed, fails on both attempts (one retry), then dead-lettered.
    client
        .enqueue(
            NewTask::new("test.traced")
                .id("fail-1")
                .delay_ms(200)
                .max_retries(1)
                .traceparent(TP)
                .tracestate("congo=t61rcWkgMzE"),
        )
        .await
        .expect("enqueue");
    // A value that is no traceparent is ignored by the setter, and one
    // set anyway as a raw header runs the task without a trace.
    client
        .enqueue(
            NewTask::new("test.traced")
                .id("bad-setter")
                .traceparent("00-nothex-00f067aa0ba902b7-01"),
        )
        .await
        .expect("enqueue");
    client
        .enqueue(NewTask::new("test.traced").id("bad-raw").header(
            H_TRACEPARENT,
            AMQPValue::LongString("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".into()),
        ))
        .await
        .expect("enqueue");

    let dead = env.dead_letters(1, Duration::from_secs(30)).await;
    let dl = dead_letter_of(&dead, "fail-1");
    assert_eq!(dl.header(H_TRACEPARENT).as_deref(), Some(TP), "{dl:?}");
    assert_eq!(
        dl.header(H_TRACESTATE).as_deref(),
        Some("congo=t61rcWkgMzE"),
        "{dl:?}"
    );

    let attempts = seen.of("fail-1");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    for (n, (_, attempt, trace_id, parent, header)) in attempts.iter().enumerate() {
        assert_eq!(*attempt as usize, n + 1);
        assert_eq!(trace_id.as_deref(), Some(TRACE_ID), "{attempts:?}");
        assert_eq!(parent.as_deref(), Some(PARENT), "{attempts:?}");
        assert_eq!(header.as_deref(), Some(TP), "{attempts:?}");
    }

    // Over HTTP, in `headers`: the same, for a task run at once.
    let api = ScheduleApi::new(addr);
    api.wait_ready(Duration::from_secs(20)).await;
    let other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let r = api
        .call(move |a| {
            a.enqueue(&json!({"name": "test.traced", "id": "http-1",
                "headers": {"traceparent": other}}))
        })
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    // Or as the request's own HTTP header, as a traced HTTP client sends it.
    let body = r#"{"name": "test.traced", "id": "http-2"}"#;
    let port = addr.port();
    let status = tokio::task::spawn_blocking(move || {
        post_with_traceparent(
            port,
            body,
            "00-11111111111111111111111111111111-2222222222222222-01",
        )
    })
    .await
    .expect("post");
    assert_eq!(status, 202);

    seen.wait_for(
        &["bad-setter", "bad-raw", "http-1", "http-2"],
        Duration::from_secs(20),
    )
    .await;
    let http = &seen.of("http-1")[0];
    assert_eq!(http.2.as_deref(), Some("0af7651916cd43dd8448eb211c80319c"));
    assert_eq!(http.3.as_deref(), Some("b7ad6b7169203331"));
    let http = &seen.of("http-2")[0];
    assert_eq!(http.2.as_deref(), Some("11111111111111111111111111111111"));
    assert_eq!(http.3.as_deref(), Some("2222222222222222"));
    let setter = &seen.of("bad-setter")[0];
    assert_eq!((&setter.2, &setter.4), (&None, &None), "{setter:?}");
    let raw = &seen.of("bad-raw")[0];
    assert_eq!(
        raw.2, None,
        "an invalid traceparent names no trace: {raw:?}"
    );
    assert!(raw.4.is_some(), "but the header is passed on: {raw:?}");
    assert!(TraceParent::parse(TP).is_some());

    worker.stop().await;
    scheduler.stop().await;
}

/// `KAIROS_LOG_FORMAT=json` writes one JSON object per line; a bad value,
/// or `KAIROS_OTLP_ENDPOINT` in a build without the `otlp` feature, stops
/// the binary at start with the setting named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_and_bad_settings_name_the_setting() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    // Before TestEnv: this binary's one global subscriber is the recorder.
    let _ = spans();
    let env = TestEnv::new("logfmt").await;
    let mut child = Command::new(binary("kairos-worker"))
        .envs(env.process_env())
        .env("KAIROS_LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("worker starts");
    let stdout = child.stdout.take().expect("stdout");
    let first = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("worker starting"))
    });
    let line = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("a log line in time")
        .expect("reader")
        .expect("the start line");
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["fields"]["message"], "worker starting", "{v}");
    assert!(v["timestamp"].is_string(), "{v}");

    // (binary, environment, the setting its error must name)
    type Bad<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let mut bad: Vec<Bad> = vec![
        (
            "kairos-worker",
            vec![("KAIROS_LOG_FORMAT", "yaml")],
            "KAIROS_LOG_FORMAT",
        ),
        (
            "kairos-scheduler",
            vec![("KAIROS_LOG_FORMAT", "yaml")],
            "KAIROS_LOG_FORMAT",
        ),
        (
            "kairosctl",
            vec![("KAIROS_LOG_FORMAT", "yaml")],
            "KAIROS_LOG_FORMAT",
        ),
    ];
    if !cfg!(feature = "otlp") {
        for bin in ["kairos-worker", "kairos-scheduler"] {
            bad.push((
                bin,
                vec![("KAIROS_OTLP_ENDPOINT", "http://127.0.0.1:4318")],
                "KAIROS_OTLP_ENDPOINT",
            ));
        }
    }
    for (bin, vars, named) in bad {
        let mut cmd = Command::new(binary(bin));
        cmd.envs(env.process_env()).envs(vars.iter().copied());
        if bin == "kairosctl" {
            cmd.args(["schedule", "list"]);
        }
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .expect("runs")
            .expect("output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bin} {vars:?}: {stderr}");
        assert!(stderr.contains(named), "{bin} {vars:?}: {stderr}");
    }
}
