//! W5 schedules: S interval schedules firing every second for D seconds
//! (10,000 and 30 s in a full run): ticks/s, tick lateness p99, double fires,
//! missed fires.
//!
//! The schedules are created in process through the scheduler's HTTP
//! routes, then:
//!
//! 1. create S schedules `every 1 s` with phases spread over the second, in
//!    a fresh namespace, each firing
//!    `kairos.noop` with `x-schedule-id` and the occurrence's instant as
//!    `x-run-at`;
//! 2. run the scheduler and a worker whose `kairos.noop` records each fire
//!    by (schedule id, `x-run-at`) for D s;
//! 3. ticks/s = fires / D; lateness = start - `x-run-at`; double fires =
//!    occurrences run twice; missed = S x D - distinct occurrences (with one
//!    second of slack at each end of the window).

use super::Ctx;
use crate::env::BenchEnv;
use crate::recorder::Recorder;
use crate::report::{percentile, Row};
use crate::service::InProcess;
use anyhow::Result;
use kairos_worker::Worker;
use std::time::Duration;

pub const NOT_AVAILABLE: &str = "not available: schedules not in this build";

/// Creates `count` schedules firing `kairos.noop` every `every_ms` in the
/// namespace, through the scheduler's own HTTP routes called in process
/// (what `kairosctl` does without a scheduler address).
async fn create_interval_schedules(env: &BenchEnv, count: usize, every_ms: u64) -> Result<bool> {
    use tower::ServiceExt;
    let router = kairos_scheduler::local_api(&env.scheduler_config()).await?;
    for i in 0..count {
        // Phases spread over the interval, as schedules created at different
        // times are: 10,000 ticks on the same instant would measure a
        // 10,000-task burst (W1's subject), not the tick machinery.
        let start_at = (i as u64 * every_ms / count.max(1) as u64) as i64;
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

pub async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let env = BenchEnv::new("w5", &ctx.args.amqp_url, &ctx.args.redis_url).await?;
    let result = once(ctx, &env).await;
    env.cleanup().await;
    result
}

async fn once(ctx: &mut Ctx<'_>, env: &BenchEnv) -> Result<()> {
    let w = "W5 schedules";
    let (s, secs) = (ctx.args.w5_schedules, ctx.args.w5_secs);
    if !create_interval_schedules(env, s, 1_000).await? {
        for metric in ["ticks", "tick lateness p99", "double fires"] {
            ctx.report.push(Row::unavailable(w, metric, NOT_AVAILABLE));
        }
        return Ok(());
    }
    let rec = Recorder::default();
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker = InProcess::worker(
        Worker::new(env.worker_config())
            .with_builtins()
            .handler(kairos_worker::builtin::NOOP, rec.occurrence_handler()),
    );
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let seen = rec.seen();
    worker.stop().await;
    scheduler.stop().await;

    let l = &seen.lateness;
    let expected = s * secs as usize;
    // One second of slack at each end: the window does not start or stop
    // on a tick.
    let missed = expected.saturating_sub(seen.distinct + 2 * s);
    ctx.report.push(
        Row::new(w, "ticks", seen.distinct as f64 / secs as f64, "fires/s")
            .note(format!("{s} schedules every 1 s for {secs} s")),
    );
    ctx.report
        .push(Row::new(w, "tick lateness p99", percentile(l, 99.0) as f64, "ms").at_most(20.0));
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
