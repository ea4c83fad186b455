//! Soak (feature `soak`; scripts/test.sh runs it for 2 minutes): tasks at a
//! steady rate — immediate, delayed, and failing ones that are retried and
//! dead-lettered — while a worker or a scheduler is killed (kill -9) every
//! 30 s and Redis restarts once. Nothing is lost: every task either ran
//! (the record worker writes each run to a file before it acks) or is in
//! `NS.dead`; and the memory of the processes that stay up and of Redis
//! stays flat.
//!
//! `KAIROS_SOAK_SECS` sets the length of the load (default 120).
#![cfg(feature = "soak")]

use kairos_tests::*;
use lapin::types::AMQPValue;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Messages per tick of the load, and ticks per second.
const PER_TICK: usize = 5;
const TICK: Duration = Duration::from_millis(100);
/// Every how long one of the churned processes is killed.
const KILL_EVERY: Duration = Duration::from_secs(30);

/// What a task of the soak is expected to end as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum End {
    Ran,
    Dead,
}

/// The n-th message of the load and how it must end.
fn message(env: &TestEnv, n: usize) -> (String, lapin::BasicProperties, End) {
    let id = format!("s-{n}");
    let delay = |ms: i64| vec![("x-delay-ms", AMQPValue::LongLongInt(ms))];
    let (exchange, props, end) = match n % 10 {
        0..=4 => (
            env.names.tasks_exchange(),
            task_props("record", &id),
            End::Ran,
        ),
        5..=7 => (
            env.names.delay(),
            with_headers(task_props("record", &id), &delay((n % 3_000) as i64)),
            End::Ran,
        ),
        8 => (
            env.names.tasks_exchange(),
            with_headers(
                task_props("kairos.fail", &id),
                &[("x-max-retries", AMQPValue::LongLongInt(1))],
            ),
            End::Dead,
        ),
        _ => (
            env.names.delay(),
            with_headers(
                task_props("kairos.fail", &id),
                &[
                    ("x-max-retries", AMQPValue::LongLongInt(0)),
                    ("x-delay-ms", AMQPValue::LongLongInt(500)),
                ],
            ),
            End::Dead,
        ),
    };
    (exchange, props.with_priority((n % 10) as u8), end)
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

async fn redis_memory(url: &str) -> u64 {
    let Ok(client) = redis::Client::open(url) else {
        return 0;
    };
    let Ok(mut con) = client.get_multiplexed_async_connection().await else {
        return 0;
    };
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut con)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn runs(path: &PathBuf) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        *out.entry(line.to_string()).or_default() += 1;
    }
    out
}

/// Memory at the middle of the load against the end: flat means the end is
/// within half again of the middle, plus a small allowance for buffers.
fn assert_flat(what: &str, mid: u64, end: u64, allowance: u64) {
    eprintln!("soak: {what} at mid-load {mid} B, at the end {end} B");
    assert!(
        end <= mid + mid / 2 + allowance,
        "{what} grew from {mid} B to {end} B under a steady load"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_through_kills_and_a_redis_restart_loses_nothing() {
    let secs: u64 = std::env::var("KAIROS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let env = TestEnv::new("soak").await;
    let mut redis = OwnRedis::start();
    let record = std::env::temp_dir().join(format!("{}-runs.txt", env.ns));
    let mut penv = env.process_env();
    penv.push(("KAIROS_REDIS_URL".into(), redis.url()));
    penv.push(("KAIROS_RECORD_FILE".into(), record.display().to_string()));
    penv.push(("KAIROS_EVENTS".into(), "false".into()));
    penv.push(("RUST_LOG".into(), "error".into()));
    // One scheduler and one worker stay up (their memory is watched); the
    // other two are killed in turn.
    let stable_scheduler = Proc::spawn("kairos-scheduler", &penv);
    let stable_worker = Proc::spawn("kairos-record-worker", &penv);
    let mut churn = [
        Proc::spawn("kairos-scheduler", &penv),
        Proc::spawn("kairos-record-worker", &penv),
    ];
    let churn_bins = ["kairos-scheduler", "kairos-record-worker"];

    let start = Instant::now();
    let load_for = Duration::from_secs(secs);
    let mut next_kill = start + KILL_EVERY;
    let mut kills = 0usize;
    let mut redis_restarted = false;
    let mut expected: Vec<End> = Vec::new();
    let (mut mid_sched, mut mid_worker, mut mid_redis) = (0, 0, 0);
    let mut ticker = tokio::time::interval(TICK);
    while start.elapsed() < load_for {
        ticker.tick().await;
        let batch: Vec<_> = (0..PER_TICK)
            .map(|_| {
                let (exchange, props, end) = message(&env, expected.len());
                expected.push(end);
                (exchange, props)
            })
            .collect();
        for (exchange, props) in batch {
            let key = "default";
            env.publish(&exchange, key, props, b"{}").await;
        }
        let now = Instant::now();
        if now >= next_kill {
            let which = kills % 2;
            churn[which].kill9();
            churn[which] = Proc::spawn(churn_bins[which], &penv);
            kills += 1;
            next_kill += KILL_EVERY;
        }
        if !redis_restarted && now - start >= load_for * 3 / 8 {
            redis.kill9();
            redis.restart();
            redis_restarted = true;
        }
        if mid_sched == 0 && now - start >= load_for / 2 {
            mid_sched = rss(stable_scheduler.child.id());
            mid_worker = rss(stable_worker.child.id());
            mid_redis = redis_memory(&redis.url()).await;
        }
    }
    let end_sched = rss(stable_scheduler.child.id());
    let end_worker = rss(stable_worker.child.id());
    let end_redis = redis_memory(&redis.url()).await;

    // Everything ends: runs in the record file, failures in NS.dead.
    let want_ran: Vec<String> = (0..expected.len())
        .filter(|&n| expected[n] == End::Ran)
        .map(|n| format!("s-{n}"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ran = runs(&record);
        let missing = want_ran.iter().filter(|id| !ran.contains_key(*id)).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} tasks never ran (after {kills} kills and a Redis restart)",
            want_ran.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every failing task in NS.dead, with a reason (duplicates allowed).
    let want_dead_ids: Vec<String> = (0..expected.len())
        .filter(|&n| expected[n] == End::Dead)
        .map(|n| format!("s-{n}"))
        .collect();
    let mut dead_ids: HashMap<String, usize> = HashMap::new();
    let dead_by = Instant::now() + Duration::from_secs(120);
    while want_dead_ids.iter().any(|id| !dead_ids.contains_key(id)) {
        let left = dead_by.saturating_duration_since(Instant::now());
        for d in env.dead_letters(1, left).await {
            assert!(d.header("x-error").is_some(), "dead letter without x-error");
            *dead_ids.entry(d.id().unwrap_or_default()).or_default() += 1;
        }
    }
    let dead_total: usize = dead_ids.values().sum();
    let ran = runs(&record);
    let duplicates: usize = ran.values().map(|n| n - 1).sum();
    eprintln!(
        "soak: {} tasks over {secs} s, {kills} kills, Redis restarted once; \
         {} ran ({duplicates} ran twice or more), {} dead letters",
        expected.len(),
        want_ran.len(),
        dead_total
    );
    // At least once: a kill between a run and its ack repeats that run, so
    // the duplicates stay within what the killed workers held.
    assert!(
        duplicates <= kills * 64 + 10,
        "{duplicates} duplicate runs after {kills} kills"
    );

    assert_flat("stable scheduler RSS", mid_sched, end_sched, 32 << 20);
    assert_flat("stable worker RSS", mid_worker, end_worker, 32 << 20);
    assert_flat("Redis used_memory", mid_redis, end_redis, 4 << 20);
    for p in [&stable_scheduler, &stable_worker] {
        assert!(
            std::fs::metadata(format!("/proc/{}", p.child.id())).is_ok(),
            "a process that was never killed has died"
        );
    }
    let _ = std::fs::remove_file(&record);
}
