//! Worker settings: environment variables, or the same as flags.

use clap::{CommandFactory, FromArgMatches, Parser};
use kairos_shared::config::{parse_queue_list, CommonConfig, Concurrency};

/// Time limit of an attempt without `x-timeout-ms`: 15 minutes. A handler
/// that hangs frees its slot by then; well below RabbitMQ's default
/// `consumer_timeout` (30 minutes), which would close the channel under an
/// unacked delivery and take every other running task of it along.
pub(crate) const DEFAULT_TASK_TIMEOUT_MS: u64 = 900_000;

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

    /// Unacked deliveries per queue; defaults to the maximum concurrency, so
    /// a later high-priority task waits behind at most that many prefetched
    /// lower ones. Raise it for throughput of very short tasks.
    #[arg(long, env = "KAIROS_PREFETCH", value_name = "KAIROS_PREFETCH", value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,

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
        c
    }

    /// Unacked deliveries per queue: `KAIROS_PREFETCH`, else the maximum
    /// concurrency.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
            .unwrap_or_else(|| u16::try_from(self.concurrency.max).unwrap_or(u16::MAX))
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
        assert_eq!(c.prefetch(), 64);
        assert_eq!(c.task_timeout_ms, 900_000);
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
