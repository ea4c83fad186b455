//! # kairos-bench
//!
//! Measures Kairos against the real Redis and RabbitMQ, next to the raw
//! RabbitMQ ceiling measured in the same run (and, with `--peers`, Celery
//! and BullMQ on the same servers). See docs/BENCHMARKS.md.
//!
//! * `baseline`: raw lapin publish / consume / both, classic and priority.
//! * `workloads`: W1 burst .. W6 idle cost, W7 HTTP enqueue, W8 big bodies,
//!   W9 shard ownership (1, 2, 3 schedulers), one module each.
//! * `peers`: runs bench/peers/{celery,bullmq} and reads their JSON.
//! * `report`: rows, the table, the JSON file; count checks fail the run.
//! * `env`, `service`, `recorder`: namespaces, embedded services, the
//!   recording handler.

mod baseline;
mod env;
mod peers;
mod recorder;
mod report;
mod service;
mod workloads;

use anyhow::{Context, Result};
use clap::Parser;
use kairos_shared::config::{Concurrency, DEFAULT_AMQP_URL, DEFAULT_REDIS_URL};
use report::{Report, Row};
use std::path::PathBuf;
use workloads::Ctx;

/// The allocator of the `kairos-scheduler` and `kairos-worker` binaries, so
/// the services embedded here allocate as they do in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "kairos-bench",
    about = "Kairos benchmarks against raw RabbitMQ, Celery and BullMQ"
)]
pub(crate) struct Args {
    /// Every workload at a tiny size, for CI: checks counts, not timings.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Also run Celery and BullMQ (installs them under target/ on first use).
    #[arg(long)]
    pub(crate) peers: bool,
    /// Workloads to run, comma-separated (w1,w2,w3,w4,w5,w6,w7,w8,w9); default all.
    #[arg(long, value_delimiter = ',')]
    pub(crate) only: Vec<String>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/results.json")]
    pub(crate) json: PathBuf,
    #[arg(long, env = "KAIROS_AMQP_URL", default_value = DEFAULT_AMQP_URL)]
    pub(crate) amqp_url: String,
    #[arg(long, env = "KAIROS_REDIS_URL", default_value = DEFAULT_REDIS_URL)]
    pub(crate) redis_url: String,
    /// Body of every task and baseline message, bytes.
    #[arg(long, default_value_t = 100)]
    pub(crate) body_bytes: usize,
    /// Messages per baseline measurement.
    #[arg(long, default_value_t = 50_000)]
    pub(crate) baseline_messages: usize,
    #[arg(long, default_value_t = 100_000)]
    pub(crate) w1_tasks: usize,
    /// Worker concurrency in W1 (`N` or `MIN..MAX`).
    #[arg(long, default_value = "64")]
    pub(crate) w1_concurrency: Concurrency,
    /// Worker prefetch in W1.
    #[arg(long, default_value_t = 300)]
    pub(crate) w1_prefetch: u16,
    #[arg(long, default_value_t = 5_000)]
    pub(crate) w2a_tasks: usize,
    #[arg(long, default_value_t = 20_000)]
    pub(crate) w2b_tasks: usize,
    /// Pending tasks in the W3 backlog (also W6's backlog).
    #[arg(long, default_value_t = 1_000_000)]
    pub(crate) w3_pending: usize,
    /// Tasks that fall due at once in W3's promotion.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) w3_burst: usize,
    #[arg(long, default_value_t = 10_000)]
    pub(crate) w4_tasks: usize,
    /// Interval schedules in W5 (each fires every second).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) w5_schedules: usize,
    /// Seconds W5 lets the schedules fire.
    #[arg(long, default_value_t = 30)]
    pub(crate) w5_secs: u64,
    /// Scheduler processes W9 runs W5's schedules with, one count after
    /// the other (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3", value_parser = clap::value_parser!(u64).range(1..=16))]
    pub(crate) schedulers: Vec<u64>,
    /// Seconds W6 measures the idle processes.
    #[arg(long, default_value_t = 10)]
    pub(crate) w6_secs: u64,
    /// Tasks W7 enqueues over HTTP (32 concurrent clients).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) http_tasks: usize,
    /// Tasks in W8 (big bodies through the scheduler).
    #[arg(long, default_value_t = 500)]
    pub(crate) w8_tasks: usize,
    /// Body size of each W8 task (bytes).
    #[arg(long, default_value_t = 5_000_000)]
    pub(crate) w8_body_bytes: usize,
    /// Task status (KAIROS_STATUS) in W1 and W2: `on`, `off`, or `both`
    /// (each variant in a namespace of its own, in the same run, so the
    /// cost of status is read within one run).
    #[arg(long, value_enum, default_value = "both")]
    pub(crate) status: StatusMode,
    /// Tasks per peer in W1 (the peers' published figure is for 20,000).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) peer_w1_tasks: usize,
    /// Tasks per peer in W2(a).
    #[arg(long, default_value_t = 5_000)]
    pub(crate) peer_w2_tasks: usize,
}

/// Which task-status variants W1 and W2 run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StatusMode {
    /// Status on only (the default setting).
    On,
    /// Status off only.
    Off,
    /// Both, off first.
    Both,
}

impl StatusMode {
    /// The `KAIROS_STATUS` values to run, in order.
    pub(crate) fn variants(self) -> &'static [bool] {
        match self {
            StatusMode::On => &[true],
            StatusMode::Off => &[false],
            StatusMode::Both => &[false, true],
        }
    }
}

/// `on` or `off`, for labels.
pub(crate) fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

impl Args {
    /// `--quick` sizes: every path runs, in well under a minute.
    fn shrink(&mut self) {
        self.baseline_messages = 2_000;
        self.w1_tasks = 2_000;
        self.w2a_tasks = 200;
        self.w2b_tasks = 500;
        self.w3_pending = 2_000;
        self.w3_burst = 1_000;
        self.w4_tasks = 200;
        self.w5_schedules = 50;
        self.w5_secs = 3;
        // Two counts show the split; a third adds time, not coverage.
        self.schedulers.truncate(2);
        self.w6_secs = 2;
        self.http_tasks = 640;
        self.w8_tasks = 20;
        self.peer_w1_tasks = 500;
        self.peer_w2_tasks = 100;
    }

    fn wants(&self, w: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o.eq_ignore_ascii_case(w))
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    init_logging();
    let mut args = Args::parse();
    if args.quick {
        args.shrink();
    }
    let mut report = Report::default();
    report.machine = report::machine(&args).await;
    println!(
        "kairos-bench on {} CPUs, RabbitMQ {}, Redis {}",
        report.machine.cpus, report.machine.rabbitmq, report.machine.redis
    );
    let base = measure_baseline(&args, &mut report).await?;
    let mut ctx = Ctx {
        args: &args,
        base,
        report: &mut report,
    };
    run_workloads(&args, &mut ctx).await;
    if args.peers {
        println!("peers");
        peers::run(&mut ctx).await;
    }
    write_results(&args, &report)?;
    // The plain closing line CI runners read: count checks, not timings.
    let failed = report.failures.len();
    println!(
        "kairos-bench: {} passed, {failed} failed",
        report.checks - failed
    );
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Logs warnings, with the expected noise off. Failing tasks log a warning
/// per attempt and an error per dead letter: W4 makes tens of thousands on
/// purpose. lapin logs an error for every channel closed while its
/// consumer is still registered, which each workload does on purpose when
/// it ends. RUST_LOG overrides.
fn init_logging() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| {
        "warn,kairos_worker::disposition=off,kairos_scheduler::delay::intake=off,lapin::channels=off"
            .into()
    });
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .init();
}

/// Raw lapin on a classic and a priority queue: what every workload is
/// compared with. Its rows go into `report`.
async fn measure_baseline(args: &Args, report: &mut Report) -> Result<baseline::Baseline> {
    println!(
        "baseline: raw lapin, {} persistent {}-byte messages, confirms window {}, prefetch {}",
        args.baseline_messages,
        args.body_bytes,
        baseline::CONFIRM_WINDOW,
        baseline::PREFETCH
    );
    let mut env = env::BenchEnv::new("base", &args.amqp_url, &args.redis_url).await?;
    let base = baseline::measure(&mut env, args.baseline_messages, args.body_bytes).await;
    env.cleanup().await;
    let base = base.context("baseline")?;
    for (kind, r) in [
        ("classic", base.classic),
        ("x-max-priority 9", base.priority),
    ] {
        for (metric, v) in [
            ("publish", r.publish),
            ("consume", r.consume),
            ("publish+consume", r.concurrent),
        ] {
            report.push(Row::new(
                "baseline",
                &format!("{metric} ({kind})"),
                v,
                "msg/s",
            ));
        }
    }
    Ok(base)
}

/// Runs the workloads `--only` selects, in order; a workload that fails
/// is a failed check, and the next one runs.
async fn run_workloads(args: &Args, ctx: &mut Ctx<'_>) {
    let steps: [(&str, &str); 8] = [
        ("w1", "W1 burst"),
        ("w2", "W2 precision"),
        ("w3", "W3 backlog + W6 idle"),
        ("w4", "W4 retry storm"),
        ("w5", "W5 schedules"),
        ("w7", "W7 HTTP enqueue"),
        ("w8", "W8 big bodies"),
        ("w9", "W9 shard ownership"),
    ];
    for (key, title) in steps {
        let run = match key {
            "w3" => args.wants("w3") || args.wants("w6"),
            k => args.wants(k),
        };
        if !run {
            continue;
        }
        println!("{title}");
        let result = match key {
            "w1" => workloads::w1_burst::run(ctx).await,
            "w2" => workloads::w2_precision::run(ctx).await,
            "w3" => workloads::w3_backlog::run(ctx, args.wants("w3"), args.wants("w6")).await,
            "w4" => workloads::w4_retry::run(ctx).await,
            "w7" => workloads::w7_http::run(ctx).await,
            "w8" => workloads::w8_big_bodies::run(ctx).await,
            "w9" => workloads::w9_shards::run(ctx).await,
            _ => workloads::w5_schedules::run(ctx).await,
        };
        if let Err(err) = result {
            ctx.report.check(false, format!("{title} failed: {err:#}"));
        }
    }
}

/// Prints the table, writes the JSON results, and lists the failures.
fn write_results(args: &Args, report: &Report) -> Result<()> {
    println!("\n{}", report.table());
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("results: {}", args.json.display());
    for f in &report.failures {
        eprintln!("FAILED: {f}");
    }
    Ok(())
}
