//! The control exchange with real worker processes: pausing a queue stops
//! every worker from taking from it (and one started later), resuming
//! drains it; aborting a running task cancels it at once, without a retry;
//! `GET /v1/queues` shows what the broker and Redis hold.

use kairos_shared::events::EventKind;
use kairos_tests::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::Value;
use std::time::Duration;

/// How long a state of the broker (a consumer gone, a queue drained) may
/// take to show.
const SETTLE: Duration = Duration::from_secs(20);
/// How often a test looks at the broker's counts.
const POLL: Duration = Duration::from_millis(50);

/// `(ready, consumers)` of `NS.q.QUEUE` (declared by the test).
async fn counts(env: &TestEnv, logical: &str) -> (u32, u32) {
    let q = env
        .channel
        .queue_declare(
            env.names.queue(logical).as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    (q.message_count(), q.consumer_count())
}

/// Polls until `NS.q.QUEUE` has `n` consumers.
async fn wait_consumers(env: &TestEnv, logical: &str, n: u32) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let (_, c) = counts(env, logical).await;
        if c == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{logical} has {c} consumers, not {n}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A worker process serving `work` and `other`.
fn worker(env: &TestEnv, concurrency: &str) -> Proc {
    let mut penv = env.process_env();
    penv.push(("KAIROS_QUEUES".into(), "work,other".into()));
    penv.push(("KAIROS_CONCURRENCY".into(), concurrency.into()));
    Proc::spawn("kairos-worker", &penv)
}

async fn post(api: &ScheduleApi, path: &str) -> kairosctl::Reply {
    let path = path.to_string();
    api.call(move |a| a.send("POST", &path, None)).await
}

async fn queues(api: &ScheduleApi) -> Value {
    let reply = api.call(|a| a.send("GET", "/v1/queues", None)).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body
}

fn queue_entry<'a>(overview: &'a Value, name: &str) -> &'a Value {
    overview["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .find(|q| q["name"] == name)
        .unwrap_or_else(|| panic!("no queue {name} in {overview}"))
}

/// Polls `GET /v1/tasks/{id}` until its state is `state`.
async fn wait_state(api: &ScheduleApi, id: &str, state: &str) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let path = format!("/v1/tasks/{id}");
        let s = api.call(move |a| a.send("GET", &path, None)).await;
        if s.body["state"] == state {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never {state}: {:?}",
            s.body
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Publishes a `kairos.noop` on `other` and waits for it to succeed: the
/// workers are alive and taking tasks from a queue that is not paused.
async fn probe(env: &TestEnv, tap: &mut EventTap, id: &str) {
    env.publish(
        &env.names.tasks_exchange(),
        "other",
        task_props("kairos.noop", id),
        b"",
    )
    .await;
    let want = id.to_string();
    tap.wait_until(SETTLE, &format!("probe {id} to succeed"), move |seen| {
        seen.iter().any(|e| e.kind == "succeeded" && e.id == want)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_every_worker_and_resume_drains() {
    let env = TestEnv::new("pause").await;
    env.declare_queue("work").await;
    env.declare_queue("other").await;
    let mut tap = EventTap::new(&env).await;
    let (_schedulers, apis) = scheduler_processes(&env, 1).await;
    let api = &apis[0];
    let _w1 = worker(&env, "4");
    let _w2 = worker(&env, "4");
    wait_consumers(&env, "work", 2).await;

    let reply = post(api, "/v1/queues/work/pause").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["name"], "work");
    assert_eq!(reply.body["paused"], true);
    wait_consumers(&env, "work", 0).await;

    let tasks = batch(5, |i| task_props("kairos.noop", &format!("w-{i}")));
    let tasks = tasks
        .into_iter()
        .map(|(_, p, b)| ("work".to_string(), p, b))
        .collect();
    env.publish_many(&env.names.tasks_exchange(), tasks).await;
    // Both workers keep taking from `other` while `work` waits.
    probe(&env, &mut tap, "probe-1").await;
    assert_eq!(counts(&env, "work").await, (5, 0));
    assert_eq!(counts(&env, "other").await.1, 2);

    let overview = queues(api).await;
    let work = queue_entry(&overview, "work");
    assert_eq!(work["ready"], 5, "{work}");
    assert_eq!(work["consumers"], 0, "{work}");
    assert_eq!(work["paused"], true, "{work}");
    let other = queue_entry(&overview, "other");
    assert_eq!(other["paused"], false, "{other}");
    assert_eq!(other["consumers"], 2, "{other}");

    // A worker started while the queue is paused does not take from it.
    let _w3 = worker(&env, "4");
    wait_consumers(&env, "other", 3).await;
    probe(&env, &mut tap, "probe-2").await;
    assert_eq!(counts(&env, "work").await, (5, 0));

    let reply = post(api, "/v1/queues/work/resume").await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["paused"], false);
    tap.wait_until(SETTLE, "the paused tasks to run", |seen| {
        (0..5).all(|i| {
            let id = format!("w-{i}");
            seen.iter().any(|e| e.kind == "succeeded" && e.id == id)
        })
    })
    .await;
    wait_consumers(&env, "work", 3).await;
    let overview = queues(api).await;
    assert_eq!(queue_entry(&overview, "work")["paused"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_cancels_a_running_task_without_retry_and_frees_its_slot() {
    let env = TestEnv::new("abort").await;
    env.declare_queue("work").await;
    env.declare_queue("other").await;
    let mut tap = EventTap::new(&env).await;
    let (_schedulers, apis) = scheduler_processes(&env, 1).await;
    let api = &apis[0];
    // One slot: the next task can only run once the aborted one let go.
    let _w = worker(&env, "1");
    env.publish(
        &env.names.tasks_exchange(),
        "work",
        task_props("kairos.sleep", "long"),
        br#"{"ms": 60000}"#,
    )
    .await;
    tap.wait_until(SETTLE, "the long task to start", |seen| {
        seen.iter().any(|e| e.kind == "started" && e.id == "long")
    })
    .await;

    // Its `running` status is written off the hot path, shortly after.
    wait_state(api, "long", "running").await;
    let asked = std::time::Instant::now();
    let reply = post(api, "/v1/tasks/long/abort").await;
    assert_eq!(reply.status, 202, "{:?}", reply.body);
    assert_eq!(reply.body["abort"], "requested");
    tap.wait_until(Duration::from_secs(5), "the task to be cancelled", |seen| {
        seen.iter().any(|e| e.kind == "cancelled" && e.id == "long")
    })
    .await;
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(3), "cancelled after {took:?}");

    // The slot is free: a task on the same worker runs now.
    probe(&env, &mut tap, "after").await;
    // Not retried, not dead: acked, and nothing went to the retry queue.
    assert_eq!(env.queue_depth(&env.names.retry()).await, 0);
    assert_eq!(counts(&env, "work").await.0, 0);
    assert!(tap.of(EventKind::Failed).is_empty(), "{:?}", tap.seen);
    assert_eq!(
        tap.seen
            .iter()
            .filter(|e| e.kind == "started" && e.id == "long")
            .count(),
        1
    );
    let status = api.call(|a| a.send("GET", "/v1/tasks/long", None)).await;
    assert_eq!(status.status, 200, "{:?}", status.body);
    assert_eq!(status.body["state"], "cancelled", "{:?}", status.body);

    // A task waiting in the delay queue is cancelled there, as DELETE does.
    env.publish(
        &env.names.delay(),
        "work",
        delayed_props("kairos.noop", "later", 60_000),
        b"",
    )
    .await;
    wait_state(api, "later", "scheduled").await;
    let waiting = post(api, "/v1/tasks/later/abort").await;
    assert_eq!(waiting.status, 200, "{:?}", waiting.body);
    assert_eq!(waiting.body["state"], "cancelled", "{:?}", waiting.body);

    let unknown = post(api, "/v1/tasks/no-such-task/abort").await;
    assert_eq!(unknown.status, 404, "{:?}", unknown.body);
    // Finished: nothing left to abort.
    let again = post(api, "/v1/tasks/long/abort").await;
    assert_eq!(again.status, 409, "{:?}", again.body);
    assert_eq!(again.body["state"], "cancelled", "{:?}", again.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_control_message_is_dropped_and_the_worker_goes_on() {
    let env = TestEnv::new("ctlbad").await;
    env.declare_queue("work").await;
    env.declare_queue("other").await;
    let mut tap = EventTap::new(&env).await;
    let _w = worker(&env, "2");
    wait_consumers(&env, "other", 1).await;
    let exchange = kairos_shared::control::exchange(&env.names);
    for bad in [
        &b"not json"[..],
        br#"{"op":"explode"}"#,
        br#"{"op":"pause"}"#,
    ] {
        env.publish(&exchange, "", lapin::BasicProperties::default(), bad)
            .await;
    }
    probe(&env, &mut tap, "still-here").await;
    assert_eq!(counts(&env, "work").await.1, 1, "work is not paused");
    // The listener still acts on the next message (messages of one queue
    // arrive in order): a pause, recorded in Redis as the API does.
    let mut redis = env.redis.clone();
    let _: () = redis::cmd("SADD")
        .arg(kairos_shared::control::paused_key(&env.names))
        .arg("work")
        .query_async(&mut redis)
        .await
        .expect("SADD");
    let pause = kairos_shared::control::ControlMessage::Pause {
        queue: "work".into(),
    };
    env.publish(
        &exchange,
        "",
        lapin::BasicProperties::default(),
        &pause.encode(),
    )
    .await;
    wait_consumers(&env, "work", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_overview_counts_delayed_due_and_dead_per_queue() {
    let env = TestEnv::new("qview").await;
    let (_schedulers, apis) = scheduler_processes(&env, 1).await;
    let api = &apis[0];
    // Two tasks for `late` held for a minute (no queue `NS.q.late` yet)...
    let held: Vec<_> = (0..2)
        .map(|i| {
            (
                "late".to_string(),
                delayed_props("kairos.noop", &format!("l-{i}"), 60_000),
                Vec::new(),
            )
        })
        .collect();
    env.publish_many(&env.names.delay(), held).await;
    // ...and a dead letter that came from it.
    let dead = with_headers(
        task_props("kairos.fail", "d-1"),
        &[(
            kairos_shared::contract::H_ORIGIN_QUEUE,
            lapin::types::AMQPValue::LongString("late".into()),
        )],
    );
    env.publish(&env.names.dead(), "late", dead, b"").await;

    let deadline = tokio::time::Instant::now() + SETTLE;
    let overview = loop {
        let overview = queues(api).await;
        let late = overview["queues"]
            .as_array()
            .and_then(|qs| qs.iter().find(|q| q["name"] == "late").cloned());
        if late.as_ref().is_some_and(|l| l["delayed"] == 2) {
            break overview;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held tasks never showed: {overview}"
        );
        tokio::time::sleep(POLL).await;
    };
    let late = queue_entry(&overview, "late");
    assert_eq!(late["due"], 0, "{late}");
    assert_eq!(late["dead"], 1, "{late}");
    assert_eq!(
        (late["ready"].clone(), late["consumers"].clone()),
        (0.into(), 0.into())
    );
    assert_eq!(late["paused"], false, "{late}");
    assert_eq!(late["rates"]["scheduled"], 2, "{late}");
    assert!(
        overview["delay_queue"]["waiting"].as_u64() >= Some(2),
        "{overview}"
    );
    assert_eq!(overview["dead_letters"]["total"], 1, "{overview}");
    // The dead letter is still there (the count put it back).
    assert_eq!(env.queue_depth(&env.names.dead()).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_watches_its_context_cleans_up_and_ends_at_once() {
    let env = TestEnv::new("coop").await;
    let mut tap = EventTap::new(&env).await;
    let cleaned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = cleaned.clone();
    let handler = move |ctx: kairos_worker::TaskContext, _body: Vec<u8>| {
        let seen = seen.clone();
        async move {
            tokio::select! {
                _ = ctx.cancelled() => {
                    assert!(ctx.is_cancelled());
                    seen.store(true, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                }
                _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(()),
            }
        }
    };
    let worker = InProcess::worker(
        kairos_worker::Worker::new(env.worker_config()).handler("test.coop", handler),
    );
    env.publish(
        &env.names.tasks_exchange(),
        "default",
        task_props("test.coop", "coop-1"),
        b"",
    )
    .await;
    tap.wait_until(SETTLE, "the task to start", |seen| {
        seen.iter().any(|e| e.kind == "started" && e.id == "coop-1")
    })
    .await;
    let abort = kairos_shared::control::ControlMessage::Abort {
        id: "coop-1".into(),
    };
    let asked = std::time::Instant::now();
    env.publish(
        &kairos_shared::control::exchange(&env.names),
        "",
        lapin::BasicProperties::default(),
        &abort.encode(),
    )
    .await;
    tap.wait_until(SETTLE, "the task to be cancelled", |seen| {
        seen.iter()
            .any(|e| e.kind == "cancelled" && e.id == "coop-1")
    })
    .await;
    // Well within the 1 s grace: the handler returned by itself.
    assert!(
        asked.elapsed() < Duration::from_millis(900),
        "{:?}",
        asked.elapsed()
    );
    assert!(cleaned.load(std::sync::atomic::Ordering::SeqCst));
    // Its `Ok` does not make it a success: it was aborted.
    assert!(tap.of(EventKind::Succeeded).is_empty(), "{:?}", tap.seen);
    worker.stop().await;
}
