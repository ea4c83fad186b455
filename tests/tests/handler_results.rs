//! What a handler can say besides success or failure (issue 16): a delay
//! of its own for the next attempt (Retry-After), follow-up tasks through
//! the client in its context, and a result kept with its status.

use kairos_shared::client::NewTask;
use kairos_shared::events::EventKind;
use kairos_tests::*;
use kairos_worker::{TaskContext, TaskError, Worker};
use std::time::Duration;

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
