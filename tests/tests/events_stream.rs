//! `GET /v1/events` (the live event stream) and `kairosctl tail` against a
//! real scheduler, worker, Redis and RabbitMQ.

use kairos_shared::secrets::Secret;
use kairos_tests::*;
use kairos_worker::Worker;
use kairosctl::tail::{EventStream, TailError, TailFilter};
use kairosctl::Api;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The scheduler's `MAX_EVENT_STREAMS` (docs/HTTP.md, "Events").
const MAX_STREAMS: usize = 64;
const TOKEN: &str = "events-token-0123456789abcdef";
/// The longest any one event may take to arrive.
const EVENT_WAIT: Duration = Duration::from_secs(20);

/// A scheduler (events and token on) and a worker running every builtin.
async fn start(env: &TestEnv) -> (SocketAddr, InProcess, InProcess) {
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    sc.api_token = Some(Secret::new(TOKEN));
    let scheduler = InProcess::scheduler(sc);
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());
    let deadline = Instant::now() + EVENT_WAIT;
    while http_get(addr.port(), "/healthz").is_none_or(|(s, _)| s != 200) {
        assert!(Instant::now() < deadline, "the scheduler never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (addr, scheduler, worker)
}

/// Reads `stream` on a thread of its own, sending each event.
fn collect(mut stream: EventStream) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(Some(event)) = stream.next_event() {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    rx
}

/// Events from `rx` until `last` says one is the last; fails past
/// [`EVENT_WAIT`] for any of them.
fn until(rx: &mpsc::Receiver<Value>, last: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let event = rx
            .recv_timeout(EVENT_WAIT)
            .unwrap_or_else(|_| panic!("no further event; seen so far: {seen:?}"));
        let done = last(&event);
        seen.push(event);
        if done {
            return seen;
        }
    }
}

/// The lines `from` gives, read on a thread of their own.
fn lines_of(from: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn enqueue(addr: SocketAddr, id: &str) {
    let api = Api::new(&addr.to_string()).with_token(Some(TOKEN.into()));
    let r = api
        .enqueue(&json!({"name": "kairos.noop", "id": id, "delay_ms": 10}))
        .expect("enqueue");
    assert_eq!(r.status, 202, "{:?}", r.body);
}

fn kinds_of(events: &[Value], id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["id"] == id)
        .map(|e| e["event"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_carries_a_tasks_events_filtered() {
    let env = TestEnv::new("sse").await;
    let (addr, scheduler, worker) = start(&env).await;
    let a = addr.to_string();

    let by_id = TailFilter {
        id: Some("sse-a".into()),
        ..TailFilter::default()
    };
    let only_succeeded = TailFilter {
        event: Some("succeeded".into()),
        ..TailFilter::default()
    };
    let (by_id, only_succeeded) = tokio::task::spawn_blocking(move || {
        let open = |f: &TailFilter| EventStream::open(&a, Some(TOKEN), f).expect("open stream");
        (collect(open(&by_id)), collect(open(&only_succeeded)))
    })
    .await
    .expect("open streams");

    tokio::task::spawn_blocking(move || {
        enqueue(addr, "sse-b");
        enqueue(addr, "sse-a");
    })
    .await
    .expect("enqueue");

    let succeeded = |id: &'static str| move |e: &Value| e["id"] == id && e["event"] == "succeeded";
    let seen = tokio::task::spawn_blocking(move || until(&by_id, succeeded("sse-a")))
        .await
        .expect("stream by id");
    let kinds = kinds_of(&seen, "sse-a");
    // `published` comes from the scheduler and `succeeded` from the worker,
    // on connections of their own: the order between them is not kept, so
    // the stream may end before `published` arrives.
    for kind in ["scheduled", "started", "succeeded"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing: {seen:?}");
    }
    assert!(
        seen.iter().all(|e| e["id"] == "sse-a"),
        "another task's event passed the id filter: {seen:?}"
    );
    let done = tokio::task::spawn_blocking(move || {
        let mut both = until(&only_succeeded, |e| {
            e["id"] == "sse-a" || e["id"] == "sse-b"
        });
        let first = both[0]["id"].as_str().unwrap_or_default().to_string();
        let other = if first == "sse-a" { "sse-b" } else { "sse-a" };
        both.extend(until(&only_succeeded, move |e| e["id"] == other));
        both
    })
    .await
    .expect("stream by event");
    assert!(
        done.iter().all(|e| e["event"] == "succeeded"),
        "the event filter let others through: {done:?}"
    );

    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_and_missing_tokens_are_refused() {
    let env = TestEnv::new("sse-refused").await;
    let (addr, scheduler, worker) = start(&env).await;
    let a = addr.to_string();
    tokio::task::spawn_blocking(move || {
        let api = Api::new(&a).with_token(Some(TOKEN.into()));
        for path in ["/v1/events?ids=x", "/v1/events?event=started,nope"] {
            let r = api.send("GET", path, None).expect("answer");
            assert_eq!(r.status, 400, "{path}: {:?}", r.body);
            assert!(r.body["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        let open = |token| EventStream::open(&a, token, &TailFilter::default()).err();
        assert!(
            matches!(open(None), Some(TailError::Status { status: 401, .. })),
            "no token must be refused"
        );
        assert!(
            matches!(
                open(Some("wrong")),
                Some(TailError::Status { status: 401, .. })
            ),
            "a wrong token must be refused"
        );
        // Streams are bounded: one past the limit is refused with 503.
        let held: Vec<EventStream> = (0..MAX_STREAMS)
            .map(|_| EventStream::open(&a, Some(TOKEN), &TailFilter::default()).expect("open"))
            .collect();
        assert!(
            matches!(
                open(Some(TOKEN)),
                Some(TailError::Status { status: 503, .. })
            ),
            "stream {} must be refused",
            MAX_STREAMS + 1
        );
        drop(held);
    })
    .await
    .expect("checks");
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kairosctl_tail_prints_the_events_as_json() {
    let env = TestEnv::new("sse-ctl").await;
    let (addr, scheduler, worker) = start(&env).await;
    let mut child = Command::new(binary("kairosctl"))
        .args([
            "tail",
            "--json",
            "--id",
            "ctl-a",
            "--event",
            "started,succeeded",
        ])
        .args(["--count", "2"])
        .env("KAIROS_HTTP_ADDR", addr.to_string())
        .env("KAIROS_API_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kairosctl tail");
    let stderr = child.stderr.take().expect("stderr");
    let stdout = child.stdout.take().expect("stdout");
    let (rx, out_rx) = (lines_of(stderr), lines_of(stdout));
    let first = rx.recv_timeout(EVENT_WAIT).expect("tail says it follows");
    assert!(first.contains("following"), "{first}");

    tokio::task::spawn_blocking(move || {
        enqueue(addr, "ctl-b");
        enqueue(addr, "ctl-a");
    })
    .await
    .expect("enqueue");
    let lines: Vec<Value> = (0..2)
        .map(|_| {
            let line = out_rx.recv_timeout(EVENT_WAIT).expect("an event line");
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
        })
        .collect();
    assert_eq!(
        kinds_of(&lines, "ctl-a"),
        ["started", "succeeded"],
        "{lines:?}"
    );
    let deadline = Instant::now() + EVENT_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for tail") {
            break status;
        }
        assert!(Instant::now() < deadline, "tail did not exit after --count");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");

    // Without --http-addr there is no stream to follow.
    let out = Command::new(binary("kairosctl"))
        .args(["tail"])
        .env_remove("KAIROS_HTTP_ADDR")
        .output()
        .expect("run kairosctl tail");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--http-addr"));

    worker.stop().await;
    scheduler.stop().await;
}
