//! Issue 18, quorum mode: a queue with priorities is three quorum queues,
//! one per band (`NS.q.QUEUE`, `.p4`, `.p7`), and the worker starts the
//! highest band first without starving the lower ones
//! (`KAIROS_BAND_STARVATION_LIMIT`, worker/src/bands.rs). The backlogs are
//! published straight to the band queues with the routing key
//! `Names::route` gives, as a raw client would.

use kairos_shared::events::EventKind;
use kairos_shared::order::QueueOrders;
use kairos_shared::queue_mode::{Band, QueueMode};
use kairos_tests::*;
use kairos_worker::Worker;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// Long enough for a backlog on a shared, busy machine.
const WITHIN: Duration = Duration::from_secs(60);
/// Tasks per band in a backlog.
const PER_BAND: usize = 30;
/// `KAIROS_BAND_STARVATION_LIMIT` of these tests (the default).
const LIMIT: usize = 8;
/// The queue of the order test.
const QUEUE: &str = "ordered";
/// One priority in each band: low, middle, high.
const PRIORITIES: [u8; 3] = [0, 5, 9];

/// A task id: its band's priority and its number in the band.
fn id(priority: u8, i: usize) -> String {
    format!("p{priority}-{i:02}")
}

fn band_of(id: &str) -> Band {
    let priority = id[1..2].parse().expect("a test id");
    Band::of_priority(priority)
}

fn number_of(id: &str) -> usize {
    id[3..].parse().expect("a test id")
}

/// Publishes `PER_BAND` tasks of `name` per band to `queue`, the low band
/// first and the high band last (the worst arrival order for the high
/// band), each with the routing key of its band, and waits until every
/// band queue holds its share.
async fn publish_backlog(env: &TestEnv, queue: &str, name: &str, body: &[u8]) {
    for p in PRIORITIES {
        let key = env
            .names
            .route(queue, p)
            .expect("routing key")
            .as_str()
            .to_string();
        let tasks = (0..PER_BAND)
            .map(|i| {
                let props = task_props(name, &id(p, i)).with_priority(p);
                (key.clone(), props, body.to_vec())
            })
            .collect();
        env.publish_many(&env.names.tasks_exchange(), tasks).await;
    }
    for band in env.names.bands(queue) {
        let q = env.names.band_queue(queue, *band).expect("band queue");
        env.wait_depth(
            q.as_str(),
            WITHIN,
            "the backlog did not reach its band",
            |d| d as usize == PER_BAND,
        )
        .await;
    }
}

/// The deliveries `queue`'s bands hold waiting to start, in a Prometheus
/// text rendering (`kairos_worker_band_waiting{queue,band}`).
fn band_waiting(rendered: &str, queue: &str) -> usize {
    let label = format!("queue=\"{queue}\"");
    rendered
        .lines()
        .filter(|l| l.starts_with("kairos_worker_band_waiting{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

/// Per lower band, the most starts of higher bands in a row before its
/// own next start, while it still had tasks to start.
fn longest_pass(order: &[String], band: Band) -> usize {
    let last = order.iter().rposition(|id| band_of(id) == band);
    let (mut worst, mut passed) = (0, 0);
    for id in &order[..last.map_or(0, |l| l + 1)] {
        let b = band_of(id);
        if b == band {
            passed = 0;
        } else if b > band {
            passed += 1;
            worst = worst.max(passed);
        }
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_high_band_starts_first_and_the_lower_bands_are_not_starved() {
    let env = TestEnv::with_mode("bands", QueueMode::Quorum).await;
    // A queue of its own: the waiting gauge below is labelled by queue,
    // and the tests of this file share one process.
    env.declare_queue(QUEUE).await;
    assert_eq!(env.names.bands(QUEUE).len(), 3, "three band queues");
    publish_backlog(&env, QUEUE, "test.band", b"").await;
    // The worker's metrics, read in this process.
    let metrics = kairos_shared::metrics::recorder().expect("the metrics recorder");

    let (ran, mut order) = mpsc::unbounded_channel::<String>();
    let mut wc = env.worker_config();
    wc.queues = vec![QUEUE.to_string()];
    wc.concurrency = "1".parse().expect("concurrency");
    // Each band consumer may hold its whole band: the order is then the
    // worker's choice alone, not the broker's.
    wc.prefetch = Some(100);
    wc.band_starvation_limit = LIMIT as u32;
    // The first task to start (whichever delivery came first) holds the
    // only slot until every other delivery waits in the worker, so the
    // rest of the order is the rule's alone, not the arrival's.
    let release = Arc::new(Notify::new());
    let first = Arc::new(AtomicBool::new(true));
    let held = release.clone();
    let worker = InProcess::worker(Worker::new(wc).handler(
        "test.band",
        move |ctx: kairos_worker::TaskContext, _body: Vec<u8>| {
            let (ran, held, first) = (ran.clone(), held.clone(), first.clone());
            async move {
                let _ = ran.send(ctx.id.clone());
                if first.swap(false, Ordering::SeqCst) {
                    held.notified().await;
                }
                Ok(())
            }
        },
    ));
    let mut ids = Vec::with_capacity(3 * PER_BAND);
    match tokio::time::timeout(WITHIN, order.recv()).await {
        Ok(Some(id)) => ids.push(id),
        _ => panic!("no task ran within {WITHIN:?}"),
    }
    // No event tells when the worker holds them all: its gauge does.
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let waiting = band_waiting(&metrics.render(), QUEUE);
        if waiting == 3 * PER_BAND - 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {waiting} deliveries waiting in the worker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    release.notify_one();
    while ids.len() < 3 * PER_BAND {
        match tokio::time::timeout(WITHIN, order.recv()).await {
            Ok(Some(id)) => ids.push(id),
            _ => panic!("only {ids:?} ran within {WITHIN:?}"),
        }
    }
    worker.stop().await;

    let positions = |band: Band| -> Vec<usize> {
        ids.iter()
            .enumerate()
            .filter(|(_, id)| band_of(id) == band)
            .map(|(i, _)| i)
            .collect()
    };
    let (high, middle, low) = (
        positions(Band::HIGH),
        positions(Band::MIDDLE),
        positions(Band::LOW),
    );
    let last_high = *high.last().expect("high tasks ran");
    // From the second start on, every delivery was in the worker.
    let rule = &ids[1..];
    println!("start order: {}", ids.join(" "));
    println!(
        "high band at positions {high:?} (last {last_high}); middle at {middle:?}; low at {low:?}"
    );
    println!(
        "in the first 40 starts: {} high, {} middle, {} low; longest run of higher starts: middle {}, low {}",
        high.iter().filter(|p| **p < 40).count(),
        middle.iter().filter(|p| **p < 40).count(),
        low.iter().filter(|p| **p < 40).count(),
        longest_pass(rule, Band::MIDDLE),
        longest_pass(rule, Band::LOW),
    );
    // Every task ran once.
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3 * PER_BAND, "a task ran twice: {ids:?}");
    // The high band comes first but for the lower bands' turns: among
    // the first 30 high starts, a middle one per 8 high (4) and a low one
    // per 8 high or middle (5) at most, and the first start may be any
    // band's: the last high start is at position 38 at the latest.
    assert!(
        last_high <= 38,
        "the last high start at {last_high}: {ids:?}"
    );
    // No lower band sees more than N higher starts in a row while it
    // waits...
    for band in [Band::MIDDLE, Band::LOW] {
        let worst = longest_pass(rule, band);
        assert!(
            worst <= LIMIT,
            "{band:?} waited through {worst} higher starts: {ids:?}"
        );
    }
    // ...so while they wait, every N + 1 starts include a lower band's,
    // and the low band's every N + 1 starts. The middle band's every
    // N + 3: besides its N higher starts, the low band's start due at the
    // same time goes first, and the one its own start made due may come
    // right after it.
    let last_lower = middle.last().max(low.last()).copied().unwrap_or(0);
    let last_both = (*middle.last().unwrap()).min(*low.last().unwrap());
    for window in ids[1..=last_both].windows(LIMIT + 1) {
        assert!(
            window.iter().any(|id| band_of(id) != Band::HIGH),
            "no lower band in {window:?}"
        );
    }
    for window in ids[1..=*low.last().unwrap()].windows(LIMIT + 1) {
        assert!(
            window.iter().any(|id| band_of(id) == Band::LOW),
            "no low start in {window:?}"
        );
    }
    for window in ids[1..=*middle.last().unwrap()].windows(LIMIT + 3) {
        assert!(
            window.iter().any(|id| band_of(id) == Band::MIDDLE),
            "no middle start in {window:?}"
        );
    }
    assert!(last_lower >= last_high, "the lower bands finish last");
    // Within a band, arrival order.
    for band in [Band::HIGH, Band::MIDDLE, Band::LOW] {
        let numbers: Vec<usize> = ids
            .iter()
            .filter(|id| band_of(id) == band)
            .map(|id| number_of(id))
            .collect();
        assert_eq!(numbers, (0..PER_BAND).collect::<Vec<_>>(), "{band:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_queue_in_quorum_mode_is_one_queue_in_arrival_order() {
    let mut env = TestEnv::with_mode("bands-fifo", QueueMode::Quorum).await;
    let orders: QueueOrders = "jobs:fifo".parse().expect("orders");
    env.names = env.names.clone().with_orders(orders.clone());
    env.declare_queue("jobs").await;
    assert_eq!(env.names.bands("jobs").len(), 1, "one queue");
    // No band queue was declared beside it (a passive declare of a missing
    // queue closes its channel: a channel of its own).
    let probe = env.conn.create_channel().await.expect("channel");
    let p7 = format!("{}.p7", env.names.queue("jobs"));
    let missing = probe
        .queue_declare(
            p7.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(missing.is_err(), "{p7} exists");

    // Mixed priorities, all routed to the one queue, run in arrival order.
    let priorities = [0u8, 9, 5, 9, 0, 7, 3, 4, 9, 1];
    let tasks = priorities
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let key = env
                .names
                .route("jobs", *p)
                .expect("key")
                .as_str()
                .to_string();
            assert_eq!(key, "jobs", "a fifo queue has no band keys");
            let props = task_props("test.fifo", &format!("t{i}")).with_priority(*p);
            (key, props, Vec::new())
        })
        .collect();
    env.publish_many(&env.names.tasks_exchange(), tasks).await;
    let queue = env.names.queue("jobs");
    env.wait_depth(&queue, WITHIN, "the backlog did not reach the queue", |d| {
        d as usize == priorities.len()
    })
    .await;

    let (ran, mut order) = mpsc::unbounded_channel::<String>();
    let mut wc = env.worker_config();
    wc.common.queue_order = orders;
    wc.queues = vec!["jobs".into()];
    wc.concurrency = "1".parse().expect("concurrency");
    let worker = InProcess::worker(Worker::new(wc).handler(
        "test.fifo",
        move |ctx: kairos_worker::TaskContext, _body: Vec<u8>| {
            let ran = ran.clone();
            async move {
                let _ = ran.send(ctx.id.clone());
                Ok(())
            }
        },
    ));
    let mut ids = Vec::new();
    while ids.len() < priorities.len() {
        match tokio::time::timeout(WITHIN, order.recv()).await {
            Ok(Some(id)) => ids.push(id),
            _ => panic!("only {ids:?} ran within {WITHIN:?}"),
        }
    }
    worker.stop().await;
    let want: Vec<String> = (0..priorities.len()).map(|i| format!("t{i}")).collect();
    assert_eq!(ids, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_back_every_waiting_delivery_of_every_band() {
    let env = TestEnv::with_mode("bands-stop", QueueMode::Quorum).await;
    let mut tap = EventTap::new(&env).await;
    publish_backlog(&env, "default", "kairos.sleep", br#"{"ms": 100}"#).await;
    let mut penv = env.process_env();
    penv.push(("KAIROS_CONCURRENCY".into(), "1".into()));
    penv.push(("KAIROS_PREFETCH".into(), "100".into()));
    let mut worker = Proc::spawn("kairos-worker", &penv);
    // The worker holds the whole backlog of every band, and runs a task.
    tap.wait_until(WITHIN, "a task to start", |seen| {
        seen.iter().any(|e| e.kind == "started")
    })
    .await;
    for band in env.names.bands("default") {
        let q = env.names.band_queue("default", *band).expect("band queue");
        env.wait_depth(
            q.as_str(),
            WITHIN,
            "the band's backlog did not reach the worker",
            |d| d == 0,
        )
        .await;
    }
    let status = tokio::task::block_in_place(|| worker.terminate(WITHIN));
    assert!(status.success(), "the worker exits cleanly: {status:?}");

    // Every task that started finished within the grace; every other one
    // is back in its band's queue: nothing lost. The depths come from the
    // broker and the starts from the event stream, which may lag: look
    // again until they add up (or the time is over).
    let bands = env.names.bands("default");
    let deadline = tokio::time::Instant::now() + WITHIN;
    let (started, back) = loop {
        let mut depths = Vec::new();
        for band in bands {
            let q = env.names.band_queue("default", *band).expect("band queue");
            depths.push((*band, env.queue_depth(q.as_str()).await as usize));
        }
        let adds_up = |seen: &[SeenEvent]| {
            let ids = |kind: &str| {
                let mut ids: Vec<&str> = seen
                    .iter()
                    .filter(|e| e.kind == kind)
                    .map(|e| e.id.as_str())
                    .collect();
                ids.sort();
                ids.dedup();
                ids
            };
            let started = ids("started");
            started == ids("succeeded")
                && depths.iter().all(|(band, depth)| {
                    depth + started.iter().filter(|id| band_of(id) == *band).count() == PER_BAND
                })
        };
        if tap
            .try_wait_until(Duration::from_millis(200), adds_up)
            .await
        {
            let mut started: HashMap<Band, usize> = HashMap::new();
            for e in tap.of(EventKind::Started) {
                *started.entry(band_of(&e.id)).or_default() += 1;
            }
            break (started, depths.iter().map(|(_, d)| d).sum::<usize>());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the band queues hold {depths:?} and {} tasks started: deliveries lost",
            distinct_ids(&tap.seen, "started")
        );
    };
    println!(
        "after SIGTERM: {} ran ({:?}), {back} back in their band queues",
        3 * PER_BAND - back,
        started
            .iter()
            .map(|(b, n)| format!("{} {n}", b.label()))
            .collect::<Vec<_>>()
    );
    assert!(back > 0, "deliveries were waiting at SIGTERM");
    assert!(tap.of(EventKind::Failed).is_empty());
    assert!(tap.of(EventKind::Dead).is_empty());
}

/// Polls until every band queue of `default` has `n` consumers (the broker
/// tells no event for it).
async fn wait_band_consumers(env: &TestEnv, n: u32) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    for band in env.names.bands("default") {
        let q = env.names.band_queue("default", *band).expect("band queue");
        loop {
            let c = env.consumer_count(q.as_str()).await;
            if c == n {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{q} has {c} consumers, not {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_a_queue_stops_every_band_and_resume_drains_them() {
    let env = TestEnv::with_mode("bands-pause", QueueMode::Quorum).await;
    let mut tap = EventTap::new(&env).await;
    let (_schedulers, apis) = scheduler_processes(&env, 1).await;
    let api = &apis[0];
    let _worker = Proc::spawn("kairos-worker", &env.process_env());
    wait_band_consumers(&env, 1).await;

    let reply = api
        .call(|a| a.send("POST", "/v1/queues/default/pause", None))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    wait_band_consumers(&env, 0).await;
    // A task per band waits in its band's queue while paused.
    let tasks = PRIORITIES
        .iter()
        .map(|p| {
            let key = env.names.route("default", *p).expect("key");
            let props = task_props("kairos.noop", &id(*p, 0)).with_priority(*p);
            (key.as_str().to_string(), props, Vec::new())
        })
        .collect();
    env.publish_many(&env.names.tasks_exchange(), tasks).await;
    for band in env.names.bands("default") {
        let q = env.names.band_queue("default", *band).expect("band queue");
        env.wait_depth(q.as_str(), WITHIN, "the task in its band", |d| d == 1)
            .await;
        assert_eq!(env.consumer_count(q.as_str()).await, 0, "{q} paused");
    }

    let reply = api
        .call(|a| a.send("POST", "/v1/queues/default/resume", None))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    tap.wait_until(WITHIN, "a task of every band to run", |seen| {
        PRIORITIES.iter().all(|p| {
            let want = id(*p, 0);
            seen.iter().any(|e| e.kind == "succeeded" && e.id == want)
        })
    })
    .await;
    wait_band_consumers(&env, 1).await;
}
