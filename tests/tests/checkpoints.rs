//! Fault recovery by checkpoint (issue 16): a long task saves where it got
//! to, and the next attempt of it (after a worker killed with kill -9, or
//! after a failure) resumes from there instead of starting over. The
//! built-in `kairos.count` counts to N, saving a checkpoint at every step;
//! its result says where it started.

use kairos_shared::events::EventKind;
use kairos_shared::status::{ShardCount, StatusStore, TaskState, TaskStatus};
use kairos_tests::*;
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

/// Polls (statuses and checkpoints are written with no event to await)
/// until `done` gives a value, for at most `within`.
async fn poll<T>(within: Duration, what: &str, mut done: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = done().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The step a `kairos.count` checkpoint records.
async fn saved_step(store: &StatusStore, id: &str) -> Option<u64> {
    let cp = store.load_checkpoint(id).await.ok()??;
    serde_json::from_slice::<Value>(&cp).ok()?["at"].as_u64()
}

async fn succeeded(store: &StatusStore, id: &str) -> TaskStatus {
    poll(Duration::from_secs(60), "the task to succeed", async || {
        store
            .get(id)
            .await
            .ok()
            .flatten()
            .filter(|s| s.state == Some(TaskState::Succeeded))
    })
    .await
}

fn result_of(s: &TaskStatus) -> Value {
    serde_json::to_value(s).expect("status as JSON")["result"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_task_resumes_from_its_checkpoint() {
    let env = TestEnv::new("cpkill").await;
    let store = status_store(&env);
    let mut tap = EventTap::new(&env).await;
    let penv = env.process_env();
    let mut first = Proc::spawn("kairos-worker", &penv);
    let to = 100;
    env.publish(
        &env.names.tasks_exchange(),
        "default",
        task_props("kairos.count", "count-1"),
        json!({"to": to, "ms_per_step": 50}).to_string().as_bytes(),
    )
    .await;
    let before_kill = poll(Duration::from_secs(30), "checkpoint 5", async || {
        saved_step(&store, "count-1").await.filter(|at| *at >= 5)
    })
    .await;
    first.kill9();
    let _second = Proc::spawn("kairos-worker", &penv);

    let s = succeeded(&store, "count-1").await;
    let result = result_of(&s);
    let started = result["started_at"].as_u64().expect("a count result");
    println!("killed at checkpoint {before_kill} or later; the redelivery started at {started}");
    assert!(
        started >= before_kill && started < to,
        "the redelivery started at {started}, not from the checkpoint ({before_kill} or later): {result}"
    );
    assert_eq!(result["to"], to);
    assert_eq!(s.progress, Some(100));
    assert_eq!(s.progress_message.as_deref(), Some("100 of 100"));
    assert_eq!(saved_step(&store, "count-1").await, Some(to));
    // One attempt, delivered twice: no retry, RabbitMQ's redelivery.
    tap.wait_until(Duration::from_secs(10), "the succeeded event", |seen| {
        seen.iter()
            .any(|e| e.id == "count-1" && e.kind == "succeeded")
    })
    .await;
    let starts: Vec<u64> = tap
        .of(EventKind::Started)
        .iter()
        .filter(|e| e.id == "count-1")
        .map(|e| e.attempt)
        .collect();
    assert_eq!(starts, vec![1, 1], "{starts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_handler_error_resumes_from_its_checkpoint() {
    let env = TestEnv::new("cpretry").await;
    let store = status_store(&env);
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker = InProcess::worker(kairos_worker::Worker::new(env.worker_config()).with_builtins());
    env.publish(
        &env.names.tasks_exchange(),
        "default",
        task_props("kairos.count", "count-2"),
        br#"{"to": 6, "ms_per_step": 5, "fail_at": 3}"#,
    )
    .await;
    let s = succeeded(&store, "count-2").await;
    assert_eq!(result_of(&s), json!({"started_at": 3, "to": 6}));
    assert_eq!(s.attempt, Some(2));
    worker.stop().await;
    scheduler.stop().await;
}
