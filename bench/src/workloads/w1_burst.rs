//! W1 burst: N immediate `kairos.noop` tasks enqueued with the Rust client
//! while a worker runs. The worker's `kairos.noop` is replaced by a noop that
//! records each run, so the bench knows when the last one finished (its ack
//! follows at once) and that none was lost or run twice.
//!
//! With `--cluster`, also on the cluster (events off, each status variant),
//! against the raw rates of a queue of the cluster's mode.

use super::{body, enqueue_all, Ctx};
use crate::baseline::Rates;
use crate::env::BenchEnv;
use crate::on_off;
use crate::recorder::Recorder;
use crate::report::Row;
use crate::service::InProcess;
use crate::target::Target;
use anyhow::Result;
use futures_util::StreamExt;
use kairos_shared::client::NewTask;
use kairos_worker::Worker;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long events may trail the last task's completion before they are
/// counted.
const EVENTS_TAIL: Duration = Duration::from_millis(500);

/// Runs W1 for each task-status variant (`--status`), with events off,
/// then on, each in a namespace of its own.
pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let variants = ctx.args.status.variants();
    let single = Against {
        target: ctx.single.clone(),
        base: ctx.base.priority,
        base_kind: "priority queue",
    };
    for events in [false, true] {
        for &status in variants {
            once_in_namespace(ctx, &single, events, status).await?;
        }
    }
    if let Some(cluster) = ctx.cluster.clone() {
        let on_cluster = Against {
            base_kind: "quorum queue on the cluster",
            target: cluster.target,
            base: cluster.base,
        };
        // Events off only: events cost the same on both, and every
        // variant on the cluster adds a run of minutes on two cores.
        for &status in variants {
            once_in_namespace(ctx, &on_cluster, false, status).await?;
        }
    }
    Ok(())
}

/// Where a W1 variant runs and what its rates are divided by.
struct Against {
    target: Target,
    base: Rates,
    /// The baseline's queue, for the notes.
    base_kind: &'static str,
}

async fn once_in_namespace(
    ctx: &mut Ctx<'_>,
    on: &Against,
    events: bool,
    status: bool,
) -> Result<()> {
    let mut env = BenchEnv::on("w1", &on.target).await?;
    let result = once(ctx, &mut env, on, events, status).await;
    env.cleanup().await;
    result
}

async fn once(
    ctx: &mut Ctx<'_>,
    env: &mut BenchEnv,
    on: &Against,
    events: bool,
    status: bool,
) -> Result<()> {
    let n = ctx.args.w1_tasks;
    let workload = on.target.name("W1 burst");
    let workload = workload.as_str();
    let label = format!("events {}, status {}", on_off(events), on_off(status));
    let label = label.as_str();
    let tap = if events {
        Some(EventCounter::start(env).await?)
    } else {
        None
    };
    let rec = Recorder::with_capacity(n);
    let mut config = env.worker_config();
    config.common.events = events;
    config.status.status = status;
    config.concurrency = ctx.args.w1_concurrency;
    config.prefetch = Some(ctx.args.w1_prefetch);
    let worker = InProcess::worker(
        Worker::new(config)
            .with_builtins()
            .handler(kairos_worker::builtin::NOOP, rec.handler()),
    );
    let client = Arc::new(env.client().await?);
    // Let the worker connect and subscribe before the clock starts.
    tokio::time::sleep(super::SERVICE_SETTLE).await;

    let memory_before = env.redis_used_memory().await?;
    let bytes = ctx.args.body_bytes;
    let t0 = Instant::now();
    let sent = enqueue_all(&client, n, |_| {
        NewTask::new(kairos_worker::builtin::NOOP).body(body(bytes))
    })
    .await?;
    let enqueued = t0.elapsed();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + n as u64 / 500);
    rec.wait_distinct(n, deadline).await;
    let seen = rec.seen();
    worker.stop().await;
    if let Ok(c) = Arc::try_unwrap(client) {
        let _ = c.close().await;
    }

    let base = on.base;
    let enqueue_rate = sent as f64 / enqueued.as_secs_f64();
    ctx.report.push(
        Row::new(
            workload,
            &format!("enqueue ({label})"),
            enqueue_rate,
            "tasks/s",
        )
        .ratio(base.publish)
        .note(format!("{n} tasks; x raw publish, {}", on.base_kind)),
    );
    let e2e = seen
        .last_done
        .map(|t| seen.distinct as f64 / (t - t0).as_secs_f64())
        .unwrap_or(0.0);
    let target = if events { 0.6 } else { 0.8 };
    ctx.report.push(
        Row::new(workload, &format!("end to end ({label})"), e2e, "tasks/s")
            .ratio(base.concurrent)
            .ratio_at_least(target)
            .note(format!(
                "x raw publish+consume, {}; concurrency {}, prefetch {}",
                on.base_kind, ctx.args.w1_concurrency, ctx.args.w1_prefetch
            )),
    );
    ctx.report.check(
        sent == n && seen.distinct == n,
        format!(
            "{workload} ({label}): {n} enqueued, {} confirmed, {} ran",
            sent, seen.distinct
        ),
    );
    if status && !events && !on.target.is_cluster() {
        // The worker wrote its last statuses before it stopped.
        status_memory(ctx, env, n, memory_before).await?;
    }
    if seen.duplicated > 0 {
        println!(
            "  note: {workload} ({label}): {} tasks ran twice",
            seen.duplicated
        );
    }
    if let Some(tap) = tap {
        // Events are best effort by design (dropped, never blocking, when
        // the broker falls behind): report how many arrived.
        tokio::time::sleep(EVENTS_TAIL).await;
        let got = tap.count.load(Ordering::Relaxed);
        println!(
            "  W1 ({label}): {got} events received of {} expected (started + succeeded)",
            2 * n
        );
    }
    Ok(())
}

/// A private queue on `NS.events` that counts what arrives, so events are
/// really consumed (routed and delivered), as when someone listens.
struct EventCounter {
    count: Arc<AtomicU64>,
}

impl EventCounter {
    async fn start(env: &BenchEnv) -> Result<Self> {
        let ch = env.conn.create_channel().await?;
        let queue = kairos_shared::admin::listen_to_events(
            &ch,
            &env.names,
            kairos_shared::admin::ALL_TASK_EVENTS,
        )
        .await?;
        let (consume_ch, mut consumer) = env.consume_no_ack(queue.as_str()).await?;
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            let _keep = (ch, consume_ch);
            while let Some(Ok(_)) = consumer.next().await {
                c.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(EventCounter { count })
    }
}

/// Redis memory per finished task's status: `INFO memory` before and
/// after the run (which other users of a shared Redis also move), and
/// `MEMORY USAGE` of a sample of status hashes plus the recent sets.
async fn status_memory(ctx: &mut Ctx<'_>, env: &BenchEnv, n: usize, before: u64) -> Result<()> {
    let after = env.redis_used_memory().await?;
    let (written, sampled) = env.status_memory().await?;
    let delta = after.saturating_sub(before) as f64 / n.max(1) as f64;
    ctx.report.push(
        Row::new("W1 burst", "status memory per finished task", sampled, "bytes").note(format!(
            "MEMORY USAGE of sampled hashes + recent sets; INFO used_memory delta {delta:.0} B/task; {written} of {n} statuses written"
        )),
    );
    ctx.report.check(
        written == n as u64,
        format!("W1 (status on): {written} of {n} task statuses written"),
    );
    Ok(())
}
