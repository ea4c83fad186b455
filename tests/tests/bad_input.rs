//! Acceptance 6: bad input ends in NS.dead with a reason, and never harms
//! the processes or the next task.

use kairos_shared::contract::H_ERROR;
use kairos_shared::events::EventKind;
use kairos_tests::*;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_with_a_reason() {
    let env = TestEnv::new("bad").await;
    let mut tap = EventTap::new(&env).await;
    let mut scheduler = Proc::spawn("kairos-scheduler", &env.process_env());
    let mut worker = Proc::spawn("kairos-worker", &env.process_env());
    let tasks = env.names.tasks_exchange();

    // No `type`.
    let no_type = BasicProperties::default()
        .with_message_id("no-type".into())
        .with_delivery_mode(2);
    env.publish(&tasks, "default", no_type, b"{}").await;
    // `x-run-at` of "abc", to the scheduler.
    let bad_time = with_headers(
        task_props("kairos.noop", "bad-time"),
        &[("x-run-at", AMQPValue::LongString("abc".into()))],
    );
    env.publish(&env.names.delay(), "default", bad_time, b"{}")
        .await;
    // A body the built-in handler cannot read.
    env.publish(
        &tasks,
        "default",
        task_props("kairos.sleep", "bad-body"),
        b"not json",
    )
    .await;
    // A task name no handler serves.
    env.publish(
        &tasks,
        "default",
        task_props("nobody.home", "unknown"),
        b"{}",
    )
    .await;

    let dead = env.dead_letters(4, Duration::from_secs(30)).await;
    let reason = |id: &str| dead_letter_error(&dead, id);
    assert!(reason("no-type").contains("type"), "{}", reason("no-type"));
    assert!(
        reason("bad-time").contains("x-run-at"),
        "{}",
        reason("bad-time")
    );
    assert!(
        reason("bad-body").contains("kairos.sleep"),
        "{}",
        reason("bad-body")
    );
    assert!(
        reason("unknown").contains("no handler"),
        "{}",
        reason("unknown")
    );

    // Still running, and the next valid task runs.
    assert!(
        scheduler.child.try_wait().expect("status").is_none(),
        "scheduler died"
    );
    assert!(
        worker.child.try_wait().expect("status").is_none(),
        "worker died"
    );
    env.publish(&tasks, "default", task_props("kairos.noop", "after"), b"")
        .await;
    let delayed = with_headers(
        task_props("kairos.noop", "after-delayed"),
        &[("x-delay-ms", AMQPValue::LongInt(100))],
    );
    env.publish(&env.names.delay(), "default", delayed, b"")
        .await;
    tap.wait_until(Duration::from_secs(20), "valid tasks to succeed", |s| {
        ["after", "after-delayed"]
            .iter()
            .all(|id| s.iter().any(|e| e.id == *id && e.kind == "succeeded"))
    })
    .await;
    assert!(tap
        .of(EventKind::Succeeded)
        .iter()
        .all(|e| e.id.starts_with("after")));
}

/// A client that publishes straight to `NS.q.QUEUE` through the default
/// exchange still gets retries on the right queue, and a delayed task
/// without a routing key is refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_exchange_publishes_and_missing_routing_keys() {
    let env = TestEnv::new("defx").await;
    let mut tap = EventTap::new(&env).await;
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker = InProcess::worker(kairos_worker::Worker::new(env.worker_config()).with_builtins());
    let props = with_headers(
        task_props("kairos.fail", "direct"),
        &[(
            kairos_shared::contract::H_MAX_RETRIES,
            AMQPValue::LongInt(1),
        )],
    );
    env.publish("", &env.names.queue("default"), props, b"")
        .await;
    let no_key = with_headers(
        task_props("kairos.noop", "no-key"),
        &[("x-delay-ms", AMQPValue::LongInt(10))],
    );
    env.publish(&env.names.delay(), "", no_key, b"").await;

    let dead = env.dead_letters(2, Duration::from_secs(30)).await;
    let find = |id: &str| {
        dead.iter()
            .find(|d| d.id().as_deref() == Some(id))
            .expect(id)
            .clone()
    };
    assert!(find("no-key")
        .header(H_ERROR)
        .unwrap_or_default()
        .contains("routing key"));
    let direct = find("direct");
    assert_eq!(direct.header("x-attempt").as_deref(), Some("2"));
    assert_eq!(direct.routing_key, "default");
    tap.wait_until(Duration::from_secs(10), "the retry's start", |s| {
        s.iter()
            .any(|e| e.id == "direct" && e.kind == "started" && e.attempt == 2)
    })
    .await;
    worker.stop().await;
    scheduler.stop().await;
}
