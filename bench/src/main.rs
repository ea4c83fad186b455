//! # kairos-bench
//!
//! Measures Kairos against the real Redis and RabbitMQ, next to the raw
//! RabbitMQ ceiling measured in the same run (and, with `--peers`, Celery
//! and BullMQ on the same servers). See docs/BENCHMARKS.md.
//!
//! * `baseline`: raw lapin publish / consume / both, classic and priority.
//! * `workloads`: W1 burst .. W6 idle cost, W7 HTTP enqueue, W8 big bodies,
//!   W9 shard ownership (1, 2, 3 schedulers), W10 split queue (1, 2, 3
//!   nodes), one module each.
//! * `target`: the single node, and with `--cluster` a RabbitMQ cluster and
//!   Redis Cluster with quorum queues (W1, W2, W10 run there too, each
//!   target against its own baseline).
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
mod target;
mod workloads;

use anyhow::{Context, Result};
use clap::Parser;
use kairos_shared::config::{Concurrency, DEFAULT_AMQP_URL, DEFAULT_REDIS_URL};
use report::{Report, Row};
use std::path::PathBuf;
use target::Target;
use workloads::{ClusterCtx, Ctx};

/// The cluster `scripts/cluster.sh up` starts with its default ports.
const CLUSTER_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f";
const CLUSTER_REDIS_URL: &str = "redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";

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
    /// Workloads to run, comma-separated (w1,w2,w3,w4,w5,w6,w7,w8,w9,w10);
    /// default all (w10 needs `--cluster`).
    #[arg(long, value_delimiter = ',')]
    pub(crate) only: Vec<String>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/results.json")]
    pub(crate) json: PathBuf,
    #[arg(long, env = "KAIROS_AMQP_URL", default_value = DEFAULT_AMQP_URL)]
    pub(crate) amqp_url: String,
    #[arg(long, env = "KAIROS_REDIS_URL", default_value = DEFAULT_REDIS_URL)]
    pub(crate) redis_url: String,
    /// Also run W1 and W2 on a RabbitMQ cluster and a Redis Cluster
    /// (`scripts/cluster.sh up`), beside the single node's rows and against
    /// a baseline measured on the cluster, and W10 (split queue over 1, 2,
    /// 3 nodes). Without it no cluster row runs.
    #[arg(long)]
    pub(crate) cluster: bool,
    /// The cluster's RabbitMQ nodes, comma-separated (the
    /// `KAIROS_AMQP_URL` that `scripts/cluster.sh env` prints).
    #[arg(long, env = "KAIROS_BENCH_CLUSTER_AMQP_URL", default_value = CLUSTER_AMQP_URL, hide_env_values = true)]
    pub(crate) cluster_amqp_url: String,
    /// The cluster's Redis (`redis+cluster://host:port,...`).
    #[arg(long, env = "KAIROS_BENCH_CLUSTER_REDIS_URL", default_value = CLUSTER_REDIS_URL, hide_env_values = true)]
    pub(crate) cluster_redis_url: String,
    /// The queue mode on the cluster.
    #[arg(long, env = "KAIROS_BENCH_CLUSTER_QUEUE_MODE", default_value = "quorum", value_parser = kairos_shared::config::parse_queue_mode)]
    pub(crate) cluster_queue_mode: kairos_shared::queue_mode::QueueMode,
    /// Messages through W10's split queue at each node count.
    #[arg(long, default_value_t = 60_000)]
    pub(crate) w10_messages: usize,
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
    /// A fixed worker prefetch in W2 (default: the worker's own, which
    /// follows its pool of task slots, 4 to 64).
    #[arg(long)]
    pub(crate) w2_prefetch: Option<u16>,
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
        self.w10_messages = 1_500;
    }

    /// The single node every workload runs on.
    fn single(&self) -> Result<Target> {
        Ok(Target {
            suffix: "",
            amqp_url: self.amqp_url.clone(),
            redis_url: self.redis_url.clone(),
            mode: kairos_shared::queue_mode::from_env().map_err(anyhow::Error::msg)?,
        })
    }

    /// The cluster, when `--cluster` is given.
    fn cluster_target(&self) -> Option<Target> {
        self.cluster.then(|| Target {
            suffix: match self.cluster_queue_mode {
                kairos_shared::queue_mode::QueueMode::Quorum => " (cluster, quorum)",
                kairos_shared::queue_mode::QueueMode::Classic => " (cluster, classic)",
            },
            amqp_url: self.cluster_amqp_url.clone(),
            redis_url: self.cluster_redis_url.clone(),
            mode: self.cluster_queue_mode,
        })
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
    let single = args.single()?;
    let cluster = match args.cluster_target() {
        Some(target) => Some(measure_cluster_baseline(&args, target, &mut report).await?),
        None => None,
    };
    let mut ctx = Ctx {
        args: &args,
        base,
        report: &mut report,
        single,
        cluster,
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

/// Raw lapin on one quorum queue of the cluster (leader on the first
/// node, where Kairos's own queues are declared too): the cluster rows'
/// baseline. Its rows go into `report`.
async fn measure_cluster_baseline(
    args: &Args,
    target: Target,
    report: &mut Report,
) -> Result<ClusterCtx> {
    println!(
        "baseline{}: raw lapin, {} messages on a {} queue",
        target.suffix, args.baseline_messages, target.mode
    );
    let mut env = env::BenchEnv::on("cbase", &target).await?;
    let kind = match target.mode {
        kairos_shared::queue_mode::QueueMode::Quorum => baseline::QueueKind::Quorum,
        kairos_shared::queue_mode::QueueMode::Classic => baseline::QueueKind::Priority,
    };
    let rates =
        baseline::measure_kind(&mut env, kind, args.baseline_messages, args.body_bytes).await;
    env.cleanup().await;
    let rates = rates.context("cluster baseline")?;
    for (metric, v) in [
        ("publish", rates.publish),
        ("consume", rates.consume),
        ("publish+consume", rates.concurrent),
    ] {
        report.push(
            Row::new(
                &target.name("baseline"),
                &format!("{metric} ({})", target.mode),
                v,
                "msg/s",
            )
            .note("one queue, leader on the first node; client connected to it"),
        );
    }
    Ok(ClusterCtx {
        target,
        base: rates,
    })
}

/// Runs the workloads `--only` selects, in order; a workload that fails
/// is a failed check, and the next one runs.
async fn run_workloads(args: &Args, ctx: &mut Ctx<'_>) {
    let steps: [(&str, &str); 9] = [
        ("w1", "W1 burst"),
        ("w2", "W2 precision"),
        ("w3", "W3 backlog + W6 idle"),
        ("w4", "W4 retry storm"),
        ("w5", "W5 schedules"),
        ("w7", "W7 HTTP enqueue"),
        ("w8", "W8 big bodies"),
        ("w9", "W9 shard ownership"),
        ("w10", "W10 split queue"),
    ];
    for (key, title) in steps {
        let run = match key {
            "w3" => args.wants("w3") || args.wants("w6"),
            // The broker's scaling over nodes: only on a cluster.
            "w10" => args.cluster && args.wants("w10"),
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
            "w10" => workloads::w10_split::run(ctx).await,
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
