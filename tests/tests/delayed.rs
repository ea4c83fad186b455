//! The delay queue: precision, the pending-id rule, the Rust client, and the
//! events' wire shape.

use kairos_shared::client::NewTask;
use kairos_shared::events::EventKind;
use kairos_tests::*;
use kairos_worker::Worker;
use lapin::types::AMQPValue;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_tasks_start_on_time_never_early() {
    let env = TestEnv::new("delay").await;
    let mut tap = EventTap::new(&env).await;
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());

    const N: usize = 100;
    let base = now_ms() + 1000;
    let tasks: Vec<_> = batch(N, |i| {
        with_headers(
            task_props("kairos.noop", &format!("d-{i}")),
            &[("x-run-at", AMQPValue::LongLongInt(base + i as i64 * 20))],
        )
    });
    env.publish_many(&env.names.delay(), tasks).await;
    tap.wait_distinct(EventKind::Started, N, Duration::from_secs(30))
        .await;

    let mut lateness: Vec<i64> = tap
        .of(EventKind::Started)
        .iter()
        .map(|e| e.at - e.due_at.expect("x-run-at is the due time"))
        .collect();
    lateness.sort_unstable();
    println!(
        "lateness over {N} tasks: p50 {} ms, p99 {} ms, max {} ms",
        percentile(&lateness, 50.0),
        percentile(&lateness, 99.0),
        lateness[N - 1]
    );
    assert!(lateness[0] >= 0, "a task started {} ms early", -lateness[0]);
    // Only a gross bound: tests run unoptimized, next to other tests, on a
    // shared machine. Precision is measured by kairos-bench, not here; this
    // catches a pump that polls instead of sleeping until the due time.
    assert!(percentile(&lateness, 99.0) <= 1000, "{lateness:?}");
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_id_is_unique_first_submission_wins() {
    let env = TestEnv::new("uniq").await;
    let mut tap = EventTap::new(&env).await;
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());
    let delay = env.names.delay();
    let first = with_headers(
        task_props("kairos.sleep", "once"),
        &[("x-delay-ms", AMQPValue::LongInt(400))],
    );
    env.publish(&delay, "default", first, br#"{"ms": 1}"#).await;
    let second = with_headers(
        task_props("kairos.sleep", "once"),
        &[("x-delay-ms", AMQPValue::LongInt(100))],
    );
    env.publish(&delay, "default", second, br#"{"ms": 2}"#)
        .await;
    // A sentinel due after both: once it ran, a duplicate would have too.
    let sentinel = with_headers(
        task_props("kairos.noop", "sentinel"),
        &[("x-delay-ms", AMQPValue::LongInt(700))],
    );
    env.publish(&delay, "default", sentinel, b"").await;
    tap.wait_until(Duration::from_secs(20), "the sentinel", |s| {
        s.iter()
            .any(|e| e.id == "sentinel" && e.kind == "succeeded")
    })
    .await;
    let runs: Vec<_> = tap
        .of(EventKind::Started)
        .into_iter()
        .filter(|e| e.id == "once")
        .collect();
    assert_eq!(runs.len(), 1, "the second submission must be ignored");
    let scheduled = tap
        .of(EventKind::Scheduled)
        .into_iter()
        .filter(|e| e.id == "once")
        .count();
    assert_eq!(scheduled, 1);
    // The first submission won: it was due at +400 ms, not +100 ms.
    let sched = tap.first(EventKind::Scheduled, "once");
    assert!(runs[0].at >= sched.due_at.expect("due"));
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_client_enqueues_now_and_later() {
    let env = TestEnv::new("client").await;
    let log = RunLog::default();
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("report.build", log.handler(0)));
    env.declare_queue("reports").await;
    let mut wc = env.worker_config();
    wc.queues = vec!["reports".into()];
    let reports_worker = InProcess::worker(Worker::new(wc).handler("report.build", log.handler(0)));

    let client = env.client().await;
    let now_id = client
        .enqueue(
            NewTask::new("report.build")
                .json(&serde_json::json!({"n": 1}))
                .expect("json"),
        )
        .await
        .expect("enqueue");
    let later_id = client
        .enqueue(
            NewTask::new("report.build")
                .queue("reports")
                .id("later-1")
                .delay_ms(300)
                .priority(7),
        )
        .await
        .expect("enqueue delayed");
    assert_eq!(later_id, "later-1");
    let many: Vec<_> = (0..50)
        .map(|i| NewTask::new("report.build").id(format!("m-{i}")))
        .collect();
    client.enqueue_many(&many).await.expect("enqueue many");
    log.wait_distinct(52, Duration::from_secs(20)).await;
    assert_eq!(log.runs_of(&now_id), 1);
    assert_eq!(log.runs_of("later-1"), 1);
    client.close().await.expect("close");
    reports_worker.stop().await;
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_have_the_contract_shape() {
    let env = TestEnv::new("events").await;
    let mut tap = EventTap::new(&env).await;
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());
    let p = with_headers(
        task_props("kairos.noop", "ev-1"),
        &[("x-delay-ms", AMQPValue::LongInt(50))],
    );
    env.publish(&env.names.delay(), "default", p, b"").await;
    tap.wait_until(
        Duration::from_secs(20),
        "scheduled, published, started, succeeded",
        |s| {
            ["scheduled", "published", "started", "succeeded"]
                .iter()
                .all(|k| s.iter().any(|e| e.id == "ev-1" && e.kind == *k))
        },
    )
    .await;
    for e in tap.seen.iter().filter(|e| e.id == "ev-1") {
        let obj = e.raw.as_object().expect("object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = vec![
            "at", "attempt", "due_at", "error", "event", "id", "name", "queue",
        ];
        // A worker's events name it; the scheduler's have no such field.
        if matches!(e.kind.as_str(), "started" | "succeeded") {
            want.push("worker");
        }
        assert_eq!(keys, want, "{}", e.kind);
        assert_eq!(e.name, "kairos.noop");
        assert_eq!(e.raw["queue"], "default");
        assert_eq!(e.attempt, 1);
        assert!(e.error.is_none());
    }
    let published = tap.first(EventKind::Published, "ev-1");
    assert!(
        published.due_at.is_some(),
        "the scheduler knows the due time"
    );
    worker.stop().await;
    scheduler.stop().await;
}

/// Pass-through properties, headers, priority and body reach the handler
/// unchanged after a stay in the delay queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_reach_the_handler_unchanged() {
    use kairos_worker::{TaskContext, TaskError};
    let env = TestEnv::new("props").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(TaskContext, Vec<u8>)>();
    let handler = move |ctx: TaskContext, body: Vec<u8>| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((ctx, body));
            Ok::<(), TaskError>(())
        }
    };
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker = InProcess::worker(Worker::new(env.worker_config()).handler("test.props", handler));
    let props = with_headers(
        task_props("test.props", "p-1")
            .with_priority(7)
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_correlation_id("corr-9".into()),
        &[
            ("x-delay-ms", AMQPValue::LongInt(50)),
            ("tenant", AMQPValue::LongString("acme".into())),
            ("x-max-retries", AMQPValue::ShortShortUInt(4)),
        ],
    );
    env.publish(&env.names.delay(), "default", props, br#"{"k": [1, 2]}"#)
        .await;
    let (ctx, body) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("test.props ran in time")
        .expect("handler channel");
    assert_eq!(body, br#"{"k": [1, 2]}"#);
    assert_eq!(ctx.id, "p-1");
    assert_eq!(ctx.name, "test.props");
    assert_eq!(ctx.queue, "default");
    assert_eq!(ctx.priority, 7);
    assert_eq!(ctx.attempt, 1);
    assert_eq!(ctx.max_retries, Some(4));
    assert_eq!(ctx.content_type.as_deref(), Some("application/json"));
    assert_eq!(ctx.content_encoding.as_deref(), Some("gzip"));
    assert_eq!(ctx.correlation_id.as_deref(), Some("corr-9"));
    assert!(ctx.due_at.is_some(), "the scheduler sets x-run-at");
    assert_eq!(
        ctx.headers.inner().get("tenant"),
        Some(&AMQPValue::LongString("acme".into()))
    );
    worker.stop().await;
    scheduler.stop().await;
}
