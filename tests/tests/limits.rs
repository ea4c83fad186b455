//! Issue 14, items 5 to 7: bounds on what a message may ask for, limits on
//! bodies and headers, stable ids for messages without one, and duplicates
//! reported rather than silently dropped.

use kairos_shared::contract::{H_DELAY_MS, H_MAX_RETRIES, H_RUN_AT};
use kairos_tests::*;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(45);

/// A task without `message_id`, due in a minute (so it stays pending).
fn no_id_props() -> BasicProperties {
    with_headers(
        BasicProperties::default()
            .with_type("kairos.noop".into())
            .with_delivery_mode(2),
        &[(H_DELAY_MS, AMQPValue::LongLongInt(60_000))],
    )
}

fn count(tap: &EventTap, kind: &str) -> usize {
    tap.seen.iter().filter(|e| e.kind == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_id_delivered_twice_is_one_task() {
    let env = TestEnv::new("noid").await;
    let mut tap = EventTap::new(&env).await;
    let scheduler = InProcess::scheduler(env.scheduler_config());
    // The same bytes twice: what a redelivery (intake killed before its ack,
    // or a publisher retrying after a lost confirm) hands the scheduler.
    for _ in 0..2 {
        env.publish(&env.names.delay(), "default", no_id_props(), b"{\"n\":1}")
            .await;
    }
    tap.wait_until(WAIT, "two scheduled-or-duplicate events", |seen| {
        seen.iter()
            .filter(|e| e.kind == "scheduled" || e.kind == "duplicate")
            .count()
            >= 2
    })
    .await;
    assert_eq!(count(&tap, "scheduled"), 1, "{:?}", tap.seen);
    assert_eq!(count(&tap, "duplicate"), 1, "{:?}", tap.seen);
    let ids: HashSet<&str> = tap.seen.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 1, "one id for both deliveries: {ids:?}");
    let id = ids.into_iter().next().unwrap_or_default().to_string();
    assert!(id.starts_with("h-"), "a derived id: {id}");
    // Another body is another task.
    env.publish(&env.names.delay(), "default", no_id_props(), b"{\"n\":2}")
        .await;
    tap.wait_until(WAIT, "a second scheduled event", |seen| {
        seen.iter().filter(|e| e.kind == "scheduled").count() >= 2
    })
    .await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_submission_of_a_pending_id_is_reported() {
    let env = TestEnv::new("dup").await;
    let mut tap = EventTap::new(&env).await;
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let api = ScheduleApi::new(addr);
    api.wait_ready(WAIT).await;

    let task = json!({"name": "kairos.noop", "id": "dup-1", "delay_ms": 60_000});
    let first = api
        .call({
            let t = task.clone();
            move |a| a.enqueue(&t)
        })
        .await;
    assert_eq!(first.status, 202, "{:?}", first.body);
    let second = api.call(move |a| a.enqueue(&task)).await;
    assert_eq!(second.status, 409, "{:?}", second.body);
    assert_eq!(second.body["id"], "dup-1", "{:?}", second.body);
    assert!(
        second.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("pending")),
        "{:?}",
        second.body
    );

    // Over AMQP the same id gives a `duplicate` event.
    let props = with_headers(
        task_props("kairos.noop", "dup-1"),
        &[(H_DELAY_MS, AMQPValue::LongLongInt(60_000))],
    );
    env.publish(&env.names.delay(), "default", props, b"{}")
        .await;
    tap.wait_until(WAIT, "two duplicate events for dup-1", |seen| {
        seen.iter()
            .filter(|e| e.kind == "duplicate" && e.id == "dup-1")
            .count()
            >= 2
    })
    .await;
    assert_eq!(count(&tap, "scheduled"), 1, "{:?}", tap.seen);
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_enforced_with_texts_that_name_them() {
    let env = TestEnv::new("limits").await;
    let mut tap = EventTap::new(&env).await;
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    sc.max_body_bytes = 64 * 1024;
    let scheduler = InProcess::scheduler(sc);
    let api = ScheduleApi::new(addr);
    api.wait_ready(WAIT).await;
    let delay = env.names.delay();

    // A body over KAIROS_MAX_BODY_BYTES.
    env.publish(
        &delay,
        "default",
        task_props("kairos.noop", "big-body"),
        &vec![b'x'; 100_000],
    )
    .await;
    // A header table over KAIROS_MAX_HEADER_BYTES (default 32 KiB).
    let fat = with_headers(
        task_props("kairos.noop", "fat-headers"),
        &[("note", AMQPValue::LongString("y".repeat(40_000).into()))],
    );
    env.publish(&delay, "default", fat, b"{}").await;
    // A due time in microseconds: 55,000 years ahead.
    let micros = with_headers(
        task_props("kairos.noop", "micros"),
        &[(H_RUN_AT, AMQPValue::LongLongInt(now_ms() * 1000))],
    );
    env.publish(&delay, "default", micros, b"{}").await;
    let long_delay = with_headers(
        task_props("kairos.noop", "long-delay"),
        &[(H_DELAY_MS, AMQPValue::LongLongInt(i64::MAX))],
    );
    env.publish(&delay, "default", long_delay, b"{}").await;
    // 2^40 retries.
    let retries = with_headers(
        task_props("kairos.noop", "many-retries"),
        &[(H_MAX_RETRIES, AMQPValue::LongLongInt(1 << 40))],
    );
    env.publish(&delay, "default", retries, b"{}").await;

    let dead = env.dead_letters(5, WAIT).await;
    let reason = |id: &str| dead_letter_error(&dead, id);
    let big = reason("big-body");
    assert!(
        big.contains("KAIROS_MAX_BODY_BYTES") && big.contains("65536"),
        "{big}"
    );
    let fat = reason("fat-headers");
    assert!(fat.contains("KAIROS_MAX_HEADER_BYTES"), "{fat}");
    let micros = reason("micros");
    assert!(
        micros.contains("too far ahead") && micros.contains("microseconds"),
        "{micros}"
    );
    let long = reason("long-delay");
    assert!(
        long.contains("x-delay-ms") && long.contains("too far ahead"),
        "{long}"
    );
    let many = reason("many-retries");
    assert!(many.contains("exceeds the cap"), "{many}");
    // Each task over a limit has its `dead` event (the undecodable one's
    // event is item 4's).
    let over = ["big-body", "fat-headers", "micros", "long-delay"];
    tap.wait_until(WAIT, "dead events of the tasks over a limit", |seen| {
        over.iter()
            .all(|id| seen.iter().any(|e| e.kind == "dead" && e.id == *id))
    })
    .await;

    // Over HTTP: 413 with a JSON error naming the limit.
    let text = "z".repeat(100_000);
    let r = api
        .call(move |a| a.enqueue(&json!({"name": "kairos.noop", "body_text": text})))
        .await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    assert_eq!(r.body["field"], "body", "{:?}", r.body);
    assert!(
        r.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("KAIROS_MAX_BODY_BYTES")),
        "{:?}",
        r.body
    );
    let r = api
        .call(|a| a.enqueue(&json!({"name": "kairos.noop", "run_at": now_ms() * 1000})))
        .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.body["field"], "run_at", "{:?}", r.body);
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_big_bodies_pass_through_in_byte_bounded_batches() {
    const N: usize = 12;
    const SIZE: usize = 5_000_000;
    let env = TestEnv::new("bigbody").await;
    // A private Redis: a few hundred MB pass through it.
    let redis = OwnRedis::start();
    let mut sc = env.scheduler_config();
    sc.redis_url = redis.url();
    sc.max_body_bytes = 8 * 1024 * 1024;
    // Small byte budgets, so every batch and claim is cut by bytes (two
    // bodies each), and an intake buffer of three bodies.
    sc.intake_batch_bytes = 8 * 1024 * 1024;
    sc.claim_batch_bytes = 8 * 1024 * 1024;
    sc.intake_buffer_bytes = 24 * 1024 * 1024;
    let scheduler = InProcess::scheduler(sc);
    let mut consumer = env.consume_queue("default", 4).await;
    let body = vec![b'b'; SIZE];
    for i in 0..N {
        env.publish(
            &env.names.delay(),
            "default",
            task_props("kairos.noop", &format!("big-{i}")),
            &body,
        )
        .await;
    }
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < N {
        let d = tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut consumer))
            .await
            .unwrap_or_else(|_| panic!("only {} of {N} big tasks arrived", seen.len()))
            .expect("consumer ended")
            .expect("delivery");
        assert_eq!(d.data.len(), SIZE);
        seen.insert(kairos_shared::admin::message_id(&d.properties));
        ack(&d).await;
    }
    assert_eq!(seen.len(), N);
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_intake_holds_no_more_bodies_than_its_byte_budget() {
    const N: usize = 30;
    const SIZE: usize = 1_000_000;
    let env = TestEnv::new("stall").await;
    let redis = OwnRedis::start();
    let mut sc = env.scheduler_config();
    sc.redis_url = redis.url();
    sc.max_body_bytes = 2 * 1024 * 1024;
    // Four bodies at the cap: the intake's prefetch becomes 4, not 1,000.
    sc.intake_buffer_bytes = 8 * 1024 * 1024;
    let mut tap = EventTap::new(&env).await;
    let scheduler = InProcess::scheduler(sc);
    // The scheduler is consuming once a first task is held.
    env.publish(
        &env.names.delay(),
        "default",
        task_props("kairos.noop", "first"),
        b"{}",
    )
    .await;
    tap.wait_until(WAIT, "the first task held", |seen| {
        seen.iter()
            .any(|e| e.kind == "scheduled" && e.id == "first")
    })
    .await;
    // Redis stops taking writes: the intake can neither hold nor ack, while
    // the broker would keep sending as far as the prefetch allows.
    let mut con = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("own redis");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(60_000)
        .arg("WRITE")
        .query_async(&mut con)
        .await
        .expect("CLIENT PAUSE");
    let body = vec![b's'; SIZE];
    let messages = (0..N)
        .map(|i| {
            (
                "default".to_string(),
                task_props("kairos.noop", &format!("s-{i}")),
                body.clone(),
            )
        })
        .collect();
    env.publish_many(&env.names.delay(), messages).await;
    // Sampled over two seconds of the stall: the intake keeps at most its
    // prefetch (4) unacked, however often it returns a batch and takes it
    // again; the rest stay ready in RabbitMQ.
    let mut fewest_ready = u32::MAX;
    for _ in 0..20 {
        fewest_ready = fewest_ready.min(env.queue_depth(&env.names.delay()).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut con)
        .await
        .expect("CLIENT UNPAUSE");
    assert!(
        fewest_ready as usize >= N - 4,
        "the stalled intake took {} of {N} bodies of {SIZE} B",
        N - fewest_ready as usize
    );
    // And everything goes through once Redis is back.
    tap.wait_until(Duration::from_secs(90), "all tasks published", |seen| {
        (0..N).all(|i| {
            let id = format!("s-{i}");
            seen.iter().any(|e| e.kind == "published" && e.id == id)
        })
    })
    .await;
    scheduler.stop().await;
}
