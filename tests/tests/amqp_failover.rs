//! `KAIROS_AMQP_URL` naming several nodes: a process connects to one that
//! answers and, when its node goes away, reconnects to the next one.

use kairos_tests::*;
use std::time::Duration;

/// `KAIROS_AMQP_URL` set to `urls`, events off (they would go to whichever
/// node the worker is on).
fn worker_env(env: &TestEnv, urls: &str) -> Vec<(String, String)> {
    let mut penv: Vec<(String, String)> = env
        .process_env()
        .into_iter()
        .filter(|(k, _)| k != "KAIROS_AMQP_URL" && k != "KAIROS_EVENTS")
        .collect();
    penv.push(("KAIROS_AMQP_URL".into(), urls.into()));
    penv.push(("KAIROS_EVENTS".into(), "false".into()));
    penv
}

async fn publish_noops(env: &TestEnv, prefix: &str, n: usize) {
    let tasks = (0..n)
        .map(|i| {
            (
                "default".to_string(),
                task_props("kairos.noop", &format!("{prefix}-{i}")),
                Vec::new(),
            )
        })
        .collect();
    env.publish_many(&env.names.tasks_exchange(), tasks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_answer_is_skipped() {
    let env = TestEnv::new("amqpskip").await;
    let dead = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let mut worker = Proc::spawn(
        "kairos-worker",
        &worker_env(&env, &format!("{dead},{}", env.amqp_url)),
    );
    publish_noops(&env, "t", 20).await;
    let queue = env.names.queue("default");
    env.wait_depth(
        &queue,
        Duration::from_secs(30),
        "the tasks to be run",
        |d| d == 0,
    )
    .await;
    assert!(worker.terminate(Duration::from_secs(20)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_moves_to_the_next_node_when_its_node_dies() {
    let shared = TestEnv::new("amqpfo").await;
    let node = tokio::task::spawn_blocking(OwnRabbit::start)
        .await
        .expect("own RabbitMQ");
    let on_node = shared.same_namespace_on(&node.url()).await;
    let queue = shared.names.queue("default");
    // The own node first: the worker connects there.
    let urls = format!("{},{}", node.url(), shared.amqp_url);
    let mut worker = Proc::spawn("kairos-worker", &worker_env(&shared, &urls));
    publish_noops(&on_node, "a", 20).await;
    on_node
        .wait_depth(
            &queue,
            Duration::from_secs(30),
            "the first node's tasks to run",
            |d| d == 0,
        )
        .await;
    assert_eq!(
        shared.queue_depth(&queue).await,
        0,
        "nothing was published to the second node yet"
    );

    // The node dies; tasks now arrive on the other one, and the worker,
    // reconnected there, runs them.
    drop(on_node);
    drop(node);
    publish_noops(&shared, "b", 20).await;
    shared
        .wait_depth(
            &queue,
            Duration::from_secs(60),
            "the worker to fail over and run the second node's tasks",
            |d| d == 0,
        )
        .await;
    assert!(worker.terminate(Duration::from_secs(20)).success());
}
