//! Horizontal workers (issue 17): several `kairos-worker` processes on one
//! queue share it fairly, a worker started mid-run gets work at once, and
//! each worker's prefetch follows its pool of slots on the broker.

use kairos_shared::amqp::now_ms;
use kairos_shared::events::EventKind;
use kairos_tests::*;
use std::collections::HashMap;
use std::time::Duration;

/// How long a worker process may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// Between two polls of `/readyz` (the probe is the signal).
const POLL: Duration = Duration::from_millis(20);
/// How long a run of a few thousand short tasks may take on a loaded
/// 2-core machine.
const RUN_WITHIN: Duration = Duration::from_secs(180);

/// A `kairos-worker` process named `id` with its probes on a free port.
fn worker(env: &TestEnv, id: &str, concurrency: &str) -> (Proc, u16) {
    Proc::worker_with_probes(env, id, &[("KAIROS_CONCURRENCY", concurrency)])
}

/// Polls `/readyz` until it answers 200; returns when it did (Unix ms).
async fn ready(port: u16) -> i64 {
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    loop {
        let status = tokio::task::spawn_blocking(move || http_get(port, "/readyz"))
            .await
            .expect("probe task")
            .map(|r| r.0);
        if status == Some(200) {
            return now_ms();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker on port {port} never became ready: {status:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// `n` `kairos.sleep` tasks of `ms` each, ids `PREFIX-I`.
fn sleeps(prefix: &str, n: usize, ms: u64) -> Vec<(String, lapin::BasicProperties, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let p = task_props("kairos.sleep", &format!("{prefix}-{i}"));
            let body = format!(r#"{{"ms": {ms}}}"#).into_bytes();
            ("default".to_string(), p, body)
        })
        .collect()
}

/// The worker named by each distinct task's first event of `kind` whose id
/// starts with `prefix`, counted per worker.
fn per_worker(tap: &EventTap, kind: EventKind, prefix: &str) -> HashMap<String, usize> {
    let mut first: HashMap<&str, &str> = HashMap::new();
    for e in tap.of(kind) {
        if e.id.starts_with(prefix) {
            let w = e.raw["worker"].as_str().unwrap_or("(none)");
            first.entry(e.id.as_str()).or_insert(w);
        }
    }
    let mut counts = HashMap::new();
    for w in first.values() {
        *counts.entry((*w).to_string()).or_default() += 1;
    }
    counts
}

fn done(tap: &EventTap, prefix: &str) -> usize {
    per_worker(tap, EventKind::Succeeded, prefix).values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_a_queue_and_a_fourth_gets_work_at_once() {
    const TASKS: usize = 3000;
    let env = TestEnv::new("fleet").await;
    let mut tap = EventTap::new(&env).await;
    let mut procs = Vec::new();
    let mut ports = Vec::new();
    for id in ["w1", "w2", "w3"] {
        let (p, port) = worker(&env, id, "2..8");
        procs.push(p);
        ports.push(port);
    }
    for port in &ports {
        ready(*port).await;
    }

    // Phase 1: three workers, 3,000 tasks of 20 ms (a few seconds: at most
    // 8 at once per worker, fewer on a loaded machine).
    let started = std::time::Instant::now();
    env.publish_many(&env.names.tasks_exchange(), sleeps("a", TASKS, 20))
        .await;
    tap.wait_distinct(EventKind::Succeeded, TASKS, RUN_WITHIN)
        .await;
    let shares = per_worker(&tap, EventKind::Succeeded, "a-");
    println!(
        "3 workers, {TASKS} tasks in {:?}: {shares:?}",
        started.elapsed()
    );
    for id in ["w1", "w2", "w3"] {
        let n = shares.get(id).copied().unwrap_or(0);
        let pct = n * 100 / TASKS;
        assert!(
            (20..=46).contains(&pct) && n * 100 >= TASKS * 20,
            "{id} ran {n} of {TASKS} ({pct} %): {shares:?}"
        );
    }

    // Phase 2: a backlog of 50 ms tasks (several seconds for three
    // workers); a fourth worker joins once it is under way.
    const MORE: usize = 2400;
    env.publish_many(&env.names.tasks_exchange(), sleeps("b", MORE, 50))
        .await;
    tap.wait_until(RUN_WITHIN, "the second backlog to be under way", |s| {
        s.iter()
            .filter(|e| e.kind == "succeeded" && e.id.starts_with("b-"))
            .count()
            >= 200
    })
    .await;
    let spawned_ms = now_ms();
    let (p4, port4) = worker(&env, "w4", "2..8");
    procs.push(p4);
    let ready_ms = ready(port4).await;
    tap.wait_until(
        Duration::from_secs(30),
        "the fourth worker to start a task",
        |s| {
            s.iter()
                .any(|e| e.kind == "started" && e.raw["worker"] == "w4")
        },
    )
    .await;
    let first = tap
        .of(EventKind::Started)
        .into_iter()
        .filter(|e| e.raw["worker"] == "w4")
        .map(|e| e.at)
        .min()
        .expect("a started event of w4");
    let left_when_ready = MORE - done(&tap, "b-");
    println!(
        "w4: ready {} ms after spawn, first task {} ms after ready ({left_when_ready} tasks left then)",
        ready_ms - spawned_ms,
        first - ready_ms
    );
    assert!(
        first - ready_ms <= 2000,
        "w4 got its first task {} ms after it was ready",
        first - ready_ms
    );
    tap.wait_until(RUN_WITHIN, "the second backlog to succeed", |s| {
        s.iter()
            .filter(|e| e.kind == "succeeded" && e.id.starts_with("b-"))
            .count()
            >= MORE
    })
    .await;
    println!(
        "second backlog: {:?}",
        per_worker(&tap, EventKind::Succeeded, "b-")
    );
    assert!(
        tap.seen
            .iter()
            .all(|e| e.kind == "published" || e.raw["worker"].is_string()),
        "every worker event names its worker"
    );
    assert_eq!(tap.of(EventKind::Dead).len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefetch_follows_the_pool_on_the_broker() {
    const TASKS: usize = 12;
    let env = TestEnv::new("fleetpf").await;
    let mut tap = EventTap::new(&env).await;
    // The pool starts at 1 slot (prefetch 3) and may grow to 8.
    let (_w, port) = worker(&env, "pf", "1..8");
    ready(port).await;
    env.publish_many(&env.names.tasks_exchange(), sleeps("p", TASKS, 4000))
        .await;

    // Eight tasks run at once: the broker sent more than the first
    // prefetch of 3, so the changes reached it while the consumer ran.
    tap.wait_distinct(EventKind::Started, 8, Duration::from_secs(30))
        .await;
    let starts: Vec<i64> = tap.of(EventKind::Started).iter().map(|e| e.at).collect();
    let spread = starts.iter().max().unwrap() - starts.iter().min().unwrap();
    assert!(
        tap.of(EventKind::Succeeded).is_empty() && spread < 4000,
        "8 tasks of 4 s did not run together (started over {spread} ms)"
    );
    let held = TASKS as u32 - env.queue_depth(&env.names.queue("default")).await;
    println!("8 running after {spread} ms; the worker holds {held} of {TASKS}");
    assert!(held >= 8, "{held}");

    // Idle again: the pool shrinks to 1 and the prefetch follows.
    tap.wait_distinct(EventKind::Succeeded, TASKS, Duration::from_secs(60))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
            .await
            .expect("probe task")
            .map(|r| r.1)
            .unwrap_or_default();
        let prefetch = metrics
            .lines()
            .find(|l| l.starts_with("kairos_worker_prefetch"))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string);
        if prefetch.as_deref() == Some("3") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the prefetch did not shrink back to 3: {prefetch:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends SIGTERM to `p` and returns how long it took to exit.
fn sigterm_to_exit(p: &mut Proc) -> Duration {
    let at = std::time::Instant::now();
    let status = p.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status:?}");
    at.elapsed()
}

/// Scale-in: SIGTERM finishes running tasks within the grace, returns
/// those that outlast it, and the process exits promptly either way. The
/// figures are for sizing Kubernetes' `terminationGracePeriodSeconds`
/// (docs/OPERATIONS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_or_returns_running_tasks_promptly() {
    let env = TestEnv::new("fleetterm").await;
    let mut tap = EventTap::new(&env).await;

    // Idle.
    let (mut w, port) = worker(&env, "idle", "2..8");
    ready(port).await;
    let idle = sigterm_to_exit(&mut w);

    // Busy with a 2 s task: it finishes, its `succeeded` goes out, then exit.
    let (mut w, port) = worker(&env, "busy", "2..8");
    ready(port).await;
    env.publish_many(&env.names.tasks_exchange(), sleeps("t", 1, 2000))
        .await;
    tap.wait_distinct(EventKind::Started, 1, Duration::from_secs(30))
        .await;
    let started = tap.first(EventKind::Started, "t-0").at;
    let busy = sigterm_to_exit(&mut w);
    let left = 2000 - (now_ms() - busy.as_millis() as i64 - started);
    tap.wait_distinct(EventKind::Succeeded, 1, Duration::from_secs(5))
        .await;

    // A task longer than the grace: stopped at the grace, back in its queue.
    let mut penv = env.process_env();
    let port = free_port();
    penv.push((
        "KAIROS_WORKER_HTTP_ADDR".into(),
        format!("127.0.0.1:{port}"),
    ));
    penv.push(("KAIROS_SHUTDOWN_GRACE_MS".into(), "1000".into()));
    let mut w = Proc::spawn("kairos-worker", &penv);
    ready(port).await;
    env.publish_many(&env.names.tasks_exchange(), sleeps("long", 1, 60_000))
        .await;
    tap.wait_until(Duration::from_secs(30), "the long task to start", |s| {
        s.iter().any(|e| e.kind == "started" && e.id == "long-0")
    })
    .await;
    let over = sigterm_to_exit(&mut w);
    assert_eq!(env.queue_depth(&env.names.queue("default")).await, 1);

    println!(
        "SIGTERM to exit: idle {idle:?}; busy {busy:?} with {left} ms of its task left; \
         past a 1 s grace {over:?}"
    );
    assert!(idle < Duration::from_secs(5), "{idle:?}");
    assert!(busy < Duration::from_secs(7), "{busy:?}");
    assert!(over < Duration::from_secs(7), "{over:?}");
}

/// Deliveries `consumer` receives within `quiet` (unacked: they hold their
/// prefetch places).
async fn received(consumer: &mut lapin::Consumer, quiet: Duration) -> usize {
    use futures_util::StreamExt;
    let mut n = 0;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(quiet, consumer.next()).await {
        n += 1;
    }
    n
}

/// Why `crate::prefetch` in the worker consumes again on a change: on this
/// RabbitMQ, a new per-consumer `basic.qos` does not reach a running
/// consumer, while a new consumer gets it. (The per-channel `global` form
/// does change live, but quorum queues refuse it and RabbitMQ 4 deprecates
/// it.) A quiet window is the only signal that nothing more comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_applies_a_new_prefetch_to_new_consumers_only() {
    use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
    const QUIET: Duration = Duration::from_millis(500);
    let env = TestEnv::new("fleetqos").await;
    let messages = (0..20)
        .map(|i| {
            let p = task_props("kairos.noop", &format!("q-{i}"));
            ("default".to_string(), p, b"{}".to_vec())
        })
        .collect();
    env.publish_many(&env.names.tasks_exchange(), messages)
        .await;
    let queue = env.names.queue_name("default").expect("queue name");
    let ch = env.conn.create_channel().await.expect("channel");
    let consume = |ch: lapin::Channel| {
        let queue = queue.clone();
        async move {
            ch.basic_consume(
                queue,
                "".into(),
                BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("consume")
        }
    };

    ch.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let mut first = consume(ch.clone()).await;
    assert_eq!(received(&mut first, QUIET).await, 2);
    ch.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    assert_eq!(
        received(&mut first, QUIET).await,
        0,
        "a running consumer keeps the prefetch it started with"
    );
    ch.basic_cancel(first.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    let mut second = consume(ch.clone()).await;
    assert_eq!(
        received(&mut second, QUIET).await,
        5,
        "a new consumer gets the new prefetch (the first one's 2 stay unacked beside it)"
    );

    let global = env.conn.create_channel().await.expect("channel");
    let live = BasicQosOptions { global: true };
    global.basic_qos(2, live).await.unwrap();
    let mut third = consume(global.clone()).await;
    assert_eq!(received(&mut third, QUIET).await, 2);
    global.basic_qos(5, live).await.unwrap();
    assert_eq!(
        received(&mut third, QUIET).await,
        3,
        "the per-channel limit changes live"
    );
    let _ = ch.close(200, "done".into()).await;
    let _ = global.close(200, "done".into()).await;
}

/// A measurement, not a check (`--ignored`): one worker runs 5,000
/// `kairos.noop` tasks with the prefetch following the pool, then with
/// the fixed prefetch every worker had before (`KAIROS_PREFETCH=64`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_of_short_tasks_following_and_fixed() {
    const TASKS: usize = 5000;
    for (label, prefetch) in [("follows the pool", None), ("fixed 64", Some("64"))] {
        let env = TestEnv::new("fleettp").await;
        let mut tap = EventTap::new(&env).await;
        let port = free_port();
        let mut penv = env.process_env();
        penv.push((
            "KAIROS_WORKER_HTTP_ADDR".into(),
            format!("127.0.0.1:{port}"),
        ));
        if let Some(p) = prefetch {
            penv.push(("KAIROS_PREFETCH".into(), p.into()));
        }
        let _w = Proc::spawn("kairos-worker", &penv);
        ready(port).await;
        let messages = (0..TASKS)
            .map(|i| {
                let p = task_props("kairos.noop", &format!("n-{i}"));
                ("default".to_string(), p, b"{}".to_vec())
            })
            .collect();
        env.publish_many(&env.names.tasks_exchange(), messages)
            .await;
        let at = std::time::Instant::now();
        tap.wait_distinct(EventKind::Succeeded, TASKS, RUN_WITHIN)
            .await;
        let took = at.elapsed();
        println!(
            "{label}: {TASKS} noop tasks in {took:?} ({:.0}/s)",
            TASKS as f64 / took.as_secs_f64()
        );
    }
}
