//! W2 precision: tasks due at random times a few seconds ahead, enqueued in
//! random order through `NS.delay`; a recording handler notes how late each
//! started (its start minus `x-run-at`, both by this host's clock, which is
//! also Redis's). Lost = never started; duplicated = started twice.
//!
//! (a) the peers' workload: 5,000 due uniformly 2 to 12 s ahead.
//! (b) 20,000 due over 10 s. Enqueuing 20,000 takes a few seconds on two
//!     cores, so their window opens 5 s ahead (5 to 15 s), or no task would
//!     be due before it was even accepted.
//!
//! With `--cluster`, both also on the cluster (delay queue in the Redis
//! Cluster, quorum intake and task queues), rows "W2a precision (cluster,
//! quorum)": lateness has no raw baseline, the single node's rows of the
//! same run are the comparison.

use super::{body, enqueue_all, Ctx};
use crate::env::BenchEnv;
use crate::on_off;
use crate::recorder::Recorder;
use crate::report::{percentile, Row};
use crate::service::InProcess;
use crate::target::Target;
use anyhow::Result;
use kairos_shared::amqp::now_ms;
use kairos_shared::client::NewTask;
use kairos_worker::Worker;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct Shape {
    pub(crate) label: &'static str,
    pub(crate) tasks: usize,
    /// Due times are uniform in [lead, lead + window) ms after the start.
    pub(crate) lead_ms: i64,
    pub(crate) window_ms: i64,
    pub(crate) p99_target_ms: f64,
}

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let quick = ctx.args.quick;
    let shapes = [
        Shape {
            label: "W2a precision",
            tasks: ctx.args.w2a_tasks,
            lead_ms: if quick { 1_000 } else { 2_000 },
            window_ms: if quick { 2_000 } else { 10_000 },
            p99_target_ms: 5.0,
        },
        Shape {
            label: "W2b precision",
            tasks: ctx.args.w2b_tasks,
            lead_ms: if quick { 1_000 } else { 5_000 },
            window_ms: if quick { 2_000 } else { 10_000 },
            p99_target_ms: 20.0,
        },
    ];
    let mut targets = vec![ctx.single.clone()];
    targets.extend(ctx.cluster.as_ref().map(|c| c.target.clone()));
    for target in &targets {
        for shape in &shapes {
            for &status in ctx.args.status.variants() {
                let env = BenchEnv::on("w2", target).await?;
                let result = once(ctx, &env, target, shape, status).await;
                env.cleanup().await;
                result?;
            }
        }
    }
    Ok(())
}

async fn once(
    ctx: &mut Ctx<'_>,
    env: &BenchEnv,
    target: &Target,
    shape: &Shape,
    status: bool,
) -> Result<()> {
    let n = shape.tasks;
    let mut sc = env.scheduler_config();
    sc.status.status = status;
    let scheduler = InProcess::scheduler(sc);
    let rec = Recorder::with_capacity(n);
    let mut wc = env.worker_config();
    wc.status.status = status;
    if ctx.args.w2_prefetch.is_some() {
        wc.prefetch = ctx.args.w2_prefetch;
    }
    let worker = InProcess::worker(
        Worker::new(wc)
            .with_builtins()
            .handler(kairos_worker::builtin::NOOP, rec.handler()),
    );
    let client = Arc::new(env.client().await?);
    tokio::time::sleep(super::SERVICE_SETTLE).await;

    let start = now_ms();
    let (bytes, lead, window) = (ctx.args.body_bytes, shape.lead_ms, shape.window_ms);
    let sent = enqueue_all(&client, n, |_| {
        let due = start + lead + rand::rng().random_range(0..window);
        NewTask::new(kairos_worker::builtin::NOOP)
            .run_at(due)
            .body(body(bytes))
    })
    .await?;
    let accepted_in = now_ms() - start;
    // Everything is due by start + lead + window; then allow for stragglers.
    let last_due = shape.lead_ms + shape.window_ms;
    let wait = Duration::from_millis((last_due - accepted_in).max(0) as u64 + 10_000);
    rec.wait_distinct(n, tokio::time::Instant::now() + wait)
        .await;
    // A little longer, so a duplicate that is on its way is counted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = rec.seen();
    worker.stop().await;
    scheduler.stop().await;
    if let Ok(c) = Arc::try_unwrap(client) {
        let _ = c.close().await;
    }

    let l = &seen.lateness;
    let lost = n.saturating_sub(seen.distinct);
    let label = format!("{} (status {})", target.name(shape.label), on_off(status));
    let w = label.as_str();
    let prefetch = ctx
        .args
        .w2_prefetch
        .map(|p| format!("; worker prefetch {p}"))
        .unwrap_or_default();
    let note = format!(
        "{n} tasks due {}-{} s ahead, accepted in {} ms{prefetch}",
        shape.lead_ms / 1000,
        (shape.lead_ms + shape.window_ms) / 1000,
        accepted_in
    );
    ctx.report
        .push(Row::new(w, "lateness p50", percentile(l, 50.0) as f64, "ms").note(note));
    ctx.report.push(
        Row::new(w, "lateness p99", percentile(l, 99.0) as f64, "ms").at_most(shape.p99_target_ms),
    );
    ctx.report.push(Row::new(
        w,
        "lateness p99.9",
        percentile(l, 99.9) as f64,
        "ms",
    ));
    ctx.report.push(Row::new(
        w,
        "lateness max",
        l.last().copied().unwrap_or(0) as f64,
        "ms",
    ));
    let early = l.first().copied().unwrap_or(0);
    ctx.report
        .push(Row::new(w, "lost", lost as f64, "tasks").at_most(0.0));
    ctx.report
        .push(Row::new(w, "duplicated", seen.duplicated as f64, "tasks"));
    ctx.report
        .check(sent == n, format!("{w}: {sent} of {n} enqueued"));
    ctx.report
        .check(lost == 0, format!("{w}: {lost} of {n} tasks never started"));
    // Never early is part of precision: a task may not start before its
    // due time (same clock on this host).
    ctx.report.check(
        early >= 0,
        format!("{w}: a task started {} ms early", -early),
    );
    Ok(())
}
