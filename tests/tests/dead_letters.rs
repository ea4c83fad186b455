//! The dead-letter queue: list, replay, purge (what `kairosctl dead` does).

use kairos_shared::dead;
use kairos_tests::*;
use kairos_worker::Worker;
use lapin::BasicProperties;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_listed_replayed_and_purged() {
    let env = TestEnv::new("dlq").await;
    let first = InProcess::worker(Worker::new(env.worker_config()).with_builtins());
    let tasks = env.names.tasks_exchange();
    // No worker serves `test.later` yet: both die with a reason.
    env.publish(&tasks, "default", task_props("test.later", "L1"), b"one")
        .await;
    env.publish(&tasks, "default", task_props("test.later", "L2"), b"two")
        .await;
    let untyped = BasicProperties::default().with_message_id("raw".into());
    env.publish(&tasks, "default", untyped, b"?").await;

    env.wait_dead_depth(3, Duration::from_secs(20)).await;
    first.stop().await;

    let listed = dead::list(&env.conn, &env.names, 100).await.expect("list");
    assert_eq!(listed.len(), 3);
    let l1 = listed
        .iter()
        .find(|d| d.id.as_deref() == Some("L1"))
        .expect("L1 listed");
    assert!(l1
        .error
        .as_deref()
        .unwrap_or_default()
        .contains("no handler"));
    assert_eq!(l1.queue, "default");
    assert_eq!(l1.attempt.as_deref(), Some("1"));
    assert_eq!(
        env.queue_depth(&env.names.dead()).await,
        3,
        "listing removes nothing"
    );

    // Now a worker that serves the task: replay one, then the rest.
    let log = RunLog::default();
    let second =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.later", log.handler(0)));
    let replayed = dead::replay(&env.conn, &env.names, &["L1".to_string()], 100)
        .await
        .expect("replay");
    assert_eq!(replayed.replayed, vec!["L1"]);
    log.wait_distinct(1, Duration::from_secs(20)).await;
    assert_eq!(log.runs_of("L1"), 1);
    assert_eq!(env.queue_depth(&env.names.dead()).await, 2);

    let replayed = dead::replay(&env.conn, &env.names, &[], 100)
        .await
        .expect("replay all");
    assert_eq!(
        replayed.replayed,
        vec!["L2"],
        "a message without a task name is not replayed"
    );
    log.wait_distinct(2, Duration::from_secs(20)).await;
    assert_eq!(env.queue_depth(&env.names.dead()).await, 1);

    assert_eq!(dead::purge(&env.conn, &env.names).await.expect("purge"), 1);
    assert_eq!(env.queue_depth(&env.names.dead()).await, 0);
    second.stop().await;
}

/// Issue 14, item 3: `x-origin-queue` is a header anyone can write. A dead
/// letter whose origin cannot name a queue (`NS.q.` + 300 bytes overflows
/// AMQP's 255) is refused with the reason and stays dead; it used to panic
/// the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_with_an_origin_queue_too_long_is_refused_not_a_panic() {
    let env = TestEnv::new("dlqlong").await;
    let long = "q".repeat(300);
    let props = with_headers(
        task_props("test.later", "LONG"),
        &[(
            kairos_shared::contract::H_ORIGIN_QUEUE,
            kairos_shared::contract::text(&long),
        )],
    );
    env.publish(&env.names.dead(), "", props, b"x").await;
    env.wait_dead_depth(1, Duration::from_secs(20)).await;
    let done = dead::replay(&env.conn, &env.names, &["LONG".to_string()], 100)
        .await
        .expect("replay answers");
    assert!(done.replayed.is_empty(), "{done:?}");
    assert_eq!(done.refused.len(), 1, "{done:?}");
    assert_eq!(done.refused[0].id.as_deref(), Some("LONG"));
    let error = &done.refused[0].error;
    assert!(
        error.contains("queue name") && error.contains("300 bytes"),
        "{error}"
    );
    // It is still there, and the connection still works.
    assert_eq!(env.queue_depth(&env.names.dead()).await, 1);
    let listed = dead::list(&env.conn, &env.names, 10).await.expect("list");
    assert_eq!(listed.len(), 1);
}
