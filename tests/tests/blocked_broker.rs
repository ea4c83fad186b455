//! RabbitMQ blocks publishers (issue 14, item 11): a memory alarm on a
//! private node this test starts (never the shared broker). While blocked
//! the pump claims nothing (the delay queue keeps the tasks, no lease
//! churn), `POST /v1/tasks` answers 503 in bounded time, and SIGTERM still
//! stops the scheduler within its grace; once the alarm clears, every task
//! is delivered.
//!
//! Starting a node takes 10 to 30 s here, so the whole test takes about a
//! minute: it runs with `--features disruptive` (it disturbs nothing
//! shared).
#![cfg(feature = "disruptive")]

use kairos_shared::contract::H_DELAY_MS;
use kairos_tests::*;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::AMQPValue;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The stop grace a container gets by default (`docker stop`).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// `POST http://127.0.0.1:PORT/PATH` with a JSON body: (status, body,
/// how long the answer took). Blocking.
fn http_post(port: u16, path: &str, body: &str) -> (u16, String, Duration) {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read answer");
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body, started.elapsed())
}

/// Leased and held tasks in the namespace's delay queue: (leased, held).
async fn delay_queue_counts(env: &TestEnv) -> (usize, usize) {
    let mut con = env.redis.clone();
    let (mut leased, mut held) = (0, 0);
    for key in env.redis_keys().await {
        if key.ends_with(":lease") {
            let n: usize = redis::cmd("ZCARD")
                .arg(&key)
                .query_async(&mut con)
                .await
                .expect("ZCARD");
            leased += n;
        } else if key.ends_with(":rec") {
            let n: usize = redis::cmd("HLEN")
                .arg(&key)
                .query_async(&mut con)
                .await
                .expect("HLEN");
            held += n;
        }
    }
    (leased, held)
}

async fn eventually(within: Duration, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_broker_pauses_the_pump_and_loses_nothing() {
    let rabbit = tokio::task::spawn_blocking(OwnRabbit::start)
        .await
        .expect("start own RabbitMQ");
    let env = TestEnv::on_broker("blocked", &rabbit.url()).await;
    let api = free_addr();
    let log = std::env::temp_dir().join(format!("{}-scheduler.log", env.ns));
    let mut process_env = env.process_env();
    process_env.extend([
        ("KAIROS_HTTP_ADDR".to_string(), api.to_string()),
        // Short leases: a pump that kept claiming would churn them.
        ("KAIROS_LEASE_MS".to_string(), "3000".to_string()),
    ]);
    let mut scheduler = Proc::spawn_logged("kairos-scheduler", &process_env, &log);
    eventually(Duration::from_secs(60), "the API is up", async || {
        http_get(api.port(), "/healthz").is_some_and(|(status, _)| status == 200)
    })
    .await;

    // Twenty tasks held in Redis, due 10 s from now (rabbitmqctl takes a
    // few seconds on a loaded machine), then the alarm.
    let messages = (0..20)
        .map(|i| {
            let props = with_headers(
                task_props("kairos.noop", &format!("t-{i}")),
                &[(H_DELAY_MS, AMQPValue::LongLongInt(10_000))],
            );
            ("default".to_string(), props, Vec::new())
        })
        .collect();
    env.publish_many(&env.names.delay(), messages).await;
    eventually(Duration::from_secs(30), "the tasks held", async || {
        delay_queue_counts(&env).await.1 == 20
    })
    .await;
    {
        let r = &rabbit;
        tokio::task::block_in_place(|| r.block_publishers());
    }
    assert_eq!(
        delay_queue_counts(&env).await,
        (0, 20),
        "the alarm came after the tasks fell due: the test needs a longer delay"
    );

    // The pump publishes the due tasks, is blocked, gives their confirms
    // up at half the lease and releases them, then claims nothing.
    eventually(Duration::from_secs(60), "the pump paused", async || {
        log_lines(&log, "the pump claims nothing") > 0
    })
    .await;
    // (RabbitMQ may take the first of them before it blocks the
    // connection: those are published and confirmed.)
    eventually(Duration::from_secs(30), "the leases released", async || {
        delay_queue_counts(&env).await.0 == 0
    })
    .await;
    let held = delay_queue_counts(&env).await.1;
    eprintln!("{held} of 20 tasks held back while blocked");
    // Two lease periods: no claim, so no lease and every task still held.
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        assert_eq!(
            delay_queue_counts(&env).await,
            (0, held),
            "a blocked pump must not claim"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // HTTP enqueue answers in bounded time: RabbitMQ still takes the first
    // publish of a connection before it blocks it (202, confirmed), then
    // the next ones wait on the alarm, and get 503.
    let port = api.port();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..3 {
        let body = format!(r#"{{"name": "kairos.noop", "id": "h-{i}"}}"#);
        let (status, text, took) =
            tokio::task::spawn_blocking(move || http_post(port, "/v1/tasks", &body))
                .await
                .expect("post");
        eprintln!("enqueue {i} while blocked: {status} in {took:?}: {text}");
        assert!(took < Duration::from_secs(15), "the answer took {took:?}");
        match status {
            202 => accepted.push(format!("h-{i}")),
            503 => refused += 1,
            other => panic!("enqueue answered {other}: {text}"),
        }
    }
    assert!(refused >= 2, "a blocked broker must answer 503");

    // One more task through a fresh connection (RabbitMQ takes its first
    // publish): the intake holds it, but its ack cannot go out on the
    // blocked connection, so the intake is mid-batch when SIGTERM comes.
    let before = delay_queue_counts(&env).await.1;
    let late = kairos_shared::amqp::connect(&env.amqp_url, "kairos-test-late")
        .await
        .expect("connect");
    let late_channel = late.create_channel().await.expect("channel");
    let props = with_headers(
        task_props("kairos.noop", "late-0"),
        &[(H_DELAY_MS, AMQPValue::LongLongInt(0))],
    );
    // No confirm mode on this channel: nothing to await after the write.
    let _written = late_channel
        .basic_publish(
            env.names.delay().as_str().into(),
            "default".into(),
            lapin::options::BasicPublishOptions::default(),
            b"",
            props,
        )
        .await
        .expect("publish");
    eventually(Duration::from_secs(30), "the late task held", async || {
        delay_queue_counts(&env).await.1 == before + 1
    })
    .await;

    // SIGTERM while blocked: the scheduler still exits within the grace.
    let stopping = Instant::now();
    let status = tokio::task::block_in_place(|| scheduler.terminate(Duration::from_secs(60)));
    let took = stopping.elapsed();
    eprintln!("scheduler stopped while blocked in {took:?} ({status})");
    assert!(status.success(), "exit status {status}");
    assert!(took < STOP_GRACE, "stopping took {took:?}");

    // The alarm clears: a new scheduler delivers every task.
    {
        let r = &rabbit;
        tokio::task::block_in_place(|| r.unblock_publishers());
    }
    let mut scheduler = Proc::spawn_logged("kairos-scheduler", &process_env, &log);
    eventually(
        Duration::from_secs(60),
        "the delay queue empty",
        async || delay_queue_counts(&env).await == (0, 0),
    )
    .await;
    let queue = env.names.queue("default");
    let mut ids = HashSet::new();
    while let Some(m) = env
        .channel
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await
        .expect("basic_get")
    {
        if let Some(id) = m.delivery.properties.message_id() {
            ids.insert(id.to_string());
        }
        m.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
    }
    let tasks: HashSet<String> = (0..20)
        .map(|i| format!("t-{i}"))
        .chain(accepted)
        .chain(["late-0".to_string()])
        .collect();
    assert!(
        tasks.is_subset(&ids),
        "missing: {:?}",
        tasks.difference(&ids).collect::<Vec<_>>()
    );
    scheduler.terminate(Duration::from_secs(30));
    let _ = std::fs::remove_file(&log);
}
