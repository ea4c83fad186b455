//! Celery and BullMQ on the same servers, run on demand (`--peers`).
//! Each peer is a script, bench/peers/NAME/run.sh, that installs what it
//! needs under target/peers on first use, runs W1 (a burst of noop tasks,
//! end to end) and W2(a) (tasks due 2 to 12 s ahead), and prints one JSON
//! object; this module turns it into rows of the same table.

use crate::report::Row;
use crate::workloads::Ctx;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
struct PeerResult {
    peer: String,
    version: String,
    w1: Vec<W1>,
    w2a: W2,
}

#[derive(Deserialize)]
struct W1 {
    /// Celery's worker pool (prefork, threads); BullMQ has none.
    pool: Option<String>,
    tasks: usize,
    ran: usize,
    e2e_per_s: f64,
}

#[derive(Deserialize)]
struct W2 {
    tasks: usize,
    lateness_ms: Lateness,
    lost: usize,
    duplicated: usize,
}

#[derive(Deserialize, Default)]
struct Lateness {
    p50: Option<f64>,
    p99: Option<f64>,
    #[serde(rename = "p99.9")]
    p999: Option<f64>,
    max: Option<f64>,
}

pub(crate) async fn run(ctx: &mut Ctx<'_>) {
    for peer in ["celery", "bullmq"] {
        println!(
            "peer {peer} (W1 {} tasks, W2(a) {} tasks)",
            ctx.args.peer_w1_tasks, ctx.args.peer_w2_tasks
        );
        match run_peer(ctx, peer).await {
            Ok(r) => add_rows(ctx, &r),
            Err(err) => {
                // A peer that cannot be installed or run is reported, not a
                // failure of Kairos's counts.
                println!("  peer {peer} did not run: {err:#}");
                ctx.report.push(Row::unavailable(
                    &format!("peer {peer}"),
                    "W1, W2(a)",
                    &format!("did not run: {err}"),
                ));
            }
        }
    }
}

async fn run_peer(ctx: &Ctx<'_>, peer: &str) -> Result<PeerResult> {
    let script = peers_dir().join(peer).join("run.sh");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(ctx.args.peer_w1_tasks.to_string())
        .arg(ctx.args.peer_w2_tasks.to_string())
        .env("KAIROS_AMQP_URL", &ctx.args.amqp_url)
        .env("KAIROS_REDIS_URL", &ctx.args.redis_url)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} exited with {}", script.display(), out.status);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let last = line.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("{peer} printed {last:?}"))
}

fn add_rows(ctx: &mut Ctx<'_>, r: &PeerResult) {
    let who = format!("{} {}", r.peer, r.version);
    let base = ctx.base.priority.concurrent;
    for w1 in &r.w1 {
        let pool = w1
            .pool
            .as_deref()
            .map(|p| format!(", {p} pool"))
            .unwrap_or_default();
        ctx.report.push(
            Row::new(
                &format!("W1 burst: {who}"),
                "end to end",
                w1.e2e_per_s,
                "tasks/s",
            )
            .ratio(base)
            .note(format!(
                "{} tasks{pool}, {} ran; x raw publish+consume, priority queue",
                w1.tasks, w1.ran
            )),
        );
    }
    let w = format!("W2a precision: {who}");
    let l = &r.w2a.lateness_ms;
    for (metric, v) in [
        ("lateness p50", l.p50),
        ("lateness p99", l.p99),
        ("lateness p99.9", l.p999),
        ("lateness max", l.max),
    ] {
        if let Some(v) = v {
            ctx.report.push(Row::new(&w, metric, v, "ms"));
        }
    }
    ctx.report.push(
        Row::new(&w, "lost", r.w2a.lost as f64, "tasks")
            .note(format!("{} tasks due 2-12 s ahead", r.w2a.tasks)),
    );
    ctx.report
        .push(Row::new(&w, "duplicated", r.w2a.duplicated as f64, "tasks"));
}

/// bench/peers, found from the crate's own directory (the bench runs from a
/// checkout).
fn peers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers")
}
