//! Task status (issue 16): the merge rules on the real Redis, states
//! through a real scheduler and worker, the task routes (get, cancel,
//! list), the cancel/promotion race, expiry, and status off.

use futures_util::StreamExt;
use kairos_shared::client::NewTask;
use kairos_shared::contract::Task;
use kairos_shared::redis::RedisConn;
use kairos_shared::status::{ShardCount, StatusStore, StatusUpdate, TaskState};
use kairos_tests::*;
use kairos_worker::Worker;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// A store on the shared Redis in `env`'s namespace, keeping `ttl_s`.
fn store(env: &TestEnv, shards: usize, ttl_s: u64) -> StatusStore {
    let pool = kairos_shared::redis::pool(
        REDIS_URL,
        &Default::default(),
        std::time::Duration::from_secs(5),
    )
    .expect("pool");
    StatusStore::new(
        RedisConn::new(pool),
        &env.ns,
        ShardCount::known(shards),
        ttl_s,
    )
}

/// A decoded task `id` on queue `q`, at `attempt`.
fn task(id: &str, q: &str, attempt: u32) -> Task {
    let (_, props) = NewTask::new("t.status")
        .queue(q)
        .id(id)
        .to_message()
        .expect("message");
    let mut t = Task::decode(q, &props, b"").expect("task");
    t.attempt = attempt;
    t
}

#[tokio::test]
async fn merges_keep_the_highest_rank_and_fill_what_is_missing() {
    let env = TestEnv::new("st-merge").await;
    let st = store(&env, 4, 600);
    let t = task("m1", "default", 1);
    st.merge(&StatusUpdate::running(&t, "w1"))
        .await
        .expect("running");
    // A late `scheduled` and `ready` lose, but fill due_at and enqueued_at.
    st.merge(&StatusUpdate::scheduled(&t, 1_000, true))
        .await
        .expect("scheduled");
    st.merge(&StatusUpdate::ready(&t, 1_000))
        .await
        .expect("ready");
    let s = st.get("m1").await.expect("get").expect("known");
    assert_eq!(s.state, Some(TaskState::Running));
    assert_eq!((s.due_at, s.worker.as_deref()), (Some(1_000), Some("w1")));
    assert!(s.enqueued_at.is_some() && s.started_at.is_some());
    st.merge(&StatusUpdate::succeeded(&t))
        .await
        .expect("succeeded");
    // Fields only: progress lands; a retrying of attempt 2 cannot undo a
    // finished state.
    st.set_progress("m1", 150, Some("almost"))
        .await
        .expect("progress");
    st.merge(&StatusUpdate::retrying(&task("m1", "default", 2), 5, "x"))
        .await
        .expect("retrying");
    let s = st.get("m1").await.expect("get").expect("known");
    assert_eq!(s.state, Some(TaskState::Succeeded));
    assert_eq!(s.progress, Some(100));
    assert_eq!(s.progress_message.as_deref(), Some("almost"));
    // A new submission of the same id (another due time) starts over.
    st.merge(&StatusUpdate::scheduled(&t, 2_000, true))
        .await
        .expect("fresh");
    let s = st.get("m1").await.expect("get").expect("known");
    assert_eq!(s.state, Some(TaskState::Scheduled));
    assert_eq!((s.due_at, s.worker), (Some(2_000), None));
    // A replayed dead letter runs again: its finished status is forgotten
    // even at the same due time.
    st.merge(&StatusUpdate::dead(&t, "boom"))
        .await
        .expect("dead");
    st.merge(&StatusUpdate::replayed(&t))
        .await
        .expect("replayed");
    let s = st.get("m1").await.expect("get").expect("known");
    assert_eq!((s.state, s.error), (Some(TaskState::Ready), None));
    // Fields only for an unknown task create nothing.
    st.set_progress("nobody", 5, None).await.expect("progress");
    assert!(st.get("nobody").await.expect("get").is_none());
    // Checkpoints round-trip.
    st.save_checkpoint("m1", b"\x00cp").await.expect("save");
    assert_eq!(
        st.load_checkpoint("m1").await.expect("load").as_deref(),
        Some(&b"\x00cp"[..])
    );
}

/// How often a test looks at a status written in the background.
const POLL: Duration = Duration::from_millis(20);
/// How long a status may take to reach a state.
const WITHIN: Duration = Duration::from_secs(20);

/// A scheduler in process with its HTTP API on a free port, its config
/// changed by `tweak`; its API once it answers.
async fn scheduler(
    env: &TestEnv,
    tweak: impl FnOnce(&mut SchedulerConfig),
) -> (InProcess, ScheduleApi, SchedulerConfig) {
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    tweak(&mut sc);
    let scheduler = InProcess::scheduler(sc.clone());
    let api = ScheduleApi::new(addr);
    api.wait_ready(WITHIN).await;
    (scheduler, api, sc)
}

/// `METHOD PATH` on the API.
async fn call(api: &ScheduleApi, method: &'static str, path: String) -> kairosctl::Reply {
    api.call(move |a| a.send(method, &path, None)).await
}

/// Enqueues `task` over HTTP; its id.
async fn enqueue(api: &ScheduleApi, task: Value) -> String {
    let r = api.call(move |a| a.enqueue(&task)).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

/// Polls `GET /v1/tasks/ID` until its state is `state`; the status.
async fn wait_state(api: &ScheduleApi, id: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let r = call(api, "GET", format!("/v1/tasks/{id}")).await;
        if r.status == 200 && r.body["state"] == state {
            return r.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {id} never became {state}: {} {:?}",
            r.status,
            r.body
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Members of the sorted set `key`.
async fn zcard(env: &TestEnv, key: &str) -> u64 {
    let mut con = env.redis.clone();
    redis::cmd("ZCARD")
        .arg(key)
        .query_async(&mut con)
        .await
        .expect("ZCARD")
}

/// A handler that runs until `gate` is notified.
fn gated(gate: Arc<Notify>) -> impl kairos_worker::Handler {
    move |_ctx: kairos_worker::TaskContext, _body: Vec<u8>| {
        let gate = gate.clone();
        async move {
            gate.notified().await;
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_moves_from_scheduled_to_ready_running_and_succeeded() {
    let env = TestEnv::new("st-flow").await;
    let mut tap = EventTap::new(&env).await;
    let (scheduler, api, _) = scheduler(&env, |_| {}).await;
    let id = enqueue(
        &api,
        json!({"name": "test.gated", "id": "flow-1", "delay_ms": 600, "priority": 2}),
    )
    .await;
    let s = wait_state(&api, &id, "scheduled").await;
    assert_eq!(
        (s["name"].clone(), s["queue"].clone()),
        (json!("test.gated"), json!("default"))
    );
    assert_eq!(
        (s["priority"].clone(), s["attempt"].clone()),
        (json!(2), json!(1))
    );
    assert!(s["due_at"].as_i64().is_some() && s["enqueued_at"].as_i64().is_some());
    assert!(s["started_at"].is_null() && s["worker"].is_null() && s["result"].is_null());
    let shard = kairos_shared::redis::shard_of(&id, 8);
    let waiting = format!("{}:st{{{shard}}}:wait:default", env.ns);
    assert_eq!(zcard(&env, &waiting).await, 1, "waiting in the delay queue");
    // No worker yet: it stays ready once published.
    tap.wait_until(WITHIN, "published", |seen| {
        seen.iter().any(|e| e.kind == "published" && e.id == id)
    })
    .await;
    wait_state(&api, &id, "ready").await;
    assert_eq!(zcard(&env, &waiting).await, 0, "no longer waiting");
    let gate = Arc::new(Notify::new());
    let mut wc = env.worker_config();
    wc.worker_id = Some("w-flow".into());
    let worker = InProcess::worker(Worker::new(wc).handler("test.gated", gated(gate.clone())));
    let running = wait_state(&api, &id, "running").await;
    assert_eq!(running["worker"], "w-flow");
    assert!(running["started_at"].as_i64().is_some());
    gate.notify_one();
    let done = wait_state(&api, &id, "succeeded").await;
    assert!(done["finished_at"].as_i64() >= done["started_at"].as_i64());
    assert_eq!(done["due_at"], s["due_at"], "one due time all along");
    // The queue is known, and each step counted in its rates.
    let mut con = env.redis.clone();
    let queues: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!("{}:queues", env.ns))
        .query_async(&mut con)
        .await
        .expect("SMEMBERS");
    assert!(queues.contains(&"default".to_string()), "{queues:?}");
    let rates: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(format!("{}:rate:default", env.ns))
        .query_async(&mut con)
        .await
        .expect("HGETALL");
    for event in ["scheduled", "ready", "started", "succeeded"] {
        let n: u64 = rates
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{event}:")))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(n, 1, "{event}: {rates:?}");
    }
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_is_retrying_then_dead_with_its_error() {
    let env = TestEnv::new("st-dead").await;
    // A backoff long enough to see `retrying`.
    let (scheduler, api, _) = scheduler(&env, |c| c.retry_base_ms = 2_000).await;
    let worker = InProcess::worker(Worker::new(env.worker_config()).handler(
        "test.fail",
        |_ctx: kairos_worker::TaskContext, _body: Vec<u8>| async move {
            Err::<(), _>(kairos_worker::TaskError::retry("boom"))
        },
    ));
    let id = enqueue(
        &api,
        json!({"name": "test.fail", "id": "dead-1", "max_retries": 1}),
    )
    .await;
    let retrying = wait_state(&api, &id, "retrying").await;
    assert_eq!(retrying["attempt"], 2);
    assert_eq!(retrying["error"], "boom");
    let dead = wait_state(&api, &id, "dead").await;
    assert_eq!(
        (dead["attempt"].clone(), dead["error"].clone()),
        (json!(2), json!("boom"))
    );
    assert!(dead["finished_at"].as_i64().is_some());
    // Finished: too late to cancel.
    let r = call(&api, "DELETE", format!("/v1/tasks/{id}")).await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert_eq!(
        (r.body["id"].clone(), r.body["state"].clone()),
        (json!(id), json!("dead"))
    );
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_task_is_404_and_a_cancelled_one_never_runs() {
    let env = TestEnv::new("st-cancel").await;
    let mut tap = EventTap::new(&env).await;
    let (scheduler, api, sc) = scheduler(&env, |_| {}).await;
    let log = RunLog::default();
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.record", log.handler(0)));
    for method in ["GET", "DELETE"] {
        let r = call(&api, method, "/v1/tasks/nobody".into()).await;
        assert_eq!(r.status, 404, "{method}: {:?}", r.body);
        assert!(r.body["error"].as_str().is_some());
    }
    // Ids no task can have are refused before they reach Redis: a tab
    // would let an id name another task's retry member (`ID<TAB>N`).
    let long = "x".repeat(129);
    for (method, id) in [
        ("DELETE", "gone%092"),
        ("GET", "gone%092"),
        ("DELETE", "%FF%FE"),
        ("GET", long.as_str()),
    ] {
        let r = call(&api, method, format!("/v1/tasks/{id}")).await;
        assert_eq!(r.status, 400, "{method} {id}: {:?}", r.body);
        assert_eq!(r.body["field"], "id", "{method} {id}");
    }
    // `late` is due after `gone`: once it ran, `gone` would have too.
    let gone = enqueue(
        &api,
        json!({"name": "test.record", "id": "gone", "delay_ms": 1_500}),
    )
    .await;
    let late = enqueue(
        &api,
        json!({"name": "test.record", "id": "late", "delay_ms": 2_000}),
    )
    .await;
    let r = call(&api, "DELETE", format!("/v1/tasks/{gone}")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body, json!({"id": "gone", "state": "cancelled"}));
    let s = wait_state(&api, &gone, "cancelled").await;
    assert!(s["finished_at"].as_i64().is_some());
    tap.wait_until(WITHIN, "late succeeded", |seen| {
        seen.iter().any(|e| e.kind == "succeeded" && e.id == late)
    })
    .await;
    assert_eq!(log.runs_of(&gone), 0, "a cancelled task never runs");
    assert!(!tap
        .seen
        .iter()
        .any(|e| e.id == gone && e.kind == "published"));
    assert_eq!(
        wait_state(&api, &gone, "cancelled").await["state"],
        "cancelled"
    );
    // Cancelling again, or a finished task: 409 with the state.
    let again = call(&api, "DELETE", format!("/v1/tasks/{gone}")).await;
    assert_eq!(
        (again.status, again.body["state"].clone()),
        (409, json!("cancelled"))
    );
    wait_state(&api, &late, "succeeded").await;
    let r = call(&api, "DELETE", format!("/v1/tasks/{late}")).await;
    assert_eq!(
        (r.status, r.body["state"].clone()),
        (409, json!("succeeded"))
    );
    // kairosctl's in-process mode has the same routes.
    let local = tokio::task::spawn_blocking(move || {
        let api = kairosctl::Api::local(&sc).expect("in-process API");
        (
            api.send("GET", "/v1/tasks/late", None).expect("get"),
            api.send("DELETE", "/v1/tasks/nobody", None)
                .expect("delete"),
        )
    })
    .await
    .expect("in-process calls");
    assert_eq!(
        (local.0.status, local.0.body["state"].clone()),
        (200, json!("succeeded"))
    );
    assert_eq!(local.1.status, 404);
    worker.stop().await;
    scheduler.stop().await;
}

/// Tasks waiting or leased in the delay queue of `env` (8 shards).
async fn pending(env: &TestEnv) -> u64 {
    let mut con = env.redis.clone();
    let mut pipe = redis::pipe();
    for s in 0..8 {
        pipe.cmd("HLEN").arg(format!("{}:dq{{{s}}}:rec", env.ns));
    }
    let counts: Vec<u64> = con.query_pipe(&pipe).await.expect("HLEN");
    counts.into_iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_racing_the_promotion_either_wins_or_gets_409_never_both() {
    const TASKS: usize = 200;
    let env = TestEnv::new("st-race").await;
    let (scheduler, api, _) = scheduler(&env, |_| {}).await;
    // Every task due at one instant; the pump claims them up to 100 ms
    // ahead. The cancels are spread around that moment.
    let due = now_ms() + 3_000;
    let enqueues = (0..TASKS).map(|i| {
        let api = api.clone();
        async move {
            enqueue(
                &api,
                json!({"name": "test.race", "id": format!("race-{i}"), "run_at": due}),
            )
            .await
        }
    });
    let ids = futures_util::future::join_all(enqueues).await;
    assert!(
        now_ms() < due - 400,
        "enqueueing took too long for the race"
    );
    let start = due - 250;
    let cancels = ids.iter().enumerate().map(|(i, id)| {
        let (api, id) = (api.clone(), id.clone());
        let at = start + (i as i64 * 300) / TASKS as i64;
        tokio::spawn(async move {
            let wait = u64::try_from(at - now_ms()).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let r = call(&api, "DELETE", format!("/v1/tasks/{id}")).await;
            (id, r.status, r.body)
        })
    });
    let outcomes: Vec<(String, u16, Value)> = futures_util::future::join_all(cancels)
        .await
        .into_iter()
        .map(|r| r.expect("cancel task"))
        .collect();
    // Everything not withdrawn is published: wait until the delay queue
    // is empty (a task leaves it only after the broker confirmed it).
    let deadline = tokio::time::Instant::now() + WITHIN;
    while pending(&env).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the delay queue never emptied"
        );
        tokio::time::sleep(POLL).await;
    }
    let published = env.queue_depth(&env.names.queue("default")).await as usize;
    let mut consumer = env.consume_queue("default", 500).await;
    let mut delivered = std::collections::HashSet::new();
    while delivered.len() < published {
        let d = consumer.next().await.expect("delivery").expect("delivery");
        delivered.insert(d.properties.message_id().as_ref().expect("id").to_string());
        ack(&d).await;
    }
    let (mut won, mut lost) = (0, 0);
    for (id, status, body) in &outcomes {
        match status {
            200 => {
                won += 1;
                assert!(
                    !delivered.contains(id),
                    "{id}: cancelled (200) and delivered"
                );
            }
            409 => {
                lost += 1;
                assert!(
                    delivered.contains(id),
                    "{id}: 409 and never delivered: {body:?}"
                );
                assert_eq!(body["state"], "ready", "{id}");
            }
            other => panic!("{id}: cancel answered {other}: {body:?}"),
        }
    }
    assert_eq!(won + lost, TASKS);
    assert_eq!(
        delivered.len(),
        lost,
        "only the tasks whose cancel lost were delivered"
    );
    eprintln!("race: {won} cancelled, {lost} published first");
    assert!(
        won > 0 && lost > 0,
        "the cancels did not straddle the promotion: {won} won, {lost} lost"
    );
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_filters_and_pages_newest_first() {
    let env = TestEnv::new("st-list").await;
    let (scheduler, api, _) = scheduler(&env, |_| {}).await;
    for i in 0..5 {
        enqueue(
            &api,
            json!({"name": "a.one", "id": format!("one-{i}"), "delay_ms": 600_000}),
        )
        .await;
    }
    for i in 0..3 {
        enqueue(
            &api,
            json!({"name": "b.two", "id": format!("two-{i}"), "queue": "other", "delay_ms": 600_000}),
        )
        .await;
    }
    let list = |query: &'static str| call(&api, "GET", format!("/v1/tasks?{query}"));
    let deadline = tokio::time::Instant::now() + WITHIN;
    while list("state=scheduled").await.body["tasks"]
        .as_array()
        .map_or(0, Vec::len)
        < 8
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "statuses never written"
        );
        tokio::time::sleep(POLL).await;
    }
    let names = |r: &kairosctl::Reply| -> Vec<String> {
        r.body["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .map(|t| t["id"].as_str().expect("id").to_string())
            .collect()
    };
    let ones = list("name=a.one").await;
    assert_eq!(names(&ones).len(), 5, "{:?}", ones.body);
    assert!(ones.body["next_cursor"].is_null());
    assert!(
        ones.body["tasks"][0].get("result").is_none(),
        "lists leave results out"
    );
    let other = list("queue=other&state=scheduled").await;
    assert_eq!(names(&other).len(), 3);
    assert!(names(&list("state=running").await).is_empty());
    // Pages of 3: every task once, newest first.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..4 {
        let path = match &cursor {
            Some(c) => format!("/v1/tasks?limit=3&cursor={c}"),
            None => "/v1/tasks?limit=3".to_string(),
        };
        let page = call(&api, "GET", path).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let times: Vec<i64> = page.body["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .map(|t| t["updated_at"].as_i64().expect("updated_at"))
            .collect();
        assert!(
            times.windows(2).all(|w| w[0] >= w[1]),
            "newest first: {times:?}"
        );
        seen.extend(names(&page));
        cursor = page.body["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8, "{seen:?}");
    assert!(cursor.is_none());
    for (query, field) in [
        ("state=nope", "state"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("cursor=zzz", "cursor"),
    ] {
        let r = list(query).await;
        assert_eq!(
            (r.status, r.body["field"].clone()),
            (400, json!(field)),
            "{query}: {:?}",
            r.body
        );
    }
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_status_expires_after_its_ttl_and_a_waiting_one_lasts_past_its_due_time() {
    let env = TestEnv::new("st-ttl").await;
    let (scheduler, api, _) = scheduler(&env, |c| c.status.status_ttl_s = 1).await;
    let mut wc = env.worker_config();
    wc.status.status_ttl_s = 1;
    let log = RunLog::default();
    let worker = InProcess::worker(Worker::new(wc).handler("test.record", log.handler(0)));
    let id = enqueue(&api, json!({"name": "test.record", "id": "short"})).await;
    wait_state(&api, &id, "succeeded").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while call(&api, "GET", format!("/v1/tasks/{id}")).await.status != 404 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the status never expired"
        );
        tokio::time::sleep(POLL).await;
    }
    // Due in a minute: kept until a TTL after that.
    let later = enqueue(
        &api,
        json!({"name": "test.record", "id": "later", "delay_ms": 60_000}),
    )
    .await;
    wait_state(&api, &later, "scheduled").await;
    let mut con = env.redis.clone();
    let shard = kairos_shared::redis::shard_of(&later, 8);
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("{}:st{{{shard}}}:t:{later}", env.ns))
        .query_async(&mut con)
        .await
        .expect("TTL");
    assert!((55..=61).contains(&ttl), "{ttl}");
    worker.stop().await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_status_off_nothing_is_written() {
    let env = TestEnv::new("st-off").await;
    let mut tap = EventTap::new(&env).await;
    let (running, api, _) = scheduler(&env, |c| c.status.status = false).await;
    let mut wc = env.worker_config();
    wc.status.status = false;
    let log = RunLog::default();
    let worker = InProcess::worker(Worker::new(wc).handler("test.record", log.handler(0)));
    let now = enqueue(&api, json!({"name": "test.record", "id": "off-now"})).await;
    let later = enqueue(
        &api,
        json!({"name": "test.record", "id": "off-later", "delay_ms": 100}),
    )
    .await;
    tap.wait_distinct(kairos_shared::events::EventKind::Succeeded, 2, WITHIN)
        .await;
    worker.stop().await;
    running.stop().await;
    let status_keys: Vec<String> = env
        .redis_keys()
        .await
        .into_iter()
        .filter(|k| k.contains(":st{") || k.contains(":rate:"))
        .collect();
    assert!(status_keys.is_empty(), "{status_keys:?}");
    let (again, api, _) = scheduler(&env, |c| c.status.status = false).await;
    for id in [now, later] {
        assert_eq!(
            call(&api, "GET", format!("/v1/tasks/{id}")).await.status,
            404
        );
    }
    // Stopped before the namespace is removed: a scheduler still running
    // then would declare its queues again after the cleanup.
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_without_redis_drops_and_counts_and_never_waits() {
    let env = TestEnv::new("st-down").await;
    // Nothing listens there: every flush fails at once.
    let pool = kairos_shared::redis::pool(
        &format!("redis://{}/0", free_addr()),
        &Default::default(),
        Duration::from_millis(200),
    )
    .expect("pool");
    let work = kairos_shared::supervise::Supervisor::new();
    let writer = kairos_shared::status::StatusWriter::start(
        &kairos_shared::status::StatusSettings::default(),
        RedisConn::new(pool),
        &env.ns,
        ShardCount::known(8),
        &work,
    );
    let t = task("down-1", "default", 1);
    let n = 100_000;
    let started = std::time::Instant::now();
    for _ in 0..n {
        writer.record(StatusUpdate::running(&t, "w"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "recording waited: {:?}",
        started.elapsed()
    );
    // Dropped when the channel was full, or when their flush failed.
    let deadline = tokio::time::Instant::now() + WITHIN;
    while writer.dropped() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} counted",
            writer.dropped()
        );
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(writer.dropped(), n, "every update dropped and counted once");
    writer.close(Duration::from_secs(5)).await;
    work.stop();
}
