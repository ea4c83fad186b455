//! What a handler can say besides success or failure (issue 16): a delay
//! of its own for the next attempt (Retry-After), follow-up tasks through
//! the client in its context, and a result kept with its status.

use kairos_shared::client::NewTask;
use kairos_shared::contract::Task;
use kairos_shared::events::EventKind;
use kairos_shared::status::{ShardCount, StatusStore, StatusUpdate, TaskState, TaskStatus};
use kairos_tests::*;
use kairos_worker::{Json, TaskContext, TaskError, TaskOutput, Worker};
use serde_json::{json, Value};
use std::time::Duration;

/// The namespace's task status store, as the worker sees it.
fn status_store(env: &TestEnv) -> StatusStore {
    let pool = kairos_shared::redis::pool(REDIS_URL, &Default::default(), Duration::from_secs(5))
        .expect("redis pool");
    StatusStore::new(
        kairos_shared::redis::RedisConn::new(pool),
        &env.ns,
        ShardCount::lookup(),
        3_600,
    )
}

/// Waits until task `id`'s status is `state` (statuses are written in the
/// background, so there is no event to await).
async fn wait_state(store: &StatusStore, id: &str, state: TaskState) -> TaskStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(s)) = store.get(id).await {
            if s.state == Some(state) {
                return s;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {id} never reached {state:?}: {:?}",
            store.get(id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stored result as the API shows it.
fn result_of(s: &TaskStatus) -> Value {
    serde_json::to_value(s).expect("status as JSON")["result"].clone()
}

/// Fails its first attempt asking to come back after [`RETRY_AFTER`],
/// succeeds on the next.
async fn rate_limited(ctx: TaskContext, _: Vec<u8>) -> Result<(), TaskError> {
    if ctx.attempt == 1 {
        return Err(TaskError::retry_after(RETRY_AFTER, "429: come back later"));
    }
    Ok(())
}

const RETRY_AFTER: Duration = Duration::from_millis(1_500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_replaces_the_backoff_for_one_retry() {
    let env = TestEnv::new("rafter").await;
    let mut tap = EventTap::new(&env).await;
    let mut sc = env.scheduler_config();
    // The backoff would hold the retry 10 to 20 s (equal jitter).
    sc.retry_base_ms = 20_000;
    let scheduler = InProcess::scheduler(sc);
    let worker = InProcess::worker(
        Worker::new(env.worker_config()).handler("test.rate-limited", rate_limited),
    );
    env.publish(
        &env.names.tasks_exchange(),
        "default",
        task_props("test.rate-limited", "ra-1"),
        b"{}",
    )
    .await;
    tap.wait_until(Duration::from_secs(10), "the retry to succeed", |s| {
        s.iter().any(|e| e.id == "ra-1" && e.kind == "succeeded")
    })
    .await;
    let starts: Vec<_> = tap
        .of(EventKind::Started)
        .into_iter()
        .filter(|e| e.id == "ra-1")
        .map(|e| (e.attempt, e.at))
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!((starts[0].0, starts[1].0), (1, 2));
    let gap = starts[1].1 - starts[0].1;
    let wanted = RETRY_AFTER.as_millis() as i64;
    assert!(
        gap >= wanted && gap < 10_000,
        "attempt 2 came {gap} ms after attempt 1; Retry-After asked {wanted} ms"
    );
    let failed = tap.first(EventKind::Failed, "ra-1");
    assert!(
        failed.error.as_deref().unwrap_or_default().contains("429"),
        "{failed:?}"
    );
    worker.stop().await;
    scheduler.stop().await;
}

/// A consumer in another language cannot put a header on a reject: it
/// publishes the failed delivery to `NS.retry` itself, with
/// `x-retry-after-ms` (docs/CONTRACT.md), then acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_consumer_sets_retry_after_by_republishing() {
    use kairos_shared::contract::{H_ATTEMPT, H_ERROR, H_RETRY_AFTER_MS};
    use lapin::types::AMQPValue;
    let env = TestEnv::new("raforeign").await;
    let mut sc = env.scheduler_config();
    sc.retry_base_ms = 20_000;
    let scheduler = InProcess::scheduler(sc);
    let mut consumer = env.consume_queue("default", 10).await;
    let props = with_headers(
        task_props("test.foreign", "fr-1"),
        &[
            (H_ATTEMPT, AMQPValue::LongLongInt(1)),
            (H_ERROR, AMQPValue::LongString("503 from upstream".into())),
            (H_RETRY_AFTER_MS, AMQPValue::LongString("1200".into())),
        ],
    );
    let sent = std::time::Instant::now();
    env.publish(&env.names.retry(), "default", props, b"{}")
        .await;
    let d = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::StreamExt::next(&mut consumer),
    )
    .await
    .expect("the retry within 10 s, not after the 10 to 20 s backoff")
    .expect("a delivery")
    .expect("no error");
    let waited = sent.elapsed();
    assert!(waited >= Duration::from_millis(1_100), "{waited:?}");
    let headers = d.properties.headers().clone().unwrap_or_default();
    assert_eq!(
        headers
            .inner()
            .get(H_ATTEMPT)
            .map(kairos_shared::contract::value_to_string)
            .as_deref(),
        Some("2")
    );
    assert!(
        !headers.contains_key(H_RETRY_AFTER_MS),
        "for one retry only"
    );
    ack(&d).await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_enqueues_follow_ups_through_its_context() {
    let env = TestEnv::new("follow").await;
    env.declare_queue("children").await;
    let log = RunLog::default();
    let parent = |ctx: TaskContext, _: Vec<u8>| async move {
        let client = ctx.client()?;
        // Delayed and immediate, into another queue; stable ids so that a
        // retried parent enqueues each child once.
        client
            .enqueue(
                NewTask::new("test.child")
                    .queue("children")
                    .id(format!("{}-now", ctx.id)),
            )
            .await?;
        client
            .enqueue(
                NewTask::new("test.child")
                    .queue("children")
                    .id(format!("{}-later", ctx.id))
                    .delay_ms(200),
            )
            .await?;
        Ok::<_, TaskError>(())
    };
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let mut wc = env.worker_config();
    wc.queues = vec!["default".into(), "children".into()];
    let worker = InProcess::worker(
        Worker::new(wc)
            .handler("test.parent", parent)
            .handler("test.child", log.handler(0)),
    );
    env.publish(
        &env.names.tasks_exchange(),
        "default",
        task_props("test.parent", "p-1"),
        b"",
    )
    .await;
    log.wait_distinct(2, Duration::from_secs(15)).await;
    assert_eq!(log.runs_of("p-1-now"), 1);
    assert_eq!(log.runs_of("p-1-later"), 1);
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_result_is_kept_with_its_status() {
    let env = TestEnv::new("result").await;
    let store = status_store(&env);
    let mut wc = env.worker_config();
    wc.handler_limits.max_result_bytes = 64;
    let worker = InProcess::worker(
        Worker::new(wc)
            .handler("test.json", |_: TaskContext, _: Vec<u8>| async {
                // Any Serialize value.
                Ok::<_, TaskError>(Json(std::collections::BTreeMap::from([
                    ("rows", 3),
                    ("cols", 2),
                ])))
            })
            .handler("test.bytes", |_: TaskContext, _: Vec<u8>| async {
                Ok::<_, TaskError>(vec![0u8, 1, 2])
            })
            .handler("test.value", |_: TaskContext, _: Vec<u8>| async {
                Ok::<_, TaskError>(json!(["a", 1]))
            })
            .handler("test.big", |_: TaskContext, _: Vec<u8>| async {
                Ok::<_, TaskError>(TaskOutput::Bytes(vec![7; 65]))
            })
            .handler("test.none", |_: TaskContext, _: Vec<u8>| async {
                Ok::<_, TaskError>(())
            })
            .handler("test.text", |_: TaskContext, _: Vec<u8>| async {
                Ok::<_, TaskError>("done")
            }),
    );
    for name in ["json", "bytes", "value", "big", "none", "text"] {
        let props = task_props(&format!("test.{name}"), &format!("r-{name}"));
        env.publish(&env.names.tasks_exchange(), "default", props, b"")
            .await;
    }
    let s = wait_state(&store, "r-json", TaskState::Succeeded).await;
    assert_eq!(result_of(&s), json!({"rows": 3, "cols": 2}));
    let s = wait_state(&store, "r-bytes", TaskState::Succeeded).await;
    assert_eq!(result_of(&s), json!({"base64": "AAEC"}));
    let s = wait_state(&store, "r-value", TaskState::Succeeded).await;
    assert_eq!(result_of(&s), json!(["a", 1]));
    // Over KAIROS_MAX_RESULT_BYTES: the task succeeds, without a result,
    // and its status says why.
    let s = wait_state(&store, "r-big", TaskState::Succeeded).await;
    assert_eq!(result_of(&s), Value::Null);
    let error = s.error.unwrap_or_default();
    assert!(error.contains("KAIROS_MAX_RESULT_BYTES"), "{error}");
    let s = wait_state(&store, "r-none", TaskState::Succeeded).await;
    assert_eq!(result_of(&s), Value::Null);
    assert_eq!(s.error, None);
    let s = wait_state(&store, "r-text", TaskState::Succeeded).await;
    assert_eq!(result_of(&s), json!("done"));
    worker.stop().await;
}

/// A status for `id`, as a worker running it would leave.
async fn running_status(store: &StatusStore, id: &str) {
    let (_, props) = NewTask::new("test.other-language")
        .id(id)
        .to_message()
        .expect("message");
    let task = Task::decode("default", &props, b"").expect("task");
    store
        .merge(&StatusUpdate::running(&task, "python-worker-1"))
        .await
        .expect("status written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_in_other_languages_report_over_http() {
    let env = TestEnv::new("hio").await;
    let store = status_store(&env);
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    sc.handler_limits.max_result_bytes = 32;
    sc.handler_limits.max_checkpoint_bytes = 32;
    let scheduler = InProcess::scheduler(sc);
    let api = ScheduleApi::new(addr);
    api.wait_ready(Duration::from_secs(20)).await;
    let send = |method: &'static str, path: String, body: Option<Value>| {
        let api = api.clone();
        async move {
            api.call(move |a| {
                let raw = body.map(|b| b.to_string().into_bytes());
                a.send(method, &path, raw.as_deref())
            })
            .await
        }
    };

    // Progress and results need a status; checkpoints do not.
    let r = send(
        "PUT",
        "/v1/tasks/py-1/progress".into(),
        Some(json!({"percent": 5})),
    )
    .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    let r = send(
        "PUT",
        "/v1/tasks/py-1/result".into(),
        Some(json!({"result": 1})),
    )
    .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    let r = send("GET", "/v1/tasks/py-1/checkpoint".into(), None).await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    running_status(&store, "py-1").await;

    let r = send(
        "PUT",
        "/v1/tasks/py-1/progress".into(),
        Some(json!({"percent": 40, "message": "rows 40 of 100"})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let s = store.get("py-1").await.expect("redis").expect("status");
    assert_eq!(s.progress, Some(40));
    assert_eq!(s.progress_message.as_deref(), Some("rows 40 of 100"));
    for (body, field) in [
        (json!({"percent": 101}), "percent"),
        (json!({"percent": -1}), "percent"),
        (json!({"percent": "half"}), "percent"),
        (json!({"percent": 5, "colour": "red"}), "body"),
        (json!([1]), "body"),
    ] {
        let r = send("PUT", "/v1/tasks/py-1/progress".into(), Some(body.clone())).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
        assert_eq!(r.body["field"], field, "{body}: {:?}", r.body);
    }

    // Checkpoints: JSON or bytes, read back both ways.
    let r = send(
        "PUT",
        "/v1/tasks/py-1/checkpoint".into(),
        Some(json!({"checkpoint": {"at": 3}})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = send("GET", "/v1/tasks/py-1/checkpoint".into(), None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["checkpoint"], json!({"at": 3}));
    assert_eq!(r.body["checkpoint_base64"], "eyJhdCI6M30=");
    assert_eq!(
        store.load_checkpoint("py-1").await.expect("redis"),
        Some(br#"{"at":3}"#.to_vec()),
        "where a Kairos worker loads it from"
    );
    let r = send(
        "PUT",
        "/v1/tasks/py-1/checkpoint".into(),
        Some(json!({"checkpoint_base64": "AAEC"})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = send("GET", "/v1/tasks/py-1/checkpoint".into(), None).await;
    assert_eq!(r.body["checkpoint"], Value::Null, "not JSON");
    assert_eq!(r.body["checkpoint_base64"], "AAEC");
    let big = "x".repeat(40);
    let r = send(
        "PUT",
        "/v1/tasks/py-1/checkpoint".into(),
        Some(json!({"checkpoint": big})),
    )
    .await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert_eq!(r.body["field"], "checkpoint");
    assert!(r.body["error"]
        .as_str()
        .is_some_and(|e| e.contains("KAIROS_MAX_CHECKPOINT_BYTES")));
    let r = send(
        "PUT",
        "/v1/tasks/py-1/checkpoint".into(),
        Some(json!({"checkpoint_base64": "not base64!"})),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["field"], "checkpoint_base64");

    // Results: JSON or bytes, bounded.
    let r = send(
        "PUT",
        "/v1/tasks/py-1/result".into(),
        Some(json!({"result": {"ok": true}})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let s = store.get("py-1").await.expect("redis").expect("status");
    assert_eq!(result_of(&s), json!({"ok": true}));
    let r = send(
        "PUT",
        "/v1/tasks/py-1/result".into(),
        Some(json!({"result_base64": "AAEC"})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let s = store.get("py-1").await.expect("redis").expect("status");
    assert_eq!(result_of(&s), json!({"base64": "AAEC"}));
    let r = send(
        "PUT",
        "/v1/tasks/py-1/result".into(),
        Some(json!({"result": big})),
    )
    .await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert_eq!(r.body["field"], "result");
    let r = send("PUT", "/v1/tasks/py-1/result".into(), Some(json!({}))).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    scheduler.stop().await;
}
