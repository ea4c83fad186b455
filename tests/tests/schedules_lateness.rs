//! Tick lateness with 1,000 schedules, on one scheduler process and on
//! three. Ignored by default (about 40 s; meaningful in release builds):
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo test --release -p kairos-tests --test schedules_lateness -- --ignored --nocapture --test-threads=1
//! ```
//!
//! Lateness is the worker's `started` event time minus the tick (`x-run-at`).
//! Two shapes: ticks spread evenly (every 5 s, start offsets 5 ms apart: 200
//! ticks/s) and aligned (every 5 s, all at once: bursts of 1,000).

use kairos_shared::events::EventKind;
use kairos_tests::*;
use kairos_worker::Worker;
use serde_json::json;
use std::time::Duration;

const SCHEDULES: usize = 1000;

async fn measure(schedulers: usize, aligned: bool) {
    let env = TestEnv::new(&format!("late{schedulers}")).await;
    let mut tap = EventTap::new(&env).await;
    let mut wc = env.worker_config();
    wc.concurrency = kairos_shared::config::Concurrency { min: 64, max: 256 };
    let worker = InProcess::worker(Worker::new(wc).with_builtins());
    let (mut procs, apis) = scheduler_processes(&env, schedulers).await;
    let api = apis[0].clone();
    api.call(move |a| {
        for i in 0..SCHEDULES {
            let start = if aligned { 0 } else { i as i64 * 5 };
            let spec =
                json!({"every_ms": 5000, "start_at": start, "task": {"name": "kairos.noop"}});
            let r = a.put(&format!("s{i}"), &spec)?;
            if !r.ok() {
                return Err(format!("{:?}", r.body));
            }
        }
        a.list()
    })
    .await;
    // Skip the first round (schedules were still being created), measure two.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let from = now_ms();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let to = now_ms();
    let in_window =
        |e: &SeenEvent| e.kind == "started" && e.due_at.is_some_and(|d| d >= from && d < to);
    let expected = SCHEDULES * 2;
    tap.wait_until(
        Duration::from_secs(30),
        "every tick of the window to start",
        |s| s.iter().filter(|e| in_window(e)).count() >= expected,
    )
    .await;
    let mut late: Vec<i64> = tap
        .of(EventKind::Started)
        .iter()
        .filter_map(|e| {
            let due = e.due_at?;
            (due >= from && due < to).then_some(e.at - due)
        })
        .collect();
    late.sort_unstable();
    println!(
        "{SCHEDULES} schedules, {schedulers} scheduler(s), {}: {} ticks (expected {expected}), lateness p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        if aligned { "aligned" } else { "spread" },
        late.len(),
        percentile(&late, 50.0),
        percentile(&late, 90.0),
        percentile(&late, 99.0),
        late.last().copied().unwrap_or_default()
    );
    for p in &mut procs {
        p.terminate(Duration::from_secs(20));
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement: run with --ignored --nocapture, in release"]
async fn lateness_one_scheduler() {
    measure(1, false).await;
    measure(1, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement: run with --ignored --nocapture, in release"]
async fn lateness_three_schedulers() {
    measure(3, false).await;
    measure(3, true).await;
}
