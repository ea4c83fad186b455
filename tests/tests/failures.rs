//! How attempts fail: timeouts, panics, permanent errors, and a consumer in
//! another language that rejects a delivery. Each ends where the contract
//! says, with the reason in `x-error`.

use futures_util::StreamExt;
use kairos_shared::contract::{H_ATTEMPT, H_ERROR, H_MAX_RETRIES, H_TIMEOUT_MS};
use kairos_shared::events::EventKind;
use kairos_tests::*;
use kairos_worker::{TaskContext, TaskError, Worker};
use lapin::options::BasicRejectOptions;
use lapin::types::AMQPValue;
use std::time::Duration;

async fn slow(_: TaskContext, _: Vec<u8>) -> Result<(), TaskError> {
    tokio::time::sleep(Duration::from_secs(10)).await;
    Ok(())
}

async fn panics(ctx: TaskContext, _: Vec<u8>) -> Result<(), TaskError> {
    panic!("boom on attempt {}", ctx.attempt);
}

async fn permanent(_: TaskContext, _: Vec<u8>) -> Result<(), TaskError> {
    Err(TaskError::permanent("the account is closed"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_panics_and_permanent_errors() {
    let env = TestEnv::new("fail").await;
    let mut tap = EventTap::new(&env).await;
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker = InProcess::worker(
        Worker::new(env.worker_config())
            .handler("test.slow", slow)
            .handler("test.panic", panics)
            .handler("test.permanent", permanent),
    );
    let tasks = env.names.tasks_exchange();
    let timed = with_headers(
        task_props("test.slow", "timed"),
        &[
            (H_TIMEOUT_MS, AMQPValue::LongInt(200)),
            (H_MAX_RETRIES, AMQPValue::LongInt(0)),
        ],
    );
    env.publish(&tasks, "default", timed, b"").await;
    let panicky = with_headers(
        task_props("test.panic", "panicky"),
        &[(H_MAX_RETRIES, AMQPValue::LongInt(1))],
    );
    env.publish(&tasks, "default", panicky, b"").await;
    let closed = with_headers(
        task_props("test.permanent", "closed"),
        &[(H_MAX_RETRIES, AMQPValue::LongInt(5))],
    );
    env.publish(&tasks, "default", closed, b"").await;

    let dead = env.dead_letters(3, Duration::from_secs(30)).await;
    let find = |id: &str| {
        dead.iter()
            .find(|d| d.id().as_deref() == Some(id))
            .expect(id)
            .clone()
    };

    let timed = find("timed");
    assert!(timed
        .header(H_ERROR)
        .unwrap_or_default()
        .contains("timed out after 200 ms"));
    assert_eq!(timed.header(H_ATTEMPT).as_deref(), Some("1"));

    let panicky = find("panicky");
    assert!(panicky
        .header(H_ERROR)
        .unwrap_or_default()
        .contains("boom on attempt 2"));
    assert_eq!(panicky.header(H_ATTEMPT).as_deref(), Some("2"));

    let closed = find("closed");
    assert_eq!(
        closed.header(H_ERROR).as_deref(),
        Some("the account is closed")
    );
    assert_eq!(
        closed.header(H_ATTEMPT).as_deref(),
        Some("1"),
        "permanent errors are not retried"
    );

    tap.wait_until(Duration::from_secs(10), "three dead events", |s| {
        s.iter().filter(|e| e.kind == "dead").count() >= 3
    })
    .await;
    let started = |id: &str| {
        tap.of(EventKind::Started)
            .iter()
            .filter(|e| e.id == id)
            .count()
    };
    assert_eq!(started("closed"), 1);
    assert_eq!(started("panicky"), 2);
    worker.stop().await;
    scheduler.stop().await;
}

/// A consumer written in another language rejects with requeue=false: the
/// queue's dead-letter exchange hands it to the scheduler, which retries it
/// with `x-attempt` one higher, then dead-letters it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_consumer_rejects_are_retried_then_dead() {
    let env = TestEnv::new("reject").await;
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let props = with_headers(
        task_props("any.thing", "rej"),
        &[(H_MAX_RETRIES, AMQPValue::LongInt(1))],
    );
    env.publish(&env.names.tasks_exchange(), "default", props, b"payload")
        .await;

    let mut consumer = env.consume_queue("default", 10).await;
    let mut attempts = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("delivery in time")
            .expect("stream")
            .expect("delivery");
        let attempt = d.properties.headers().as_ref().and_then(|h| {
            h.inner()
                .get(H_ATTEMPT)
                .map(kairos_shared::contract::value_to_string)
        });
        attempts.push(attempt.unwrap_or_else(|| "none".into()));
        assert_eq!(d.data, b"payload");
        d.acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .expect("reject");
    }
    assert_eq!(attempts, vec!["none", "2"], "the retry carries x-attempt 2");
    let dead = env.dead_letters(1, Duration::from_secs(20)).await;
    assert_eq!(dead[0].id().as_deref(), Some("rej"));
    assert_eq!(
        dead[0].header(H_ERROR).as_deref(),
        Some("rejected by consumer")
    );
    assert_eq!(dead[0].header(H_ATTEMPT).as_deref(), Some("2"));
    assert_eq!(dead[0].body, b"payload");
    scheduler.stop().await;
}
