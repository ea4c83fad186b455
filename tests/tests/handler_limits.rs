//! Hung handlers cannot wedge a worker (issue 14, item 13): every attempt
//! has a time limit, `kairos.sleep` is bounded, and the slots of a session
//! that is replaced (its connection closed by the broker) come free.

use kairos_shared::config::Concurrency;
use kairos_worker::{TaskContext, TaskResult, Worker};
use lapin::types::AMQPValue;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kairos_tests::*;

/// A handler that never returns.
async fn hang(_: TaskContext, _: Vec<u8>) -> TaskResult {
    std::future::pending::<()>().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_over_its_time_limit_fails_and_frees_its_slot() {
    let env = TestEnv::new("timeout").await;
    let mut wc = env.worker_config();
    wc.concurrency = Concurrency { min: 1, max: 1 };
    wc.task_timeout_ms = 500;
    // A timed-out attempt is a failed one: the scheduler decides it is dead.
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let log = RunLog::default();
    let worker = InProcess::worker(
        Worker::new(wc)
            .handler("test.hang", hang)
            .handler("test.record", log.handler(0)),
    );
    let no_retry = [("x-max-retries", AMQPValue::LongLongInt(0))];
    let key = env.names.queue("default");
    env.publish(
        "",
        &key,
        with_headers(task_props("test.hang", "hangs"), &no_retry),
        b"",
    )
    .await;
    // Its own limit, shorter than the worker's.
    env.publish(
        "",
        &key,
        with_headers(
            task_props("test.hang", "hangs-own-limit"),
            &[
                ("x-max-retries", AMQPValue::LongLongInt(0)),
                ("x-timeout-ms", AMQPValue::LongLongInt(200)),
            ],
        ),
        b"",
    )
    .await;
    env.publish("", &key, task_props("test.record", "after"), b"")
        .await;

    let mut dead = env.dead_letters(2, Duration::from_secs(60)).await;
    dead.sort_by_key(|d| d.id());
    assert_eq!(dead[0].id().as_deref(), Some("hangs"));
    let why = dead[0].header("x-error").unwrap_or_default();
    assert!(why.contains("timed out after 500 ms"), "{why}");
    assert_eq!(dead[1].id().as_deref(), Some("hangs-own-limit"));
    let why = dead[1].header("x-error").unwrap_or_default();
    assert!(why.contains("timed out after 200 ms"), "{why}");
    // With one slot, the task behind them ran: the slot came back.
    log.wait_distinct(1, Duration::from_secs(30)).await;
    assert_eq!(log.runs_of("after"), 1);
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kairos_sleep_is_bounded_and_dead_letters_say_why() {
    let env = TestEnv::new("sleep-bound").await;
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());
    let key = env.names.queue("default");
    // Seconds taken for milliseconds: ten hours.
    env.publish(
        "",
        &key,
        task_props("kairos.sleep", "too-long"),
        br#"{"ms": 36000000}"#,
    )
    .await;
    // Longer than its own time limit: would time out on every attempt.
    env.publish(
        "",
        &key,
        with_headers(
            task_props("kairos.sleep", "over-limit"),
            &[("x-timeout-ms", AMQPValue::LongLongInt(1_000))],
        ),
        br#"{"ms": 5000}"#,
    )
    .await;
    env.publish(
        "",
        &key,
        task_props("kairos.sleep", "fine"),
        br#"{"ms": 10}"#,
    )
    .await;
    let mut dead = env.dead_letters(2, Duration::from_secs(30)).await;
    dead.sort_by_key(|d| d.id());
    assert_eq!(dead[0].id().as_deref(), Some("over-limit"));
    let why = dead[0].header("x-error").unwrap_or_default();
    assert!(why.contains("time limit of 1000 ms"), "{why}");
    assert_eq!(dead[1].id().as_deref(), Some("too-long"));
    let why = dead[1].header("x-error").unwrap_or_default();
    assert!(why.contains("maximum of 3600000 ms"), "{why}");
    worker.stop().await;
    assert_eq!(
        env.queue_depth(&env.names.dead()).await,
        0,
        "only those two"
    );
}

/// Runs `rabbitmqctl` on the shared broker (listing, and closing one
/// connection of this test: nothing else is touched).
fn rabbitmqctl(args: &[&str]) -> String {
    let out = run_ok(
        Command::new("rabbitmqctl").args(args),
        &format!("rabbitmqctl {args:?}"),
        "rabbitmqctl must be on PATH for this test",
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Closes, from the broker's side, the connection whose channel consumes
/// `queue` (as a broker restart or a network cut would end it).
fn close_consumer_connection(queue: &str) {
    let consumers = rabbitmqctl(&[
        "-q",
        "list_consumers",
        "--no-table-headers",
        "queue_name",
        "channel_pid",
    ]);
    let channel = consumers
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(q, _)| *q == queue)
        .map(|(_, pid)| pid.trim().to_string())
        .unwrap_or_else(|| panic!("no consumer on {queue}: {consumers}"));
    let channels = rabbitmqctl(&[
        "-q",
        "list_channels",
        "--no-table-headers",
        "pid",
        "connection",
    ]);
    let connection = channels
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(pid, _)| pid.trim() == channel)
        .map(|(_, conn)| conn.trim().to_string())
        .unwrap_or_else(|| panic!("no channel {channel}: {channels}"));
    rabbitmqctl(&[
        "close_connection",
        &connection,
        "kairos test: session replaced",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_does_not_hold_its_slot_across_a_session_replacement() {
    let env = TestEnv::new("slot-release").await;
    let mut wc = env.worker_config();
    wc.concurrency = Concurrency { min: 1, max: 1 };
    // The default time limit (15 min) stays: the slot must come back with
    // the session, not with a timeout.
    let log = RunLog::default();
    let starts = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(tokio::sync::Notify::new());
    let (s, n, l) = (starts.clone(), started.clone(), log.clone());
    // Hangs on its first run only; the redelivery completes.
    let first_hangs = move |ctx: TaskContext, _: Vec<u8>| {
        let (s, n, l) = (s.clone(), n.clone(), l.clone());
        async move {
            let first = s.fetch_add(1, Ordering::SeqCst) == 0;
            n.notify_one();
            if first {
                std::future::pending::<()>().await;
            }
            l.record(&ctx.id);
            Ok(())
        }
    };
    let worker = InProcess::worker(
        Worker::new(wc)
            .handler("test.first-hangs", first_hangs)
            .handler("test.record", log.handler(0)),
    );
    let key = env.names.queue("default");
    env.publish("", &key, task_props("test.first-hangs", "hung"), b"")
        .await;
    tokio::time::timeout(Duration::from_secs(30), started.notified())
        .await
        .expect("the hanging task started");
    env.publish("", &key, task_props("test.record", "later"), b"")
        .await;

    close_consumer_connection(&key);
    let closed_at = std::time::Instant::now();

    // The new session runs the redelivered task and the later one, with
    // the one slot the hung handler held.
    log.wait_distinct(2, Duration::from_secs(60)).await;
    eprintln!(
        "both tasks ran {} ms after the connection was closed",
        closed_at.elapsed().as_millis()
    );
    assert_eq!(log.runs_of("later"), 1);
    assert_eq!(log.runs_of("hung"), 1);
    assert_eq!(starts.load(Ordering::SeqCst), 2);
    worker.stop().await;
}
