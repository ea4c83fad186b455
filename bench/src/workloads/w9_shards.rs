//! W9 shard ownership (issue 17): W5's schedules (S interval schedules,
//! every second) served by 1, 2 and 3 real `kairos-scheduler` processes
//! (`--schedulers`), which split the shards between them.
//!
//! The schedules are created once; then for each count N:
//!
//! 1. start N scheduler binaries (same profile as this one, W5's lookahead)
//!    and an in-process worker whose `kairos.noop` records each occurrence,
//!    and wait until the N processes own every shard between them (read
//!    from the leases `NS:own{S}`);
//! 2. over a window of D seconds starting a few seconds later, read the CPU
//!    (utime + stime from /proc/PID/stat) of all N processes, and record the
//!    occurrences due in the window;
//! 3. rows: scheduler CPU per fired tick (all N processes together, over
//!    the ticks of the window: with the shards split it must not grow with
//!    N, where each scheduler planning every schedule made it grow about
//!    N-fold), tick lateness p99, double fires; missed ticks are a failed
//!    check.
//!
//! Between two counts the task queue is purged (ticks published past the
//! window would be the next count's backlog), and ticks missed while no
//! scheduler ran are caught up before the next window (their misfire
//! policy).
//!
//! Real processes, so the CPU is the schedulers' own: an in-process
//! scheduler would share its process (and its counters) with the worker
//! and the bench. Redis's CPU is not counted: the Redis is shared.

use super::w5_schedules::{create_interval_schedules, occurrence_worker, W5_LOOKAHEAD_MS};
use super::w6_idle::{cpu_ticks, TICKS_PER_SEC};
use super::Ctx;
use crate::env::BenchEnv;
use crate::recorder::Recorder;
use crate::report::{percentile, Row};
use crate::service::Proc;
use anyhow::{Context, Result};
use std::collections::HashSet;
use std::time::Duration;

const W: &str = "W9 shard ownership";

/// How long the schedulers may take to start and split the shards.
const SPLIT_WITHIN: Duration = Duration::from_secs(60);

/// How long after the window's last tick late ticks are still waited for.
const LATE_GRACE: Duration = Duration::from_secs(60);

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let env = BenchEnv::new("w9", &ctx.args.amqp_url, &ctx.args.redis_url).await?;
    let result = all(ctx, &env).await;
    env.cleanup().await;
    result
}

async fn all(ctx: &mut Ctx<'_>, env: &BenchEnv) -> Result<()> {
    let s = ctx.args.w5_schedules;
    create_interval_schedules(env, s, 1_000).await?;
    let mut first: Option<f64> = None;
    for n in ctx.args.schedulers.clone() {
        let us = phase(ctx, env, n as usize, first).await?;
        first = first.or(us);
    }
    Ok(())
}

/// One count of schedulers; returns its CPU per tick (µs).
async fn phase(
    ctx: &mut Ctx<'_>,
    env: &BenchEnv,
    n: usize,
    first: Option<f64>,
) -> Result<Option<f64>> {
    let (s, secs) = (ctx.args.w5_schedules, ctx.args.w5_secs);
    let vars = vec![
        ("KAIROS_NAMESPACE", env.ns.clone()),
        ("KAIROS_AMQP_URL", env.amqp_url.clone()),
        ("KAIROS_REDIS_URL", env.redis_url.clone()),
        ("KAIROS_HTTP_ADDR", "127.0.0.1:0".into()),
        ("KAIROS_SCHEDULE_LOOKAHEAD_MS", W5_LOOKAHEAD_MS.to_string()),
        ("RUST_LOG", "warn".into()),
    ];
    let procs: Vec<Proc> = (0..n)
        .map(|_| Proc::spawn("kairos-scheduler", &vars))
        .collect::<Result<_>>()?;
    let rec = Recorder::with_capacity(s * secs as usize);
    rec.only_due_in(i64::MAX, i64::MAX);
    let worker = occurrence_worker(env, ctx.args, &rec);
    let pids: Vec<u32> = procs.iter().map(Proc::pid).collect();
    let measured = async {
        let split = wait_split(env, &pids).await?;
        // A few seconds for the ticks missed between two counts (no
        // scheduler ran) to be handled and the new owners to settle.
        let lead = if ctx.args.quick { 2 } else { 5 };
        let from = (kairos_shared::amqp::now_ms() / 1000 + lead) * 1000;
        let to = from + secs as i64 * 1000;
        rec.only_due_in(from, to);
        sleep_until_ms(from).await;
        let before = cpu_of(&pids)?;
        sleep_until_ms(to).await;
        let used = (cpu_of(&pids)? - before) as f64 / TICKS_PER_SEC;
        sleep_until_ms(to + 1_000).await;
        let expected = s * secs as usize;
        rec.wait_distinct(expected, tokio::time::Instant::now() + LATE_GRACE)
            .await;
        anyhow::Ok((split, used, expected))
    }
    .await;
    worker.stop().await;
    for p in procs {
        p.terminate(Duration::from_secs(15)).await;
    }
    // What the schedulers published past the window, unrun, would be the
    // next count's backlog: each count starts from an empty queue.
    env.channel
        .queue_purge(
            env.names.queue("default").as_str().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await
        .context("purging the task queue between counts")?;
    let (split, used, expected) = measured?;
    let seen = rec.seen();
    let l = &seen.lateness;
    let per_tick_us = (seen.distinct > 0).then(|| used * 1e6 / seen.distinct as f64);
    let growth = match (first, per_tick_us) {
        (Some(f), Some(us)) if f > 0.0 => format!("; {:.2} x the first count's", us / f),
        _ => String::new(),
    };
    ctx.report.push(
        Row::new(
            W,
            &format!("scheduler CPU per tick, {n} scheduler(s)"),
            per_tick_us.unwrap_or(0.0),
            "µs",
        )
        .note(format!(
            "{used:.2} s CPU over {secs} s for {} ticks of {s} schedules; shards {split}{growth}",
            seen.distinct
        )),
    );
    ctx.report.push(
        Row::new(
            W,
            &format!("tick lateness p99, {n} scheduler(s)"),
            percentile(l, 99.0) as f64,
            "ms",
        )
        .at_most(20.0)
        .note(format!(
            "p50 {} ms, p90 {} ms, max {} ms; lookahead {W5_LOOKAHEAD_MS} ms",
            percentile(l, 50.0),
            percentile(l, 90.0),
            l.last().copied().unwrap_or(0)
        )),
    );
    let missed = expected.saturating_sub(seen.distinct);
    ctx.report.check(
        missed == 0,
        format!("W9 with {n} schedulers: {missed} of {expected} fires missed"),
    );
    ctx.report.check(
        seen.duplicated == 0,
        format!(
            "W9 with {n} schedulers: {} occurrences fired twice",
            seen.duplicated
        ),
    );
    Ok(per_tick_us)
}

/// Waits until the processes `pids` own every shard between them, each at
/// least one; returns the shards each owns (`4+4`).
async fn wait_split(env: &BenchEnv, pids: &[u32]) -> Result<String> {
    let shards = env.scheduler_config().shards;
    let keys: Vec<String> = (0..shards)
        .map(|s| format!("{}:own{{{s}}}", env.ns))
        .collect();
    let deadline = tokio::time::Instant::now() + SPLIT_WITHIN;
    loop {
        let mut con = env.redis.clone();
        let owners: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut con)
            .await
            .context("reading the shard owners")?;
        let owners: Vec<Option<u32>> = owners
            .iter()
            .map(|o| {
                o.as_deref()
                    .and_then(|o| o.rsplit(':').nth(1)?.parse().ok())
            })
            .collect();
        let counts: Vec<usize> = pids
            .iter()
            .map(|p| owners.iter().filter(|o| **o == Some(*p)).count())
            .collect();
        let all_ours = owners.iter().all(|o| o.is_some_and(|o| pids.contains(&o)));
        let distinct: HashSet<_> = owners.iter().flatten().collect();
        if all_ours && (distinct.len() == pids.len() || pids.len() > keys.len()) {
            let parts: Vec<String> = counts.iter().map(|c| c.to_string()).collect();
            return Ok(parts.join("+"));
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} schedulers did not split the shards within {SPLIT_WITHIN:?}: {owners:?}",
            pids.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// utime + stime of all `pids`, in clock ticks.
fn cpu_of(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|&p| cpu_ticks(p)).sum()
}

async fn sleep_until_ms(at: i64) {
    let wait = at - kairos_shared::amqp::now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}
