//! W3 backlog, and W6 idle cost on the same backlog:
//!
//! 1. N delayed tasks, due an hour ahead, enqueued with the Rust client
//!    through `NS.delay`: insert rate = N / (first enqueue to the last task
//!    held in Redis); Redis memory per pending task from `INFO memory`
//!    before and after, less the body.
//! 2. W6: the real `kairos-scheduler` and `kairos-worker` binaries idle
//!    next to that backlog (see `w6_idle`).
//! 3. Promotion: M more tasks all due at one instant T; the rate is
//!    M / (T to the moment the last of them left Redis, which the pump does
//!    only after its publisher confirm).

use super::{body, enqueue_all, w6_idle, Ctx};
use crate::env::BenchEnv;
use crate::report::Row;
use crate::service::InProcess;
use anyhow::Result;
use kairos_shared::amqp::now_ms;
use kairos_shared::client::{Client, NewTask};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How far ahead the backlog is due: it stays pending throughout.
const HOUR_MS: i64 = 3_600_000;
/// Redis memory per pending task beyond its body, bytes: the target.
const MEMORY_PER_TASK_TARGET: f64 = 200.0;
/// How often [`wait_pending`] polls.
const PENDING_POLL: Duration = Duration::from_millis(5);

/// Runs W3 (when `w3`) and W6 (when `w6`) on one backlog, in a namespace
/// of their own.
pub(crate) async fn run(ctx: &mut Ctx<'_>, w3: bool, w6: bool) -> Result<()> {
    let env = BenchEnv::new("w3", &ctx.args.amqp_url, &ctx.args.redis_url).await?;
    let result = stages(ctx, &env, w3, w6).await;
    env.cleanup().await;
    result
}

/// The scheduler of W3, with task status off: W3 measures the delay
/// queue's own memory and rates (a status costs about 440 bytes more per
/// task, measured in W1).
fn scheduler_config(env: &BenchEnv) -> kairos_scheduler::Config {
    let mut c = env.scheduler_config();
    c.status.status = false;
    c
}

/// The three stages on one backlog; W6 runs between insert and promotion
/// with the in-process scheduler stopped.
async fn stages(ctx: &mut Ctx<'_>, env: &BenchEnv, w3: bool, w6: bool) -> Result<()> {
    let n = ctx.args.w3_pending;
    let scheduler = InProcess::scheduler(scheduler_config(env));
    let client = Arc::new(Client::connect(&env.amqp_url, &env.ns).await?);
    tokio::time::sleep(super::SERVICE_SETTLE).await;
    let insert_rate = insert(ctx, env, &client, w3).await?;

    // 2. Idle cost, with the in-process scheduler out of the way.
    scheduler.stop().await;
    if w6 {
        w6_idle::measure(ctx, env, n).await?;
    }
    if w3 {
        promotion(ctx, env, &client, insert_rate).await?;
    }
    if let Ok(c) = Arc::try_unwrap(client) {
        let _ = c.close().await;
    }
    Ok(())
}

/// Stage 1: inserts the backlog of `w3_pending` tasks due an hour ahead, checks
/// they are all held, and reports (when `report`) the rate and the Redis
/// memory per task. Returns the insert rate, tasks/s.
async fn insert(
    ctx: &mut Ctx<'_>,
    env: &BenchEnv,
    client: &Arc<Client>,
    report: bool,
) -> Result<f64> {
    let n = ctx.args.w3_pending;
    let bytes = ctx.args.body_bytes;
    let mem_before = env.redis_used_memory().await?;
    let hour_ahead = now_ms() + HOUR_MS;
    let t0 = Instant::now();
    let sent = enqueue_all(client, n, |_| {
        NewTask::new(kairos_worker::builtin::NOOP)
            .run_at(hour_ahead)
            .body(body(bytes))
    })
    .await?;
    let held = wait_pending(
        env,
        |p| p >= n as u64,
        Duration::from_secs(120 + n as u64 / 1000),
    )
    .await?;
    let insert_secs = t0.elapsed().as_secs_f64();
    let mem_after = env.redis_used_memory().await?;
    ctx.report.check(
        sent == n && held == n as u64,
        format!("W3: {n} enqueued, {sent} confirmed, {held} held in Redis"),
    );
    let insert_rate = n as f64 / insert_secs;
    let per_task = mem_after.saturating_sub(mem_before) as f64 / n as f64;
    let (zsets, hashes, record_len) = env.delay_queue_breakdown().await?;
    if report {
        ctx.report.push(
            Row::new("W3 backlog", "insert", insert_rate, "tasks/s")
                .ratio(ctx.base.priority.publish)
                .note(format!(
                    "{n} tasks due in 1 h, client -> NS.delay -> intake -> Redis; x raw publish"
                )),
        );
        ctx.report.push(
            Row::new(
                "W3 backlog",
                "Redis memory per task beyond body",
                per_task - bytes as f64,
                "bytes",
            )
            .at_most(MEMORY_PER_TASK_TARGET)
            .note(format!(
                "{per_task:.0} bytes per task in all (INFO used_memory, task status off), body {bytes} bytes; \
                 due index {:.0} + record hashes {:.0} bytes per task; a record is {record_len} bytes",
                zsets as f64 / n as f64,
                hashes as f64 / n as f64
            )),
        );
    }
    Ok(insert_rate)
}

/// Stage 3, promotion: `w3_burst` more tasks all due at one instant, held before
/// it (the insert rate says how long that takes); the rate is the burst
/// over the time from its due instant until the last task left Redis.
async fn promotion(
    ctx: &mut Ctx<'_>,
    env: &BenchEnv,
    client: &Arc<Client>,
    insert_rate: f64,
) -> Result<()> {
    let n = ctx.args.w3_pending;
    let bytes = ctx.args.body_bytes;
    let m = ctx.args.w3_burst;
    let scheduler = InProcess::scheduler(scheduler_config(env));
    tokio::time::sleep(super::SERVICE_SETTLE).await;
    // Due once they are surely all held: the insert rate says how long that
    // takes; add half again and two seconds.
    let lead_ms = (m as f64 / insert_rate * 1500.0) as i64 + 2_000;
    let due = now_ms() + lead_ms;
    let sent = enqueue_all(client, m, |_| {
        NewTask::new(kairos_worker::builtin::NOOP)
            .run_at(due)
            .body(body(bytes))
    })
    .await?;
    let total = (n + m) as u64;
    let held = wait_pending(
        env,
        |p| p >= total,
        Duration::from_millis(lead_ms as u64 + 60_000),
    )
    .await?;
    let all_held_at = now_ms();
    ctx.report.check(
        sent == m && held == total,
        format!("W3 promotion: {m} enqueued, {sent} confirmed, {held} of {total} held"),
    );
    let left = wait_pending(
        env,
        |p| p <= n as u64,
        Duration::from_millis((due - now_ms()).max(0) as u64 + 120_000),
    )
    .await?;
    let done_at = now_ms();
    let published = env.queue_depth(&env.names.queue("default")).await?;
    scheduler.stop().await;
    ctx.report.check(
        left == n as u64 && published as usize == m,
        format!("W3 promotion: {left} left pending (want {n}), {published} published (want {m})"),
    );
    let secs = ((done_at - due).max(1)) as f64 / 1000.0;
    let mut row = Row::new("W3 backlog", "promotion", m as f64 / secs, "tasks/s")
        .ratio(ctx.base.priority.publish)
        .ratio_at_least(0.7)
        .note(format!(
            "{m} due at one instant over {n} pending; due time to last confirm; x raw publish"
        ));
    if all_held_at > due {
        row = row.note(format!(
            "INVALID: the burst was still being accepted {} ms after its due time",
            all_held_at - due
        ));
    }
    ctx.report.push(row);
    Ok(())
}

/// Polls the pending count until `done(count)` or `within` passes; returns
/// the last count. Polling is one pipelined HLEN per shard every 5 ms.
async fn wait_pending(env: &BenchEnv, done: impl Fn(u64) -> bool, within: Duration) -> Result<u64> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let p = env.pending().await?;
        if done(p) || tokio::time::Instant::now() >= deadline {
            return Ok(p);
        }
        tokio::time::sleep(PENDING_POLL).await;
    }
}
