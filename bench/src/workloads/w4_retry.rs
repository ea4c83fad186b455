//! W4 retry storm: N `kairos.fail` tasks with `x-max-retries` 2 and a small
//! backoff, so each runs three times and then goes to `NS.dead`. The time is
//! from the first enqueue until all N are dead letters; then the dead
//! letters are drained and their ids counted: none lost, none twice.

use super::{body, enqueue_all, Ctx};
use crate::env::BenchEnv;
use crate::report::Row;
use crate::service::InProcess;
use anyhow::Result;
use futures_util::StreamExt;
use kairos_shared::client::{Client, NewTask};
use kairos_worker::Worker;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Backoff ceiling of the first retry; the second waits up to twice that.
const RETRY_BASE_MS: u64 = 100;

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let env = BenchEnv::new("w4", &ctx.args.amqp_url, &ctx.args.redis_url).await?;
    let result = once(ctx, &env).await;
    env.cleanup().await;
    result
}

async fn once(ctx: &mut Ctx<'_>, env: &BenchEnv) -> Result<()> {
    let n = ctx.args.w4_tasks;
    let mut sconfig = env.scheduler_config();
    sconfig.retry_base_ms = RETRY_BASE_MS;
    let scheduler = InProcess::scheduler(sconfig);
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());
    let client = Arc::new(Client::connect(&env.amqp_url, &env.ns).await?);
    tokio::time::sleep(super::SERVICE_SETTLE).await;

    let bytes = ctx.args.body_bytes;
    let t0 = Instant::now();
    let sent = enqueue_all(&client, n, |_| {
        NewTask::new(kairos_worker::builtin::FAIL)
            .max_retries(2)
            .body(body(bytes))
    })
    .await?;
    let dead_queue = env.names.dead();
    let deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 100);
    let mut dead = 0;
    while Instant::now() < deadline {
        dead = env.queue_depth(&dead_queue).await?;
        if dead as usize >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    worker.stop().await;
    scheduler.stop().await;
    if let Ok(c) = Arc::try_unwrap(client) {
        let _ = c.close().await;
    }

    let ids = drain_ids(env, &dead_queue, dead as usize).await?;
    let distinct = ids.len();
    let twice = ids.values().filter(|&&c| c > 1).count();
    let lost = n.saturating_sub(distinct);
    let pending = env.pending().await?;
    let w = "W4 retry storm";
    ctx.report
        .push(Row::new(w, "all dead after", secs, "s").note(format!(
        "{n} tasks x 3 attempts ({:.0} attempts/s); backoff base {RETRY_BASE_MS} ms, equal jitter",
        (3 * n) as f64 / secs
    )));
    ctx.report
        .push(Row::new(w, "lost", lost as f64, "tasks").at_most(0.0));
    ctx.report
        .push(Row::new(w, "dead-lettered twice", twice as f64, "tasks"));
    ctx.report.check(
        sent == n && lost == 0 && pending == 0,
        format!("W4: {n} enqueued, {sent} confirmed, {distinct} distinct dead letters, {pending} still pending"),
    );
    Ok(())
}

/// Takes `n` messages off a queue (auto-ack) and counts them per task id.
async fn drain_ids(env: &BenchEnv, queue: &str, n: usize) -> Result<HashMap<String, u32>> {
    let (ch, mut consumer) = env.consume_no_ack(queue).await?;
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
            Ok(Some(Ok(d))) => {
                *ids.entry(kairos_shared::admin::message_id(&d.properties))
                    .or_default() += 1;
                got += 1;
            }
            _ => break,
        }
    }
    let _ = ch.close(200, "drained".into()).await;
    Ok(ids)
}
