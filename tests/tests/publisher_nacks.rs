//! Publisher nacks (issue 14, item 8): the broker refuses the message that
//! replaces a delivery (`NS.retry` or `NS.dead` with a queue at a
//! max-length with `reject-publish`) or a task the pump publishes. The
//! original must never be acked, and nobody may spin or restart its
//! session in a loop.
//!
//! Each test binds a refusing queue (`x-max-length` 0, `reject-publish`)
//! to one of its namespace's exchanges, so the broker nacks every publish
//! routed there (RabbitMQ nacks a publish that any of its queues refused,
//! though the queues that took it keep their copy).

use kairos_shared::contract::H_DELAY_MS;
use kairos_shared::events::EventKind;
use kairos_tests::*;
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Polls `done` (a log file or a queue depth: no event to await) until it
/// holds, or panics after `within`.
async fn eventually(within: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_path(env: &TestEnv, role: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}-{role}.log", env.ns))
}

/// Ids of the messages now in `queue`, taken off it.
async fn drain_ids(env: &TestEnv, queue: &str) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(m) = env
        .channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic_get")
    {
        ids.push(kairos_shared::admin::message_id(&m.delivery.properties));
        ack(&m.delivery).await;
    }
    ids
}

/// Failed attempts whose retry the broker refuses, interleaved with tasks
/// that succeed on the same channel: a `multiple` ack for the successes
/// used to cover the failed deliveries too (they were lost), and each
/// refusal restarted the worker's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_never_acks_a_delivery_whose_retry_was_refused() {
    let env = TestEnv::new("nack-w").await;
    let refusing = env.declare_refusing_queue(&env.names.retry(), "").await;
    let mut tap = EventTap::new(&env).await;
    let messages = (0..20)
        .map(|i| {
            let (name, id) = if i % 2 == 0 {
                ("kairos.noop", format!("ok-{i}"))
            } else {
                ("kairos.fail", format!("bad-{i}"))
            };
            ("default".to_string(), task_props(name, &id), Vec::new())
        })
        .collect();
    env.publish_many(&env.names.tasks_exchange(), messages)
        .await;
    let bad: Vec<String> = (0..20)
        .filter(|i| i % 2 == 1)
        .map(|i| format!("bad-{i}"))
        .collect();

    let log = log_path(&env, "worker");
    let mut worker = Proc::spawn_logged("kairos-worker", &env.process_env(), &log);
    let started = Instant::now();
    tap.wait_distinct(EventKind::Succeeded, 10, Duration::from_secs(60))
        .await;
    // Every failing task comes back and runs again, twice: none was acked.
    tap.wait_until(
        Duration::from_secs(60),
        "every refused task ran three times",
        |seen| {
            bad.iter().all(|id| {
                seen.iter()
                    .filter(|e| e.kind == "started" && &e.id == id)
                    .count()
                    >= 3
            })
        },
    )
    .await;
    let window = started.elapsed();
    worker.terminate(Duration::from_secs(40));

    // Paced, not spinning: each refusal holds the delivery a while.
    let runs = tap
        .of(EventKind::Started)
        .iter()
        .filter(|e| e.id.starts_with("bad-"))
        .count();
    let per_second = runs as f64 / window.as_secs_f64();
    eprintln!("{runs} runs of refused tasks in {window:?} ({per_second:.1}/s)");
    assert!(
        per_second < 20.0,
        "refused tasks ran {per_second:.1} times a second: a tight loop"
    );
    assert_eq!(
        log_lines(&log, "AMQP session ended"),
        0,
        "a refused replacement must not restart the session"
    );
    assert!(log_lines(&log, "replacement refused") > 0);
    // Nothing acked: the ten failing tasks are all back in their queue.
    let queue = env.names.queue("default");
    eventually(
        Duration::from_secs(30),
        "ten tasks back in the queue",
        async || env.queue_depth(&queue).await == 10,
    )
    .await;

    // Once the broker takes retries again, each failure reaches NS.retry.
    env.delete_queue(&refusing).await;
    let mut worker = Proc::spawn_logged("kairos-worker", &env.process_env(), &log);
    let retry = env.names.retry();
    eventually(
        Duration::from_secs(60),
        "ten retries in NS.retry",
        async || env.queue_depth(&retry).await >= 10 && env.queue_depth(&queue).await == 0,
    )
    .await;
    worker.terminate(Duration::from_secs(40));
    let ids: HashSet<String> = drain_ids(&env, &retry).await.into_iter().collect();
    assert_eq!(ids, bad.iter().cloned().collect::<HashSet<_>>());
    let _ = std::fs::remove_file(&log);
}

/// Unusable messages whose dead letter the broker refuses: they go back to
/// `NS.delay`, the intake pauses and goes on (no session restarts), and the
/// good tasks of the same batches pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_returns_refused_dead_letters_and_keeps_its_session() {
    let env = TestEnv::new("nack-i").await;
    let refusing = env.declare_refusing_queue(&env.names.dead(), "").await;
    let messages = (0..10)
        .map(|i| {
            let props = if i % 2 == 0 {
                with_headers(
                    task_props("kairos.noop", &format!("good-{i}")),
                    &[(H_DELAY_MS, AMQPValue::LongLongInt(0))],
                )
            } else {
                // No `type`: unusable, dead-lettered with a reason.
                BasicProperties::default()
                    .with_message_id(format!("poison-{i}").as_str().into())
                    .with_delivery_mode(2)
            };
            ("default".to_string(), props, b"{}".to_vec())
        })
        .collect();
    env.publish_many(&env.names.delay(), messages).await;

    let log = log_path(&env, "scheduler");
    let mut scheduler = Proc::spawn_logged("kairos-scheduler", &env.process_env(), &log);
    let queue = env.names.queue("default");
    eventually(
        Duration::from_secs(60),
        "the good tasks published",
        async || env.queue_depth(&queue).await == 5,
    )
    .await;
    // The refused ones came back and were refused again (or, before the
    // fix, the session restarted).
    eventually(Duration::from_secs(60), "refusals repeated", async || {
        log_lines(&log, "dead letter refused") >= 10 || log_lines(&log, "AMQP session ended") >= 2
    })
    .await;
    scheduler.terminate(Duration::from_secs(30));
    assert_eq!(
        log_lines(&log, "AMQP session ended"),
        0,
        "a refused dead letter must not restart the session"
    );
    assert!(log_lines(&log, "pausing the intake") > 0);
    assert_eq!(
        env.queue_depth(&env.names.delay()).await,
        5,
        "the unusable messages are back in NS.delay"
    );

    // Once NS.dead takes them, every unusable message is dead-lettered.
    env.delete_queue(&refusing).await;
    let _ = drain_ids(&env, &env.names.dead()).await;
    let mut scheduler = Proc::spawn_logged("kairos-scheduler", &env.process_env(), &log);
    let dead = env.dead_letters(5, Duration::from_secs(60)).await;
    scheduler.terminate(Duration::from_secs(30));
    let ids: HashSet<String> = dead.iter().filter_map(|d| d.id()).collect();
    let expected: HashSet<String> = (0..10)
        .filter(|i| i % 2 == 1)
        .map(|i| format!("poison-{i}"))
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(env.queue_depth(&env.names.delay()).await, 0);
    let _ = std::fs::remove_file(&log);
}

/// Tasks whose publish to `NS.tasks` the broker nacks are held back with a
/// growing pause per queue, not claimed and published again with every
/// claim (a stream of other due tasks wakes the pump every 50 ms); they
/// are all delivered once the broker takes them, and the other queue's
/// tasks flow meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pump_backs_off_on_nacks_and_delivers_afterwards() {
    let env = TestEnv::new("nack-p").await;
    env.declare_queue("full").await;
    let refusing = env
        .declare_refusing_queue(&env.names.tasks_exchange(), "full")
        .await;
    let delayed = |queue: &str, id: String, delay_ms: i64| {
        let props = with_headers(
            task_props("kairos.noop", &id),
            &[(H_DELAY_MS, AMQPValue::LongLongInt(delay_ms))],
        );
        (queue.to_string(), props, Vec::new())
    };
    // 200 tasks for `default`, one due every 50 ms over 10 s.
    let stream = (0..200).map(|i| delayed("default", format!("s-{i}"), 2_000 + i * 50));
    let refused = (0..3).map(|i| delayed("full", format!("p-{i}"), 0));
    env.publish_many(&env.names.delay(), stream.chain(refused).collect())
        .await;

    let log = log_path(&env, "scheduler");
    let mut scheduler = Proc::spawn_logged("kairos-scheduler", &env.process_env(), &log);
    let (full, default) = (env.names.queue("full"), env.names.queue("default"));
    let started = Instant::now();
    eventually(
        Duration::from_secs(90),
        "the stream published",
        async || env.queue_depth(&default).await == 200,
    )
    .await;
    let window = started.elapsed();
    // Each nacked publish still left its copy in NS.q.full (RabbitMQ keeps
    // what the accepting queues took): its depth counts publish attempts.
    let attempts = env.queue_depth(&full).await;
    eprintln!("{attempts} publish attempts of 3 refused tasks in {window:?}");
    assert!(attempts >= 3, "the refused tasks were published");
    assert!(
        attempts <= 3 * 15,
        "{attempts} publishes of 3 refused tasks in {window:?}: not backing off"
    );

    env.delete_queue(&refusing).await;
    // All confirmed and deleted from the delay queue.
    eventually(
        Duration::from_secs(60),
        "the delay queue empty",
        // The delay queue's record hashes (`NS:dq{S}:rec`), not the task
        // status's `NS:st{S}:recent`.
        async || env.redis_keys().await.iter().all(|k| !k.ends_with(":rec")),
    )
    .await;
    scheduler.terminate(Duration::from_secs(30));
    let ids: HashSet<String> = drain_ids(&env, &full).await.into_iter().collect();
    assert_eq!(
        ids,
        (0..3).map(|i| format!("p-{i}")).collect::<HashSet<_>>()
    );
    assert_eq!(log_lines(&log, "AMQP session ended"), 0);
    let _ = std::fs::remove_file(&log);
}
