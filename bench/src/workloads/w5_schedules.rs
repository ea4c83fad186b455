//! W5 schedules: S interval schedules firing every second for D seconds
//! (10,000 and 30 s in a full run): ticks/s, tick lateness p99, double fires,
//! missed fires.
//!
//! First the floor: raw lapin at the same rate, each message published at
//! its own instant ([`crate::baseline::paced`]).
//!
//! Then, as in production, the schedules are created while the scheduler
//! runs:
//!
//! 1. start the scheduler and a worker (sized as W1's) whose `kairos.noop`
//!    records each fire by (schedule id, `x-run-at`), in a fresh namespace;
//! 2. create S schedules `every 1 s` through the scheduler's HTTP routes
//!    (called in process, what `kairosctl` does without a scheduler
//!    address), each firing `kairos.noop` with `x-schedule-id` and the
//!    occurrence's instant as `x-run-at`; the first tick comes 2 s after
//!    creation, phases spread over the second;
//! 3. once all exist, record the occurrences due in the next D seconds:
//!    ticks/s = fires / D; lateness = start - `x-run-at`; double fires =
//!    occurrences run twice; missed = S x D - distinct occurrences (every
//!    schedule has exactly D ticks in the window), once the late ones had
//!    up to a minute after the window to run.

use super::Ctx;
use crate::env::BenchEnv;
use crate::recorder::Recorder;
use crate::report::{percentile, Row};
use crate::service::InProcess;
use crate::Args;
use anyhow::Result;
use kairos_worker::Worker;
use std::time::{Duration, Instant};

/// `KAIROS_SCHEDULE_LOOKAHEAD_MS` for W5 (the default is 250).
pub(crate) const W5_LOOKAHEAD_MS: u64 = 1_000;

/// How long after the window's last tick late ticks are still waited for
/// before those not seen count as missed.
const LATE_GRACE: Duration = Duration::from_secs(60);

pub(crate) const NOT_AVAILABLE: &str = "not available: schedules not in this build";

/// Creates `count` schedules firing `kairos.noop` every `every_ms` in the
/// namespace, through the scheduler's own HTTP routes called in process
/// (what `kairosctl` does without a scheduler address).
pub(crate) async fn create_interval_schedules(
    env: &BenchEnv,
    count: usize,
    every_ms: u64,
) -> Result<bool> {
    use tower::ServiceExt;
    let router = kairos_scheduler::local_api(&env.scheduler_config()).await?;
    for i in 0..count {
        // Phases spread over the interval, as schedules created at different
        // times are: 10,000 ticks on the same instant would measure a
        // 10,000-task burst (W1's subject), not the tick machinery. The
        // first tick comes 2 s after creation: never a missed one.
        let phase = (i as u64 * every_ms / count.max(1) as u64) as i64;
        let start_at = (kairos_shared::amqp::now_ms() / 1000 + 2) * 1000 + phase;
        let spec = serde_json::json!({
            "every_ms": every_ms,
            "start_at": start_at,
            "task": {"name": kairos_worker::builtin::NOOP, "queue": "default"},
        });
        let req = axum::http::Request::builder()
            .method("PUT")
            .uri(format!("/v1/schedules/w5.{i}"))
            .header("content-type", "application/json")
            .body(axum::body::Body::from(spec.to_string()))?;
        let resp = router.clone().oneshot(req).await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "creating schedule w5.{i}: HTTP {}",
            resp.status()
        );
    }
    Ok(true)
}

/// The worker that records each occurrence into `rec`, sized as in W1:
/// W5 and W9 measure the tick machinery, and 10,000 no-op tasks a second
/// need more than the default prefetch.
pub(crate) fn occurrence_worker(env: &BenchEnv, args: &Args, rec: &Recorder) -> InProcess {
    let mut wconfig = env.worker_config();
    wconfig.concurrency = args.w1_concurrency;
    wconfig.prefetch = Some(args.w1_prefetch);
    InProcess::worker(
        Worker::new(wconfig)
            .with_builtins()
            .handler(kairos_worker::builtin::NOOP, rec.occurrence_handler()),
    )
}

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let mut env = BenchEnv::new("w5", &ctx.args.amqp_url, &ctx.args.redis_url).await?;
    let result = async {
        floor(ctx, &mut env).await?;
        once(ctx, &env).await
    }
    .await;
    env.cleanup().await;
    result
}

/// The broker's latency at W5's rate with nothing of Kairos in the way:
/// the floor under the tick lateness.
async fn floor(ctx: &mut Ctx<'_>, env: &mut BenchEnv) -> Result<()> {
    let rate = ctx.args.w5_schedules;
    let secs = ctx.args.w5_secs.min(10);
    let l = crate::baseline::paced(env, rate, secs, ctx.args.body_bytes).await?;
    ctx.report.check(
        l.len() == rate * secs as usize,
        format!(
            "W5 floor: {} of {} paced messages consumed",
            l.len(),
            rate * secs as usize
        ),
    );
    ctx.report.push(
        Row::new("W5 schedules", "raw paced lateness p99", percentile(&l, 99.0) as f64, "ms").note(
            format!(
                "raw lapin, {rate} msg/s for {secs} s, each at its instant: p50 {} ms, p90 {} ms, max {} ms",
                percentile(&l, 50.0),
                percentile(&l, 90.0),
                l.last().copied().unwrap_or(0)
            ),
        ),
    );
    Ok(())
}

async fn once(ctx: &mut Ctx<'_>, env: &BenchEnv) -> Result<()> {
    let w = "W5 schedules";
    let (s, secs) = (ctx.args.w5_schedules, ctx.args.w5_secs);
    let rec = Recorder::with_capacity(s * secs as usize);
    // Nothing counts until the window below is set.
    rec.only_due_in(i64::MAX, i64::MAX);
    // At 250 ms (the default), a 2-core machine that stalls under this
    // load handed about 1 % of the ticks to the delay queue after their
    // tick; a second leaves the firing loop room (docs/BENCHMARKS.md).
    let mut sconfig = env.scheduler_config();
    sconfig.schedule_lookahead_ms = W5_LOOKAHEAD_MS;
    let scheduler = InProcess::scheduler(sconfig);
    let worker = occurrence_worker(env, ctx.args, &rec);
    let created = Instant::now();
    if !create_interval_schedules(env, s, 1_000).await? {
        for metric in ["ticks", "tick lateness p99", "double fires"] {
            ctx.report.push(Row::unavailable(w, metric, NOT_AVAILABLE));
        }
        worker.stop().await;
        scheduler.stop().await;
        return Ok(());
    }
    println!(
        "  W5: {s} schedules created in {:.1} s while the scheduler ran",
        created.elapsed().as_secs_f64()
    );
    // Every schedule's first tick is before the next second but two (see
    // create_interval_schedules): from there, each ticks every second.
    let from = (kairos_shared::amqp::now_ms() / 1000 + 3) * 1000;
    let to = from + secs as i64 * 1000;
    rec.only_due_in(from, to);
    // The window's last ticks are a second past its end; then, on a machine
    // that fell behind, the late ones are waited for: a tick that runs late
    // is late, not missed (a slow quarter hour once left 6 % of them
    // running after a fixed second's wait).
    let end = to + 1_000 - kairos_shared::amqp::now_ms();
    tokio::time::sleep(Duration::from_millis(end.max(0) as u64)).await;
    let expected = s * secs as usize;
    rec.wait_distinct(expected, tokio::time::Instant::now() + LATE_GRACE)
        .await;
    let seen = rec.seen();
    worker.stop().await;
    scheduler.stop().await;

    let l = &seen.lateness;
    let missed = expected.saturating_sub(seen.distinct);
    ctx.report.push(
        Row::new(w, "ticks", seen.distinct as f64 / secs as f64, "fires/s")
            .note(format!("{s} schedules every 1 s for {secs} s")),
    );
    ctx.report.push(
        Row::new(w, "tick lateness p99", percentile(l, 99.0) as f64, "ms")
            .at_most(20.0)
            .note(format!(
                "p50 {} ms, p90 {} ms, max {} ms; {:.2} x raw publish+consume; lookahead {W5_LOOKAHEAD_MS} ms",
                percentile(l, 50.0),
                percentile(l, 90.0),
                l.last().copied().unwrap_or(0),
                s as f64 / ctx.base.priority.concurrent
            )),
    );
    ctx.report
        .push(Row::new(w, "double fires", seen.duplicated as f64, "fires").at_most(0.0));
    ctx.report.check(
        missed == 0,
        format!("W5: {missed} of {expected} fires missed"),
    );
    ctx.report.check(
        seen.duplicated == 0,
        format!("W5: {} occurrences fired twice", seen.duplicated),
    );
    Ok(())
}
