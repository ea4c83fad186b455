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

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while env.queue_depth(&env.names.dead()).await < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead letters did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    assert_eq!(replayed, vec!["L1"]);
    log.wait_distinct(1, Duration::from_secs(20)).await;
    assert_eq!(log.runs_of("L1"), 1);
    assert_eq!(env.queue_depth(&env.names.dead()).await, 2);

    let replayed = dead::replay(&env.conn, &env.names, &[], 100)
        .await
        .expect("replay all");
    assert_eq!(
        replayed,
        vec!["L2"],
        "a message without a task name is not replayed"
    );
    log.wait_distinct(2, Duration::from_secs(20)).await;
    assert_eq!(env.queue_depth(&env.names.dead()).await, 1);

    assert_eq!(dead::purge(&env.conn, &env.names).await.expect("purge"), 1);
    assert_eq!(env.queue_depth(&env.names.dead()).await, 0);
    second.stop().await;
}
