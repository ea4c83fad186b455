//! Issue 14, items 2 and 3: AMQP short strings (at most 255 bytes) that
//! come from users (header names, routing keys, namespaces) are refused
//! where they enter, with the field named, and never reach a conversion
//! that panics; a bad schedule stops only itself; the background loops are
//! supervised and visible in `/readyz`.

use kairos_scheduler::delay::store::RedisDelayQueue;
use kairos_scheduler::schedules::model::ScheduleSpec;
use kairos_scheduler::schedules::store::ScheduleStore;
use kairos_shared::contract::{H_ERROR, H_RUN_AT};
use kairos_tests::*;
use kairos_worker::Worker;
use lapin::types::AMQPValue;
use serde_json::{json, Value};
use std::time::Duration;

/// A scheduler in this process with its API on a known address, and a
/// worker recording `test.tick` runs.
async fn scheduler_and_worker(env: &TestEnv) -> (InProcess, ScheduleApi, InProcess, RunLog) {
    let mut c = env.scheduler_config();
    let addr = free_addr();
    c.http_addr = addr;
    let scheduler = InProcess::scheduler(c);
    let api = ScheduleApi::new(addr);
    api.wait_ready(Duration::from_secs(20)).await;
    let log = RunLog::default();
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.tick", log.handler(0)));
    (scheduler, api, worker, log)
}

/// `/readyz` of the scheduler behind `api`: (status, JSON body).
async fn readyz(api: &ScheduleApi) -> (u16, Value) {
    let port: u16 = api
        .addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let (status, body) = tokio::task::spawn_blocking(move || http_get(port, "/readyz"))
        .await
        .expect("readyz call")
        .expect("readyz answers");
    (status, serde_json::from_str(&body).expect("readyz JSON"))
}

/// Waits until schedule `id` ran `n` ticks after `after` (Unix ms).
async fn ticks_after(log: &RunLog, id: &str, n: usize, after: i64) {
    let what = format!("{n} ticks of {id}");
    log.wait_for(Duration::from_secs(45), &what, |l| {
        l.ticks_of(id).iter().filter(|t| **t > after).count() >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_header_name_over_255_bytes_is_a_400_and_other_schedules_keep_firing() {
    let env = TestEnv::new("ssput").await;
    let (scheduler, api, worker, log) = scheduler_and_worker(&env).await;
    let sound = json!({"every_ms": 1000, "task": {"name": "test.tick"}});
    assert_eq!(api.put("sound", sound).await.status, 201);

    let mut headers = serde_json::Map::new();
    headers.insert("h".repeat(300), json!("v"));
    let bad = json!({"every_ms": 1000, "task": {"name": "test.tick", "headers": headers}});
    let r = api.put("bad", bad).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["field"], "task.headers", "{:?}", r.body);
    let error = r.body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("header name") && error.contains("300 bytes"),
        "{error}"
    );
    assert_eq!(api.get("bad").await.status, 404, "nothing was stored");

    // The sound schedule keeps firing (it fired 0 times in 6 s before).
    ticks_after(&log, "sound", 3, now_ms()).await;
    let (status, body) = readyz(&api).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["loops"]["ticker"]["state"], "running", "{body}");
    assert_eq!(body["loops"]["ticker"]["restarts"], 0, "{body}");
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_definition_stored_past_validation_fails_alone_and_is_reported() {
    let env = TestEnv::new("ssstore").await;
    let (scheduler, api, worker, log) = scheduler_and_worker(&env).await;
    let sound = json!({"every_ms": 1000, "task": {"name": "test.tick"}});
    assert_eq!(api.put("sound", sound).await.status, 201);
    ticks_after(&log, "sound", 1, 0).await;

    // Written straight into Redis, as a hand edit or an older version
    // would: a header name no AMQP message can carry.
    let config = env.scheduler_config();
    let pool = deadpool_redis::Config::from_url("redis://127.0.0.1:6379/0")
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("pool");
    let shards = usize::from(config.shards);
    let queue = RedisDelayQueue::new(pool.clone(), &config.common.namespace, shards);
    queue
        .check_shard_count()
        .await
        .expect("shard count matches");
    let store = ScheduleStore::new(pool, &config.common.namespace, &queue);
    let def = format!(
        r#"{{"every_ms":1000,"task":{{"name":"test.tick","headers":{{"{}":1}}}}}}"#,
        "h".repeat(300)
    );
    let spec = ScheduleSpec::from_json(def.as_bytes()).expect("parses without validation");
    let due = now_ms() + 200;
    store
        .put(&spec, "bad", Some(due), false)
        .await
        .expect("stored");

    // Well after the bad one fell due, the sound one still fires.
    ticks_after(&log, "sound", 3, due).await;
    assert!(log.ticks_of("bad").is_empty(), "the bad schedule ran");
    let view = api.get("bad").await;
    let failed = view.body["failed"].as_str().unwrap_or_default().to_string();
    assert!(failed.contains("header name"), "{:?}", view.body);
    assert!(view.body["next_fire_at"].is_null(), "{:?}", view.body);
    let (status, body) = readyz(&api).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["loops"]["ticker"]["restarts"], 0, "{body}");

    // Replacing it with a sound definition clears the failure.
    let fixed = json!({"every_ms": 1000, "task": {"name": "test.tick"}});
    assert_eq!(api.put("bad", fixed).await.status, 200);
    assert!(api.get("bad").await.body["failed"].is_null());
    ticks_after(&log, "bad", 1, 0).await;
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_key_that_cannot_name_a_queue_is_dead_lettered_and_its_batch_runs() {
    let env = TestEnv::new("sskey").await;
    let (scheduler, _api, worker, log) = scheduler_and_worker(&env).await;
    // One due time for all, so they are claimed and published together.
    let at = AMQPValue::LongLongInt(now_ms() + 1500);
    let mut burst = Vec::new();
    for i in 0..20 {
        let props = with_headers(
            task_props("test.tick", &format!("ok-{i}")),
            &[(H_RUN_AT, at.clone())],
        );
        burst.push(("default".to_string(), props, b"{}".to_vec()));
    }
    for len in [247, 250, 255] {
        let props = with_headers(
            task_props("test.tick", &format!("long-{len}")),
            &[(H_RUN_AT, at.clone())],
        );
        burst.insert(10, ("k".repeat(len), props, b"{}".to_vec()));
    }
    env.publish_many(&env.names.delay(), burst).await;

    log.wait_distinct(20, Duration::from_secs(45)).await;
    let dead = env.dead_letters(3, Duration::from_secs(30)).await;
    for len in [247, 250, 255] {
        let id = format!("long-{len}");
        let d = dead_letter_of(&dead, &id);
        let error = d.header(H_ERROR).unwrap_or_default();
        assert!(error.contains("routing key"), "{error}");
        assert_eq!(log.runs_of(&id), 0);
    }
    for i in 0..20 {
        assert_eq!(log.runs_of(&format!("ok-{i}")), 1, "ok-{i}");
    }
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_too_long_over_http_are_a_400_naming_the_field() {
    let env = TestEnv::new("sshttp").await;
    let (scheduler, api, worker, log) = scheduler_and_worker(&env).await;
    let mut headers = serde_json::Map::new();
    headers.insert("h".repeat(256), json!(1));
    for (body, field) in [
        (json!({"name": "test.tick", "headers": headers}), "headers"),
        (
            json!({"name": "test.tick", "queue": "q".repeat(201)}),
            "queue",
        ),
        (json!({"name": "n".repeat(256)}), "name"),
    ] {
        let r = api.call(move |a| a.enqueue(&body)).await;
        assert_eq!(r.status, 400, "{:?}", r.body);
        assert_eq!(r.body["field"], field, "{:?}", r.body);
    }
    // The API and the broker connection behind it still work.
    let r = api
        .call(|a| a.enqueue(&json!({"name": "test.tick", "id": "after"})))
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    log.wait_distinct(1, Duration::from_secs(30)).await;
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_without_room_for_queue_names_fails_at_start_naming_the_setting() {
    let env = TestEnv::new("ssns").await;
    let long = "n".repeat(60);
    // In process: `run` refuses before connecting to anything.
    let mut config = env.scheduler_config();
    config.common.namespace = long.clone();
    let run = kairos_scheduler::run(config, std::future::pending());
    let err = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("returns at once")
        .expect_err("refused");
    assert!(err.to_string().contains("KAIROS_NAMESPACE"), "{err}");
    let mut wconfig = env.worker_config();
    wconfig.common.namespace = long.clone();
    let run = Worker::new(wconfig)
        .with_builtins()
        .run(std::future::pending());
    let err = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("returns at once")
        .expect_err("refused");
    assert!(err.to_string().contains("KAIROS_NAMESPACE"), "{err}");
    // The binary: exits non-zero with the setting named.
    let mut penv = env.process_env();
    penv.retain(|(k, _)| k != "KAIROS_NAMESPACE");
    penv.push(("KAIROS_NAMESPACE".into(), long.clone()));
    let out = std::process::Command::new(binary("kairos-scheduler"))
        .envs(penv)
        .output()
        .expect("run kairos-scheduler");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KAIROS_NAMESPACE"), "{stderr}");
    // And the Rust client refuses it too.
    let err = kairos_shared::client::Client::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        long.as_str(),
    )
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("namespace"), "{err}");
}
