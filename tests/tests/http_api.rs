//! The tasks and dead-letter HTTP API, and `kairosctl task` / `kairosctl
//! dead` on top of it.

use kairos_tests::*;
use kairos_worker::Worker;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_enqueued_over_http_run_and_bad_requests_get_a_400() {
    let env = TestEnv::new("http").await;
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let log = RunLog::default();
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.record", log.handler(0)));
    let api = ScheduleApi::new(addr);
    api.wait_ready(Duration::from_secs(20)).await;

    let now = api
        .call(|a| a.enqueue(&json!({"name": "test.record", "id": "h-now", "body": {"a": 1}, "headers": {"tenant": "acme"}})))
        .await;
    assert_eq!(now.status, 202, "{:?}", now.body);
    assert_eq!(now.body["id"], "h-now");
    let later = api
        .call(|a| a.enqueue(&json!({"name": "test.record", "delay_ms": 100, "priority": 3})))
        .await;
    assert_eq!(later.status, 202);
    let later_id = later.body["id"].as_str().expect("assigned id").to_string();
    assert_eq!(later.body["delayed"], true);
    log.wait_distinct(2, Duration::from_secs(20)).await;
    assert_eq!(log.runs_of("h-now"), 1);
    assert_eq!(log.runs_of(&later_id), 1);

    for (body, field) in [
        (json!({"name": "x", "priority": 12}), "priority"),
        (json!({"name": ""}), "name"),
        (json!({"name": "x", "id": ""}), "id"),
        (json!({"name": "x", "surprise": 1}), "body"),
        (json!({"name": "x", "headers": {"x-attempt": 3}}), "headers"),
    ] {
        let r = api.call(move |a| a.enqueue(&body)).await;
        assert_eq!(r.status, 400, "{:?}", r.body);
        assert_eq!(r.body["field"], field, "{:?}", r.body);
        assert!(r.body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let health = http_get(addr.port(), "/healthz").expect("healthz answers");
    assert_eq!(health.0, 200);
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kairosctl_enqueues_and_manages_dead_letters() {
    let env = TestEnv::new("ctl-dead").await;
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());
    let api = ScheduleApi::new(addr);
    api.wait_ready(Duration::from_secs(20)).await;
    let ctl = |args: &[&str]| {
        let out = Command::new(binary("kairosctl"))
            .args(args)
            .env("KAIROS_HTTP_ADDR", addr.to_string())
            .output()
            .expect("run kairosctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Two tasks no handler serves: both end in NS.dead.
    let (ok, id, err) = ctl(&[
        "task",
        "add",
        "--name",
        "nobody.home",
        "--id",
        "lost-1",
        "--body",
        r#"{"n":1}"#,
    ]);
    assert!(ok, "{err}");
    assert_eq!(id.trim(), "lost-1");
    assert!(ctl(&["task", "add", "--name", "nobody.home", "--id", "lost-2"]).0);
    env.wait_dead_depth(2, Duration::from_secs(20)).await;
    let (ok, table, err) = ctl(&["dead", "list"]);
    assert!(ok, "{err}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("lost-1") && l.contains("no handler")),
        "{table}"
    );
    let listed = api.call(|a| a.dead_list(10)).await;
    assert_eq!(listed.body["dead"].as_array().map(Vec::len), Some(2));

    // Replay one: it dies again (still no handler), as a fresh first attempt.
    let replayed = api.call(|a| a.dead_replay(&["lost-2".to_string()])).await;
    assert_eq!(replayed.body["replayed"], json!(["lost-2"]));
    let (ok, out, err) = ctl(&["dead", "purge"]);
    assert!(ok, "{err}");
    assert!(out.contains("purged"), "{out}");
    // A bad flag value is refused before anything is sent.
    let (ok, _, err) = ctl(&["task", "add", "--name", "x", "--body", "{not json"]);
    assert!(!ok);
    assert!(err.contains("--body"), "{err}");
    worker.stop().await;
    scheduler.stop().await;
}

/// Without `KAIROS_HTTP_ADDR`, kairosctl works on Redis and RabbitMQ
/// directly (the contract's `KAIROS_NAMESPACE`, `KAIROS_REDIS_URL`,
/// `KAIROS_AMQP_URL`): no scheduler needs to run for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kairosctl_works_without_a_scheduler() {
    let env = TestEnv::new("ctl-direct").await;
    let ctl = |args: &[&str]| {
        let out = Command::new(binary("kairosctl"))
            .args(args)
            .env_remove("KAIROS_HTTP_ADDR")
            .env("KAIROS_NAMESPACE", &env.ns)
            .env("KAIROS_REDIS_URL", &env.redis_url)
            .env("KAIROS_AMQP_URL", &env.amqp_url)
            .env("KAIROS_QUEUE_MODE", env.names.mode().to_string())
            .output()
            .expect("run kairosctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = ctl(&[
        "schedule",
        "add",
        "--id",
        "direct.every",
        "--every-ms",
        "1000",
        "--task",
        "test.record",
    ]);
    assert!(ok, "{err}");
    let (ok, table, err) = ctl(&["schedule", "list"]);
    assert!(ok, "{err}");
    assert!(
        table.lines().any(|l| l.starts_with("direct.every")),
        "{table}"
    );
    let (ok, id, err) = ctl(&[
        "task",
        "add",
        "--name",
        "test.record",
        "--id",
        "direct-task",
    ]);
    assert!(ok, "{err}");
    assert_eq!(id.trim(), "direct-task");
    assert_eq!(
        env.queue_depth(&env.names.queue("default")).await,
        1,
        "the task waits for a worker"
    );
    let (ok, _, err) = ctl(&[
        "schedule",
        "add",
        "--id",
        "bad",
        "--cron",
        "61 * * * *",
        "--task",
        "x",
    ]);
    assert!(!ok, "an invalid cron expression is refused");
    assert!(err.contains("400"), "{err}");

    // A scheduler and a worker come up: the task runs, the schedule fires.
    let log = RunLog::default();
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.record", log.handler(0)));
    log.wait_distinct(2, Duration::from_secs(20)).await;
    assert_eq!(log.runs_of("direct-task"), 1);
    let (ok, _, err) = ctl(&["schedule", "rm", "direct.every"]);
    assert!(ok, "{err}");
    worker.stop().await;
    scheduler.stop().await;
}
