//! Worker settings: environment variables, or the same as flags.

use clap::{CommandFactory, FromArgMatches, Parser};
use kairos_shared::config::{parse_queue_list, CommonConfig, Concurrency, DEFAULT_REDIS_URL};
use kairos_shared::contract::MAX_COST;
use kairos_shared::redis::{check_redis_url, redis_url_parser};
use kairos_shared::secrets::read_secret_file;
use kairos_shared::status::StatusSettings;
use std::path::PathBuf;

/// Time limit of an attempt without `x-timeout-ms`: 15 minutes. A handler
/// that hangs frees its slot by then; well below RabbitMQ's default
/// `consumer_timeout` (30 minutes), which would close the channel under an
/// unacked delivery and take every other running task of it along.
pub(crate) const DEFAULT_TASK_TIMEOUT_MS: u64 = 900_000;

/// How long a task waiting for resource units lets lighter ones overtake
/// it: long enough for a stream of light tasks to keep a worker busy while
/// a heavy one waits for its turn, short beside a heavy task's own run.
pub(crate) const DEFAULT_CAPACITY_RESERVE_MS: u64 = 1_000;

/// Every setting of the worker, from flags or the environment.
#[derive(Parser, Clone, Debug)]
#[command(
    long_about = None,
    name = "kairos-worker",
    version,
    about = "Kairos worker: runs tasks from RabbitMQ priority queues"
)]
pub struct Config {
    /// The settings every Kairos process shares.
    #[command(flatten)]
    pub common: CommonConfig,

    /// Logical queues to consume, comma-separated.
    #[arg(long, env = "KAIROS_QUEUES", value_name = "KAIROS_QUEUES", default_value = "default", value_parser = parse_queue_list)]
    pub queues: std::vec::Vec<String>,

    /// Tasks run at once: `N`, or `MIN..MAX` to scale with the backlog.
    #[arg(
        long,
        env = "KAIROS_CONCURRENCY",
        value_name = "KAIROS_CONCURRENCY",
        default_value = "4..64"
    )]
    pub concurrency: Concurrency,

    /// Unacked deliveries per queue, fixed. Unset (the default), the
    /// prefetch follows the pool of task slots: its size plus a quarter (at
    /// least 2), at most the maximum concurrency, so a worker does not hoard
    /// deliveries another worker could run. Set it for throughput of very
    /// short tasks on a worker that has its queue to itself.
    #[arg(long, env = "KAIROS_PREFETCH", value_name = "KAIROS_PREFETCH", value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,

    /// Resource units this worker has: a task holds its `x-cost` of them
    /// while it runs and starts only when that fits in what is free; a task
    /// costing more is dead-lettered. Defaults to the maximum concurrency
    /// (with the default cost of 1, only the concurrency limits).
    #[arg(long, env = "KAIROS_CAPACITY", value_name = "KAIROS_CAPACITY", value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_COST)))]
    pub capacity: Option<u32>,

    /// How long a task waiting for units lets lighter tasks start ahead of
    /// it (ms); after that the units are kept for it. 0: strictly first in,
    /// first out.
    #[arg(long, env = "KAIROS_CAPACITY_RESERVE_MS", value_name = "KAIROS_CAPACITY_RESERVE_MS", default_value_t = DEFAULT_CAPACITY_RESERVE_MS, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub capacity_reserve_ms: u64,

    /// Quorum mode, queues with priority bands: a lower band that has had a
    /// delivery waiting while this many starts went to higher bands gets
    /// the next start. Under a full backlog the high band gets about N
    /// starts in N + 2, the middle and low bands about one each.
    #[arg(long, env = "KAIROS_BAND_STARVATION_LIMIT", value_name = "KAIROS_BAND_STARVATION_LIMIT", default_value_t = crate::bands::DEFAULT_STARVATION_LIMIT, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub band_starvation_limit: u32,

    /// Time running tasks get to finish after SIGTERM/SIGINT (ms); what is
    /// still running then is left unacked for RabbitMQ to redeliver.
    #[arg(
        long,
        env = "KAIROS_SHUTDOWN_GRACE_MS",
        value_name = "KAIROS_SHUTDOWN_GRACE_MS",
        default_value_t = 30_000
    )]
    pub shutdown_grace_ms: u64,

    /// Time limit of one attempt when a task has no `x-timeout-ms` (ms);
    /// an attempt that runs out is a failed attempt (retried while retries
    /// remain).
    #[arg(long, env = "KAIROS_TASK_TIMEOUT_MS", value_name = "KAIROS_TASK_TIMEOUT_MS", default_value_t = DEFAULT_TASK_TIMEOUT_MS, value_parser = clap::value_parser!(u64).range(1..))]
    pub task_timeout_ms: u64,

    /// Bounds on handlers' results and checkpoints.
    #[command(flatten)]
    pub handler_limits: kairos_shared::limits::HandlerLimits,

    /// Redis URL: task status, checkpoints and results (the scheduler's
    /// Redis). A worker whose Redis is down still runs tasks; their status
    /// is not recorded meanwhile. Shown with its password masked.
    #[arg(long, env = "KAIROS_REDIS_URL", value_name = "KAIROS_REDIS_URL", default_value = DEFAULT_REDIS_URL, value_parser = redis_url_parser(), hide_env_values = true)]
    pub redis_url: String,

    /// A file holding the Redis URL (a mounted secret), instead of
    /// KAIROS_REDIS_URL.
    #[arg(
        long,
        env = "KAIROS_REDIS_URL_FILE",
        value_name = "KAIROS_REDIS_URL_FILE",
        conflicts_with = "redis_url"
    )]
    pub redis_url_file: Option<PathBuf>,

    /// Longest wait for a Redis reply or connection (ms).
    #[arg(long, env = "KAIROS_REDIS_TIMEOUT_MS", value_name = "KAIROS_REDIS_TIMEOUT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub redis_timeout_ms: u64,

    /// This worker's name in task statuses (`worker`); `HOST:PID` when
    /// unset.
    #[arg(long, env = "KAIROS_WORKER_ID", value_name = "KAIROS_WORKER_ID")]
    pub worker_id: Option<String>,

    /// Where to serve `/healthz`, `/readyz` and `/metrics` (HTTP, no
    /// token: keep it on loopback or the pod network); unset, no listener.
    #[arg(
        long,
        env = "KAIROS_WORKER_HTTP_ADDR",
        value_name = "KAIROS_WORKER_HTTP_ADDR"
    )]
    pub http_addr: Option<std::net::SocketAddr>,

    /// Task status settings (`KAIROS_STATUS`, `KAIROS_STATUS_TTL_S`).
    #[command(flatten)]
    pub status: StatusSettings,
}

impl Config {
    /// Every setting at its default, reading no environment variable
    /// (clap's `env` fallbacks are switched off).
    fn defaults() -> Self {
        let command = Config::command().mut_args(|arg| arg.env(None));
        let matches = command.get_matches_from(["kairos-worker"]);
        // The defaults are constants of this file: a unit test parses them.
        Config::from_arg_matches(&matches)
            .unwrap_or_else(|e| panic!("the default settings do not parse: {e}"))
    }

    /// Defaults (ignoring the environment) for one namespace: for tests and
    /// programs that embed the worker.
    pub fn for_namespace(namespace: &str) -> Self {
        let mut c = Config::defaults();
        c.common = CommonConfig::new(namespace);
        c.queues = vec!["default".into()];
        c.concurrency = Concurrency { min: 4, max: 64 };
        c.prefetch = None;
        c.task_timeout_ms = DEFAULT_TASK_TIMEOUT_MS;
        c.redis_url = DEFAULT_REDIS_URL.to_string();
        c.redis_url_file = None;
        c.worker_id = None;
        c.http_addr = None;
        c.status = StatusSettings::default();
        c
    }

    /// Takes the settings given as files (`KAIROS_AMQP_URL_FILE`,
    /// `KAIROS_REDIS_URL_FILE`) in. Call it once after parsing.
    pub fn read_secret_files(&mut self) -> Result<(), String> {
        self.common.read_secret_files()?;
        if let Some(path) = &self.redis_url_file {
            self.redis_url = read_secret_file("KAIROS_REDIS_URL_FILE", path, check_redis_url)?;
        }
        Ok(())
    }

    /// This worker's name in task statuses: `KAIROS_WORKER_ID`, else
    /// `HOST:PID`.
    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|h| h.trim().to_string())
                })
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "worker".into());
            format!("{host}:{}", std::process::id())
        })
    }

    /// Resource units: `KAIROS_CAPACITY`, else the maximum concurrency.
    pub fn capacity(&self) -> u32 {
        self.capacity.unwrap_or_else(|| {
            u32::try_from(self.concurrency.max)
                .unwrap_or(MAX_COST)
                .min(MAX_COST)
        })
    }

    /// The fixed prefetch per queue (`KAIROS_PREFETCH`); `None` when it
    /// follows the pool.
    pub fn prefetch(&self) -> Option<u16> {
        self.prefetch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_concurrency_names_the_setting() {
        let err = Config::try_parse_from(["w", "--concurrency", "ten"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--concurrency"), "{err}");
    }

    #[test]
    fn defaults() {
        let c = Config::try_parse_from(["w"]).unwrap();
        assert_eq!(c.queues, vec!["default"]);
        assert_eq!(c.concurrency, Concurrency { min: 4, max: 64 });
        assert_eq!(c.prefetch(), None, "the prefetch follows the pool");
        assert_eq!(c.task_timeout_ms, 900_000);
        assert_eq!(c.redis_url, DEFAULT_REDIS_URL);
        assert!(c.status.status);
        assert!(c.worker_id().contains(':'));
        assert_eq!(c.http_addr, None);
    }

    #[test]
    fn a_bad_http_address_names_the_setting() {
        let err = Config::try_parse_from(["w", "--http-addr", "localhost"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("KAIROS_WORKER_HTTP_ADDR"), "{err}");
    }

    #[test]
    fn capacity_defaults_and_checks() {
        let c = Config::try_parse_from(["w"]).unwrap();
        assert_eq!(c.capacity(), 64, "the maximum concurrency");
        assert_eq!(c.capacity_reserve_ms, 1_000);
        assert_eq!(c.band_starvation_limit, 8);
        let c = Config::try_parse_from(["w", "--concurrency", "2..8", "--capacity", "3"]).unwrap();
        assert_eq!(c.capacity(), 3);
    }

    #[test]
    fn bad_capacity_names_the_setting() {
        for bad in ["0", "-1", "four", "1000001"] {
            let err = Config::try_parse_from(["w", &format!("--capacity={bad}")])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("KAIROS_CAPACITY"), "{bad}: {err}");
        }
        let err = Config::try_parse_from(["w", "--capacity-reserve-ms", "soon"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("KAIROS_CAPACITY_RESERVE_MS"), "{err}");
    }
    #[test]
    fn a_bad_band_starvation_limit_names_the_setting() {
        for bad in ["0", "-1", "many", "10001"] {
            let err = Config::try_parse_from(["w", &format!("--band-starvation-limit={bad}")])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("KAIROS_BAND_STARVATION_LIMIT"), "{bad}: {err}");
        }
        let c = Config::try_parse_from(["w", "--band-starvation-limit", "1"]).unwrap();
        assert_eq!(c.band_starvation_limit, 1);
    }

    #[test]
    fn for_namespace_ignores_the_environment() {
        // No other unit test of this crate looks at shutdown_grace_ms.
        std::env::set_var("KAIROS_SHUTDOWN_GRACE_MS", "1234");
        let embedded = Config::for_namespace("ns");
        let parsed = Config::try_parse_from(["x"]).unwrap();
        std::env::remove_var("KAIROS_SHUTDOWN_GRACE_MS");
        assert_eq!(parsed.shutdown_grace_ms, 1234, "the variable is set");
        assert_eq!(embedded.shutdown_grace_ms, 30_000);
        assert_eq!(embedded.common.namespace, "ns");
    }
}
