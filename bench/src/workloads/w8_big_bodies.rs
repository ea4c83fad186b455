//! W8 big bodies: N tasks of B bytes each (default 500 of 5 MB) wait in
//! `NS.delay` as a backlog; then the real `kairos-scheduler` binary starts
//! and moves them (the Redis delay queue, `NS.tasks`) to an in-process
//! worker. The row is the scheduler's peak memory (VmHWM from
//! /proc/PID/status) against the bytes that passed. A backlog is the worst
//! case: the broker hands the intake as many deliveries as its prefetch
//! allows at once. The intake prefetch, intake batches and claims are
//! bounded by bytes, so the peak stays near a few batches' worth however
//! many bodies wait (with the count-only prefetch of 1,000, all of them).

use super::{body, Ctx};
use crate::env::BenchEnv;
use crate::report::Row;
use crate::service::{InProcess, Proc};
use anyhow::{Context, Result};
use kairos_shared::client::{Client, NewTask};
use kairos_worker::{TaskContext, Worker};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The task W8 runs: its handler counts ids and checks the body size.
const TASK: &str = "bench.big";

/// Tasks whose publishes are in flight together: the bench itself must
/// not hold hundreds of bodies either.
const WINDOW: usize = 4;

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let env = BenchEnv::new("w8", &ctx.args.amqp_url, &ctx.args.redis_url).await?;
    let result = once(ctx, &env).await;
    env.cleanup().await;
    result
}

async fn once(ctx: &mut Ctx<'_>, env: &BenchEnv) -> Result<()> {
    let (n, size) = (ctx.args.w8_tasks, ctx.args.w8_body_bytes);
    // The body cap must admit the bodies; every other limit is default.
    let cap = (size + 1024 * 1024).max(kairos_shared::limits::DEFAULT_MAX_BODY_BYTES);
    let vars = vec![
        ("KAIROS_NAMESPACE", env.ns.clone()),
        ("KAIROS_AMQP_URL", env.amqp_url.clone()),
        ("KAIROS_REDIS_URL", env.redis_url.clone()),
        ("KAIROS_HTTP_ADDR", "127.0.0.1:0".into()),
        ("KAIROS_MAX_BODY_BYTES", cap.to_string()),
        ("RUST_LOG", "warn".into()),
    ];
    // The backlog first, with no scheduler running.
    let client = Client::connect(&env.amqp_url, &env.ns).await?;
    let payload = body(size);
    for from in (0..n).step_by(WINDOW) {
        let chunk: Vec<NewTask> = (from..(from + WINDOW).min(n))
            .map(|_| NewTask::new(TASK).delay_ms(0).body(payload.clone()))
            .collect();
        client.enqueue_many(&chunk).await?;
    }
    drop(payload);
    // Counted by the handler: a queue depth does not count the deliveries
    // an intake holds unacked, so "all queues empty" can be true while the
    // whole backlog sits in the scheduler's memory.
    let ran: Arc<Mutex<HashSet<String>>> = Arc::default();
    let wrong_size = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (ran, wrong_size) = (ran.clone(), wrong_size.clone());
        move |ctx: TaskContext, body: Vec<u8>| {
            if body.len() != size {
                wrong_size.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut ran) = ran.lock() {
                ran.insert(ctx.id.clone());
            }
            async { Ok(()) }
        }
    };
    let worker = InProcess::worker(Worker::new(env.worker_config()).handler(TASK, handler));
    let t0 = Instant::now();
    let scheduler = Proc::spawn("kairos-scheduler", &vars)?;
    let pid = scheduler.pid();
    let mut peak_rss = 0;
    let deadline = Instant::now() + Duration::from_secs(120 + n as u64);
    let count = || ran.lock().map(|r| r.len()).unwrap_or(0);
    while Instant::now() < deadline && count() < n {
        peak_rss = peak_rss.max(vm_kib(pid, "VmRSS:")?);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = n - count().min(n);
    let secs = t0.elapsed().as_secs_f64();
    let hwm = vm_kib(pid, "VmHWM:")?;
    let dead = env.queue_depth(&env.names.dead()).await?;
    worker.stop().await;
    scheduler.terminate(Duration::from_secs(10)).await;
    let _ = client.close().await;

    let w = "W8 big bodies";
    let mib = |kib: u64| kib as f64 / 1024.0;
    let passed = (n * size) as f64 / (1024.0 * 1024.0);
    ctx.report.push(
        Row::new(w, "scheduler peak RSS (VmHWM)", mib(hwm), "MiB").note(format!(
            "a backlog of {n} bodies of {size} B ({passed:.0} MiB) drained in {secs:.1} s; sampled peak VmRSS {:.0} MiB",
            mib(peak_rss)
        )),
    );
    ctx.report.check(
        left == 0,
        format!("W8: all {n} big tasks ran ({left} left)"),
    );
    let wrong = wrong_size.load(Ordering::Relaxed);
    ctx.report.check(
        wrong == 0,
        format!("W8: every body arrived whole ({wrong} did not)"),
    );
    ctx.report
        .check(dead == 0, format!("W8: no big task dead-lettered ({dead})"));
    Ok(())
}

/// A `Vm*:` line of /proc/PID/status, in KiB.
fn vm_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}
