//! Scheduler settings: environment variables, or the same as flags.

use crate::retry::{Jitter, RetryPolicy};
use clap::Parser;
use kairos_shared::config::{CommonConfig, DEFAULT_REDIS_URL};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Clone, Debug)]
#[command(
    name = "kairos-scheduler",
    version,
    about = "Kairos trigger service: the Redis delay queue, retries, and promotion to RabbitMQ"
)]
pub struct Config {
    #[command(flatten)]
    pub common: CommonConfig,

    /// Redis URL of the delay queue.
    #[arg(long, env = "KAIROS_REDIS_URL", value_name = "KAIROS_REDIS_URL", default_value = DEFAULT_REDIS_URL, value_parser = parse_redis_url)]
    pub redis_url: String,

    /// Address of the HTTP API.
    #[arg(
        long,
        env = "KAIROS_HTTP_ADDR",
        value_name = "KAIROS_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,

    /// Whether `http_addr` was asked for (flag or environment) rather than
    /// defaulted. When it was only defaulted and is taken (another scheduler
    /// on this host), the scheduler runs without its HTTP API instead of
    /// refusing to start; an address asked for must bind.
    #[arg(skip)]
    pub http_addr_required: bool,

    /// Delay-queue shards. Every scheduler of a namespace must use the same
    /// number; the first one to start records it.
    #[arg(long, env = "KAIROS_SHARDS", value_name = "KAIROS_SHARDS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub shards: u16,

    /// Tasks claimed per shard per round, and deliveries per intake batch.
    #[arg(long, env = "KAIROS_BATCH", value_name = "KAIROS_BATCH", default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=5000))]
    pub batch: u16,

    /// How long a claimed task may take to be published before another
    /// instance takes it back (ms).
    #[arg(long, env = "KAIROS_LEASE_MS", value_name = "KAIROS_LEASE_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub lease_ms: u64,

    /// Longest sleep of the pump when nothing wakes it (ms); bounds how late
    /// an expired lease is noticed.
    #[arg(long, env = "KAIROS_IDLE_MS", value_name = "KAIROS_IDLE_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub idle_ms: u64,

    /// Retries for tasks without an `x-max-retries` header.
    #[arg(
        long,
        env = "KAIROS_MAX_RETRIES",
        value_name = "KAIROS_MAX_RETRIES",
        default_value_t = 3
    )]
    pub max_retries: u32,

    /// Backoff ceiling of the first retry (ms); doubles per attempt.
    #[arg(
        long,
        env = "KAIROS_RETRY_BASE_MS",
        value_name = "KAIROS_RETRY_BASE_MS",
        default_value_t = 1_000
    )]
    pub retry_base_ms: u64,

    /// Longest backoff (ms).
    #[arg(
        long,
        env = "KAIROS_RETRY_MAX_MS",
        value_name = "KAIROS_RETRY_MAX_MS",
        default_value_t = 3_600_000
    )]
    pub retry_max_ms: u64,

    /// Backoff jitter: equal (ceiling/2 to ceiling), full (0 to ceiling), none.
    #[arg(
        long,
        env = "KAIROS_RETRY_JITTER",
        value_name = "KAIROS_RETRY_JITTER",
        value_enum,
        default_value = "equal"
    )]
    pub retry_jitter: Jitter,

    /// Unacked deliveries per intake consumer.
    #[arg(
        long,
        env = "KAIROS_INTAKE_PREFETCH",
        value_name = "KAIROS_INTAKE_PREFETCH",
        default_value_t = 1_000
    )]
    pub intake_prefetch: u16,

    /// Schedules to load at start and sync idempotently (TOML; see
    /// docs/SCHEDULES.md).
    #[arg(
        long,
        env = "KAIROS_SCHEDULE_FILE",
        value_name = "KAIROS_SCHEDULE_FILE"
    )]
    pub schedule_file: Option<PathBuf>,

    /// How long before its tick an occurrence is handed to the delay queue
    /// (ms): ticks then fire with the delay queue's precision. An occurrence
    /// handed over before an outage runs after it whatever the misfire
    /// policy, so the default stays short; with thousands of ticks a second
    /// on a loaded machine, a second leaves room for stalls (W5 of the
    /// benchmarks).
    #[arg(long, env = "KAIROS_SCHEDULE_LOOKAHEAD_MS", value_name = "KAIROS_SCHEDULE_LOOKAHEAD_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub schedule_lookahead_ms: u64,

    /// A schedule whose next tick is older than this (ms) is late. Its
    /// ticks from while no scheduler ran (the schedulers' heartbeat had
    /// stopped for longer than this) are missed, and its misfire policy
    /// applies; its ticks from while a scheduler ran all fire, late.
    #[arg(long, env = "KAIROS_SCHEDULE_GRACE_MS", value_name = "KAIROS_SCHEDULE_GRACE_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub schedule_grace_ms: u64,
}

impl Config {
    /// Defaults (ignoring the environment) for one namespace: for tests and
    /// programs that embed the scheduler.
    pub fn for_namespace(namespace: &str) -> Self {
        let mut c = Config::parse_from(["kairos-scheduler"]);
        c.common = CommonConfig::new(namespace);
        c.redis_url = DEFAULT_REDIS_URL.to_string();
        c
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            default_max_retries: self.max_retries,
            base_ms: self.retry_base_ms,
            max_ms: self.retry_max_ms.max(self.retry_base_ms),
            jitter: self.retry_jitter,
        }
    }
}

pub fn parse_redis_url(url: &str) -> Result<String, String> {
    // redis-rs turns certificate checks off for `rediss://...#insecure`;
    // Kairos is built without that ability, so say why at start rather
    // than fail at every connect.
    if url.ends_with("#insecure") {
        return Err(
            "`#insecure` (no certificate check) is not supported: trust the server's CA with KAIROS_TLS_CA_FILE"
                .into(),
        );
    }
    redis::Client::open(url)
        .map(|_| url.to_string())
        .map_err(|e| format!("not a Redis URL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_name_themselves() {
        let err = Config::try_parse_from(["s", "--shards", "0"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--shards"), "{err}");
        let err = Config::try_parse_from(["s", "--redis-url", "nope://x"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--redis-url"), "{err}");
        let err = Config::try_parse_from(["s", "--redis-url", "rediss://127.0.0.1:6380/#insecure"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("KAIROS_TLS_CA_FILE"), "{err}");
        let err = Config::try_parse_from(["s", "--retry-jitter", "x"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--retry-jitter"), "{err}");
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = Config::try_parse_from(["s"]).unwrap();
        assert_eq!(c.shards, 8);
        assert_eq!(c.max_retries, 3);
        assert_eq!(c.retry_jitter, Jitter::Equal);
    }
}
