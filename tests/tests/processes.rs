//! Process behaviour: graceful shutdown, settings errors, and a Redis that
//! dies and comes back under the scheduler.

use kairos_shared::events::EventKind;
use kairos_tests::*;
use lapin::types::AMQPValue;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_tasks_finish_and_leaves_the_rest() {
    let env = TestEnv::new("term").await;
    let mut tap = EventTap::new(&env).await;
    let mut penv = env.process_env();
    penv.push(("KAIROS_CONCURRENCY".into(), "3".into()));
    let mut worker = Proc::spawn("kairos-worker", &penv);
    let tasks: Vec<_> = (0..13)
        .map(|i| {
            (
                "default".to_string(),
                task_props("kairos.sleep", &format!("t-{i}")),
                br#"{"ms": 1000}"#.to_vec(),
            )
        })
        .collect();
    env.publish_many(&env.names.tasks_exchange(), tasks).await;
    tap.wait_until(Duration::from_secs(20), "3 tasks to start", |s| {
        s.iter().filter(|e| e.kind == "started").count() >= 3
    })
    .await;
    let status = worker.terminate(Duration::from_secs(20));
    assert!(status.success(), "worker exited with {status}");
    tap.wait_until(Duration::from_secs(5), "running tasks to succeed", |s| {
        s.iter().filter(|e| e.kind == "succeeded").count() >= 3
    })
    .await;
    assert_eq!(
        tap.of(EventKind::Started).len(),
        3,
        "no new task starts after SIGTERM"
    );
    // The 10 that never started wait in the queue for the next worker.
    assert_eq!(env.queue_depth(&env.names.queue("default")).await, 10);
}

#[test]
fn bad_settings_fail_at_start_naming_the_setting() {
    let cases = [
        ("kairos-worker", "KAIROS_CONCURRENCY", "lots"),
        ("kairos-worker", "KAIROS_QUEUES", " , "),
        ("kairos-worker", "KAIROS_AMQP_URL", "http://x"),
        ("kairos-scheduler", "KAIROS_REDIS_URL", "nope://x"),
        ("kairos-scheduler", "KAIROS_SHARDS", "0"),
        ("kairos-scheduler", "KAIROS_EVENTS", "perhaps"),
    ];
    for (bin, var, value) in cases {
        let out = Command::new(binary(bin))
            .env(var, value)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{bin} accepted {var}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var), "{bin} with {var}={value} said: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_survives_a_redis_restart() {
    let env = TestEnv::new("redisdown").await;
    let mut redis = OwnRedis::start();
    let log = RunLog::default();
    let mut sc = env.scheduler_config();
    sc.redis_url = redis.url();
    sc.common.events = false;
    let scheduler = InProcess::scheduler(sc);
    let mut wc = env.worker_config();
    wc.common.events = false;
    let worker =
        InProcess::worker(kairos_worker::Worker::new(wc).handler("test.record", log.handler(0)));

    // Held in Redis before it dies...
    let before: Vec<_> = batch(50, |i| {
        delayed_props("test.record", &format!("b-{i}"), 1500)
    });
    env.publish_many(&env.names.delay(), before).await;
    // The intake acks only after Redis has them: wait for the queue to drain.
    env.wait_depth(
        &env.names.delay(),
        Duration::from_secs(10),
        "intake did not take the tasks",
        |depth| depth == 0,
    )
    .await;
    redis.kill9();
    // ...and submitted while it is down: the intake must not ack these.
    let during: Vec<_> = batch(10, |i| delayed_props("test.record", &format!("d-{i}"), 10));
    env.publish_many(&env.names.delay(), during).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // Redis stays down a while.
    redis.restart();
    log.wait_distinct(60, Duration::from_secs(30)).await;
    worker.stop().await;
    scheduler.stop().await;
}

/// `KAIROS_METRICS_ADDR` serves Prometheus metrics from both binaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_when_asked_for() {
    let env = TestEnv::new("metrics").await;
    let mut tap = EventTap::new(&env).await;
    let (wport, sport) = (free_port(), free_port());
    let mut wenv = env.process_env();
    wenv.push(("KAIROS_METRICS_ADDR".into(), format!("127.0.0.1:{wport}")));
    wenv.push(("KAIROS_WORKER_ID".into(), "metrics-w".into()));
    let mut senv = env.process_env();
    senv.push(("KAIROS_METRICS_ADDR".into(), format!("127.0.0.1:{sport}")));
    let _worker = Proc::spawn("kairos-worker", &wenv);
    let _scheduler = Proc::spawn("kairos-scheduler", &senv);
    let tasks: Vec<_> = batch(5, |i| delayed_props("kairos.noop", &format!("m-{i}"), 10));
    env.publish_many(&env.names.delay(), tasks).await;
    tap.wait_distinct(EventKind::Succeeded, 5, Duration::from_secs(20))
        .await;

    let scrape = |port: u16, needle: &'static str| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((200, body)) = http_get(port, "/metrics") {
                if body.lines().any(|l| l == needle) {
                    return body;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{needle} never appeared on port {port}: {:?}",
                http_get(port, "/metrics")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let body = scrape(
        wport,
        r#"kairos_worker_finished_total{worker="metrics-w",queue="default",outcome="succeeded"} 5"#,
    )
    .await;
    assert!(
        body.contains("kairos_worker_lateness_seconds_bucket"),
        "{body}"
    );
    scrape(sport, "kairos_scheduler_published_total 5").await;
}

/// Two schedulers on one host with the default `KAIROS_HTTP_ADDR`: the
/// second cannot have the port, and runs without the HTTP API rather than
/// refusing to start (an address asked for explicitly must bind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_scheduler_on_the_default_http_address_still_runs() {
    let env = TestEnv::new("twohttp").await;
    let mut tap = EventTap::new(&env).await;
    let penv: Vec<(String, String)> = env
        .process_env()
        .into_iter()
        .filter(|(k, _)| k != "KAIROS_HTTP_ADDR")
        .collect();
    let mut a = Proc::spawn("kairos-scheduler", &penv);
    let mut b = Proc::spawn("kairos-scheduler", &penv);
    let p = with_headers(
        task_props("kairos.noop", "two"),
        &[("x-delay-ms", AMQPValue::LongInt(10))],
    );
    env.publish(&env.names.delay(), "default", p, b"").await;
    tap.wait_until(Duration::from_secs(20), "the task to be published", |s| {
        s.iter().any(|e| e.id == "two" && e.kind == "published")
    })
    .await;
    assert!(
        a.child.try_wait().expect("status").is_none(),
        "first scheduler exited"
    );
    assert!(
        b.child.try_wait().expect("status").is_none(),
        "second scheduler exited"
    );
}
