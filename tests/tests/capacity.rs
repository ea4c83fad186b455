//! Resource-aware dispatch (issue 17), with a real `kairos-worker` and the
//! built-in `kairos.sleep`: tasks declare what they cost (`x-cost`), a
//! worker has `KAIROS_CAPACITY` units, and a task runs only when its cost
//! fits in the free units. Each task's run is the interval between its
//! `started` and `succeeded` events (the worker's clock, in ms).

use kairos_shared::amqp::now_ms;
use kairos_shared::contract::H_COST;
use kairos_shared::events::EventKind;
use kairos_tests::*;
use lapin::options::BasicPublishOptions;
use lapin::types::AMQPValue;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The workers' units in these tests.
const CAPACITY: u32 = 4;
/// `KAIROS_CAPACITY_RESERVE_MS` in these tests (the default).
const RESERVE_MS: i64 = 1_000;
/// What the tests wait for at most.
const WITHIN: Duration = Duration::from_secs(30);

/// A worker with 4 units, 8 slots (so the units are what limits), and a
/// prefetch that lets lighter deliveries arrive while a heavy one waits.
fn worker(env: &TestEnv) -> Proc {
    let mut penv = env.process_env();
    penv.extend(
        [
            ("KAIROS_CONCURRENCY", "8".to_string()),
            ("KAIROS_PREFETCH", "50".to_string()),
            ("KAIROS_CAPACITY", CAPACITY.to_string()),
            ("KAIROS_CAPACITY_RESERVE_MS", RESERVE_MS.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    Proc::spawn("kairos-worker", &penv)
}

/// A `kairos.sleep` of `ms` costing `cost` units.
fn sleep_task(id: &str, cost: u32, ms: u64) -> (String, lapin::BasicProperties, Vec<u8>) {
    let props = with_headers(
        task_props("kairos.sleep", id),
        &[(H_COST, AMQPValue::LongLongInt(i64::from(cost)))],
    );
    (
        "default".to_string(),
        props,
        format!(r#"{{"ms": {ms}}}"#).into_bytes(),
    )
}

/// The run of task `id`: (started, succeeded) in worker ms.
fn interval(tap: &EventTap, id: &str) -> (i64, i64) {
    (
        tap.first(EventKind::Started, id).at,
        tap.first(EventKind::Succeeded, id).at,
    )
}

/// Whether two runs share time. Touching ends do not: the units a task
/// gives back as it ends are what the next one starts with.
fn overlap(a: (i64, i64), b: (i64, i64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavy_task_runs_alone_and_light_ones_together() {
    let env = TestEnv::new("cost").await;
    let mut tap = EventTap::new(&env).await;
    // Queued before the worker starts, so it receives them in this order:
    // four cost-1 tasks, a cost-4 one, four more cost-1 ones.
    let mut tasks: Vec<_> = (0..4)
        .map(|i| sleep_task(&format!("light-a{i}"), 1, 400))
        .collect();
    tasks.push(sleep_task("heavy", CAPACITY, 400));
    tasks.extend((0..4).map(|i| sleep_task(&format!("light-b{i}"), 1, 400)));
    let ids: Vec<String> = tasks
        .iter()
        .filter_map(|(_, p, _)| p.message_id().as_ref().map(|s| s.to_string()))
        .collect();
    env.publish_many(&env.names.tasks_exchange(), tasks).await;
    let _worker = worker(&env);
    tap.wait_distinct(EventKind::Succeeded, ids.len(), WITHIN)
        .await;

    let heavy = interval(&tap, "heavy");
    for id in ids.iter().filter(|id| *id != "heavy") {
        let light = interval(&tap, id);
        assert!(
            !overlap(heavy, light),
            "{id} {light:?} ran beside the cost-4 task {heavy:?}"
        );
    }
    // Times shown from the first start.
    let t0 = tap
        .of(EventKind::Started)
        .iter()
        .map(|e| e.at)
        .min()
        .unwrap_or_default();
    let rel = |(s, e): (i64, i64)| (s - t0, e - t0);
    for group in ["light-a", "light-b"] {
        let runs: Vec<_> = (0..4)
            .map(|i| rel(interval(&tap, &format!("{group}{i}"))))
            .collect();
        let last_start = runs.iter().map(|r| r.0).max().unwrap_or_default();
        let first_end = runs.iter().map(|r| r.1).min().unwrap_or_default();
        println!(
            "{group}: four cost-1 runs (ms) {runs:?}; all four at once for {} ms",
            first_end - last_start
        );
        assert!(
            last_start < first_end,
            "the four cost-1 tasks of {group} did not all run at once: {runs:?}"
        );
    }
    // light-b may overtake the heavy task (it waited less than the
    // reserve bound when units came free), or follow it.
    println!("heavy (cost 4): {:?}, alone", rel(heavy));
    assert!(tap.of(EventKind::Dead).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_costing_more_than_the_capacity_is_dead_lettered() {
    let env = TestEnv::new("cost-over").await;
    let mut tap = EventTap::new(&env).await;
    let _worker = worker(&env);
    env.publish_many(
        &env.names.tasks_exchange(),
        vec![
            sleep_task("too-heavy", CAPACITY + 1, 10),
            sleep_task("fits", CAPACITY, 10),
        ],
    )
    .await;
    let dead = env.dead_letters(1, WITHIN).await;
    let reason = dead_letter_error(&dead, "too-heavy");
    println!("dead-letter reason: {reason}");
    assert!(reason.contains("x-cost 5"), "{reason}");
    assert!(reason.contains("KAIROS_CAPACITY 4"), "{reason}");
    tap.wait_until(WITHIN, "the dead event and the cost-4 task", |seen| {
        seen.iter().any(|e| e.kind == "dead" && e.id == "too-heavy")
            && seen.iter().any(|e| e.kind == "succeeded" && e.id == "fits")
    })
    .await;
    // Dead-lettered without running, and not retried.
    assert!(tap
        .seen
        .iter()
        .all(|e| e.id != "too-heavy" || e.kind == "dead"));
    let dead_event = tap.first(EventKind::Dead, "too-heavy");
    assert_eq!(dead_event.error.as_deref(), Some(reason.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heavy_task_is_not_starved_by_a_stream_of_light_ones() {
    let env = TestEnv::new("cost-starve").await;
    let mut tap = EventTap::new(&env).await;
    let _worker = worker(&env);
    // A cost-1 task of LIGHT_MS every EVERY_MS keeps about three units
    // busy all the time: never all four free, so without the reserve rule
    // the cost-4 task would wait as long as the stream lasts.
    const LIGHT_MS: i64 = 300;
    const EVERY_MS: u64 = 100;
    let stop = CancellationToken::new();
    let stream = {
        let channel = env.conn.create_channel().await.expect("channel");
        let exchange = env.names.tasks_exchange();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(EVERY_MS));
            let mut n = 0;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return n,
                    _ = tick.tick() => {}
                }
                let (key, props, body) = sleep_task(&format!("light-{n}"), 1, LIGHT_MS as u64);
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        key.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
                    .expect("publish");
                n += 1;
            }
        })
    };
    // The stream is running...
    tap.wait_distinct(EventKind::Started, 8, WITHIN).await;
    // ...when the heavy task arrives.
    let published = now_ms();
    env.publish_many(
        &env.names.tasks_exchange(),
        vec![sleep_task("heavy", CAPACITY, 200)],
    )
    .await;
    tap.wait_until(WITHIN, "the heavy task to succeed", |seen| {
        seen.iter()
            .any(|e| e.kind == "succeeded" && e.id == "heavy")
    })
    .await;
    // A little more stream after it, then every light task to its end.
    tap.collect_for(Duration::from_millis(500)).await;
    stop.cancel();
    let published_lights = stream.await.expect("stream");
    tap.wait_distinct(EventKind::Succeeded, published_lights + 1, WITHIN)
        .await;

    let heavy = interval(&tap, "heavy");
    let waited = heavy.0 - published;
    let overtook = tap
        .of(EventKind::Started)
        .iter()
        .filter(|e| e.id.starts_with("light-") && e.at > published && e.at < heavy.0)
        .count();
    let bound = RESERVE_MS + LIGHT_MS;
    println!(
        "heavy task started {waited} ms after it was published (bound: reserve {RESERVE_MS} + light run {LIGHT_MS} = {bound} ms); {overtook} light tasks started ahead of it; {published_lights} light tasks in all"
    );
    // Lighter tasks overtook it while it had waited less than the bound...
    assert!(
        overtook > 0,
        "no light task started while the heavy one waited"
    );
    // ...and it started within the bound (plus delivery and event latency
    // on a shared machine).
    assert!(
        waited <= bound + 400,
        "the heavy task waited {waited} ms, over the bound of {bound} ms"
    );
    for e in tap.of(EventKind::Started) {
        if e.id.starts_with("light-") {
            let light = interval(&tap, &e.id);
            assert!(
                !overlap(heavy, light),
                "{} {light:?} ran beside the cost-4 task {heavy:?}",
                e.id
            );
        }
    }
    assert!(tap.of(EventKind::Dead).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waiting_for_units_goes_back_to_its_queue_at_once_on_sigterm() {
    let env = TestEnv::new("cost-stop").await;
    let mut tap = EventTap::new(&env).await;
    // The cost-4 task holds every unit for a while; the cost-1 one behind
    // it waits for units in the worker.
    env.publish_many(
        &env.names.tasks_exchange(),
        vec![
            sleep_task("running", CAPACITY, 3_000),
            sleep_task("waiting", 1, 10),
        ],
    )
    .await;
    let mut worker = worker(&env);
    tap.wait_until(WITHIN, "the cost-4 task to start", |seen| {
        seen.iter()
            .any(|e| e.kind == "started" && e.id == "running")
    })
    .await;
    let queue = env.names.queue("default");
    env.wait_depth(
        &queue,
        WITHIN,
        "the waiting delivery to reach the worker",
        |d| d == 0,
    )
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &worker.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let stopped = now_ms();
    // Back in its queue at once, while the running task still runs.
    env.wait_depth(&queue, WITHIN, "the waiting task back in its queue", |d| {
        d == 1
    })
    .await;
    let back_after = now_ms() - stopped;
    tap.wait_until(WITHIN, "the running task to finish", |seen| {
        seen.iter()
            .any(|e| e.kind == "succeeded" && e.id == "running")
    })
    .await;
    let running = interval(&tap, "running");
    println!("the waiting task was back in its queue {back_after} ms after SIGTERM; the running one ended {} ms after it", running.1 - stopped);
    assert!(
        stopped + back_after < running.1,
        "the waiting task went back only after the running one ended"
    );
    assert!(
        tap.seen.iter().all(|e| e.id != "waiting"),
        "the waiting task ran or failed"
    );
    assert!(worker.terminate(WITHIN).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_tasks_cost_their_resource_needs() {
    let env = TestEnv::new("cost-seed").await;
    let mut tap = EventTap::new(&env).await;
    let client = kairos_shared::client::Enqueuer::open(&env.conn, env.names.clone())
        .await
        .expect("client");
    let tasks: Vec<_> = (1..=3)
        .map(|n| {
            kairos_example_seed::task(n)
                .expect("a seed task")
                .id(format!("seed-{n}"))
        })
        .collect();
    client.enqueue_many(&tasks).await.expect("enqueue");
    // Three units: task3 (cost 3, taken first for its priority 3) runs
    // alone, then task1 and task2 (1 + 2) together.
    let mut config = env.worker_config();
    config.capacity = Some(3);
    let worker = InProcess::worker(kairos_example_seed::worker(config));
    tap.wait_distinct(EventKind::Succeeded, 3, WITHIN).await;
    let [one, two, three] = ["seed-1", "seed-2", "seed-3"].map(|id| interval(&tap, id));
    println!("seed runs: task1 {one:?}, task2 {two:?}, task3 {three:?}");
    assert!(!overlap(three, one) && !overlap(three, two));
    assert!(overlap(one, two), "task1 and task2 fit together in 3 units");
    worker.stop().await;
}

#[test]
fn a_bad_capacity_fails_at_start_naming_the_setting() {
    for (name, value) in [
        ("KAIROS_CAPACITY", "0"),
        ("KAIROS_CAPACITY", "many"),
        ("KAIROS_CAPACITY_RESERVE_MS", "-5"),
    ] {
        let out = Command::new(binary("kairos-worker"))
            .env(name, value)
            .env("KAIROS_NAMESPACE", "kt-cost-bad")
            .stdin(Stdio::null())
            .output()
            .expect("run kairos-worker");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}={value}: {err}");
        assert!(err.contains(name), "{name}={value}: {err}");
    }
}
