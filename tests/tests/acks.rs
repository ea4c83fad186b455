//! Coalesced acks: a delivery settled behind a running one is not held
//! back for long (unacked deliveries count against the prefetch), and a
//! graceful stop acks everything that settled.

use kairos_shared::config::Concurrency;
use kairos_tests::*;
use kairos_worker::{TaskContext, TaskError, Worker};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_does_not_hold_back_the_acks_behind_it() {
    let env = TestEnv::new("acks").await;
    env.declare_queue("default").await;
    let log = RunLog::default();
    let release = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let slow = {
        let (release, started) = (release.clone(), started.clone());
        move |_: TaskContext, _: Vec<u8>| {
            let (release, started) = (release.clone(), started.clone());
            async move {
                started.notify_one();
                release.notified().await;
                Ok::<(), TaskError>(())
            }
        }
    };
    let mut config = env.worker_config();
    // Four unacked deliveries at most: were the quick tasks' acks held
    // until the slow one (the oldest) settled, the worker would stall after
    // three of them.
    config.prefetch = Some(4);
    config.concurrency = Concurrency { min: 2, max: 2 };
    let worker = InProcess::worker(
        Worker::new(config)
            .handler("test.slow", slow)
            .handler("test.quick", log.handler(0)),
    );
    let tasks = env.names.tasks_exchange();
    env.publish(&tasks, "default", task_props("test.slow", "slow"), b"")
        .await;
    tokio::time::timeout(Duration::from_secs(30), started.notified())
        .await
        .expect("the slow task starts");
    let quick: Vec<_> = batch(200, |i| task_props("test.quick", &format!("quick-{i}")));
    env.publish_many(&tasks, quick).await;
    log.wait_distinct(200, Duration::from_secs(30)).await;
    assert_eq!(log.total(), 200, "each quick task ran once");

    // The slow task settles last; stopping acks it with whatever is left.
    release.notify_one();
    worker.stop().await;
    assert_eq!(
        env.queue_depth(&env.names.queue("default")).await,
        0,
        "every settled delivery was acked before the worker closed its connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_acks_every_settled_delivery() {
    let env = TestEnv::new("acks-stop").await;
    env.declare_queue("default").await;
    let log = RunLog::default();
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.quick", log.handler(0)));
    let quick: Vec<_> = batch(2000, |i| task_props("test.quick", &format!("q-{i}")));
    env.publish_many(&env.names.tasks_exchange(), quick).await;
    log.wait_distinct(2000, Duration::from_secs(60)).await;
    // Stopped right after the last task ran: its ack may still be waiting
    // for the next flush.
    worker.stop().await;
    assert_eq!(
        env.queue_depth(&env.names.queue("default")).await,
        0,
        "nothing comes back"
    );

    // A second worker on the same queue finds nothing to run again.
    let again = RunLog::default();
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.quick", again.handler(0)));
    let marker = task_props("test.quick", "marker");
    env.publish(&env.names.tasks_exchange(), "default", marker, b"")
        .await;
    again.wait_distinct(1, Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(again.total(), 1, "only the marker ran on the second worker");
    assert_eq!(log.total(), 2000, "each task ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_right_after_its_last_task_stops_promptly() {
    // A stop right after the last task races that task's ack flush and the
    // session's channels closing. lapin once lost the connection close in
    // such a race (seen about once in fifty runs of the `delayed` tests, not
    // reproduced by this loop alone) and the worker never finished
    // stopping; the close is now also bounded to 5 s, hence the 4 s here.
    let env = TestEnv::new("acks-cycle").await;
    env.declare_queue("default").await;
    for round in 0..50 {
        let log = RunLog::default();
        let worker = InProcess::worker(
            Worker::new(env.worker_config()).handler("test.quick", log.handler(0)),
        );
        let p = task_props("test.quick", &format!("r-{round}"));
        env.publish(&env.names.tasks_exchange(), "default", p, b"")
            .await;
        log.wait_distinct(1, Duration::from_secs(30)).await;
        tokio::time::timeout(Duration::from_secs(4), worker.stop())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the worker did not stop within 4 s"));
    }
    assert_eq!(
        env.queue_depth(&env.names.queue("default")).await,
        0,
        "every task was acked"
    );
}
