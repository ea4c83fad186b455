//! Scheduler settings: environment variables, or the same as flags.

use crate::delay::retry::{Jitter, RetryPolicy};
use clap::builder::BoolishValueParser;
use clap::{CommandFactory, FromArgMatches, Parser};
use kairos_shared::config::{CommonConfig, DEFAULT_REDIS_URL};
use kairos_shared::contract::MAX_RETRIES_CAP;
use kairos_shared::limits::{
    Limits, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_DELAY_MS, DEFAULT_MAX_HEADER_BYTES,
};
use kairos_shared::secrets::{read_secret_file, Secret, SecretParser, MASK};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The shortest API token accepted: a short one can be guessed.
pub const MIN_TOKEN_LEN: usize = 16;

/// Every setting of the scheduler, from flags or the environment.
#[derive(Parser, Clone, Debug)]
#[command(
    long_about = None,
    name = "kairos-scheduler",
    version,
    about = "Kairos trigger service: the Redis delay queue, retries, and promotion to RabbitMQ"
)]
pub struct Config {
    /// The settings every Kairos process shares.
    #[command(flatten)]
    pub common: CommonConfig,

    /// Redis URL of the delay queue. Shown with its password masked
    /// wherever it appears.
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

    /// Bearer token the HTTP API requires on every route but `/healthz` and
    /// `/readyz` (at least 16 characters). Without it the API is open, and
    /// may then listen only on a loopback address.
    #[arg(long, env = "KAIROS_API_TOKEN", value_name = "KAIROS_API_TOKEN", value_parser = token_parser(), hide_env_values = true)]
    pub api_token: Option<Secret>,

    /// A file holding the API token, instead of KAIROS_API_TOKEN.
    #[arg(
        long,
        env = "KAIROS_API_TOKEN_FILE",
        value_name = "KAIROS_API_TOKEN_FILE",
        conflicts_with = "api_token"
    )]
    pub api_token_file: Option<PathBuf>,

    /// Serve the API without a token on a non-loopback address (true/false):
    /// only behind something else that authenticates.
    #[arg(long, env = "KAIROS_API_INSECURE", value_name = "KAIROS_API_INSECURE", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub api_insecure: bool,

    /// Longest wait for a Redis reply (ms), for every command and script.
    /// A reply that does not come in time leaves the outcome unknown (the
    /// script may have run): every caller then repeats it idempotently. Well
    /// above the client's 500 ms default, so a Redis stalled for a second
    /// (a fork, a slow disk, a big key's deletion) is waited for instead of
    /// turned into retries.
    #[arg(long, env = "KAIROS_REDIS_TIMEOUT_MS", value_name = "KAIROS_REDIS_TIMEOUT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub redis_timeout_ms: u64,

    /// Run even when Redis's `maxmemory-policy` may evict keys (true/false).
    /// An evicting policy deletes held tasks at maxmemory; by default the
    /// scheduler refuses to start on anything but `noeviction`.
    #[arg(long, env = "KAIROS_REDIS_ALLOW_EVICTION", value_name = "KAIROS_REDIS_ALLOW_EVICTION", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub redis_allow_eviction: bool,

    /// Redis replicas that must have an intake batch (Redis `WAIT`) before
    /// it is acked to RabbitMQ; 0 acks once the primary has it.
    #[arg(long, env = "KAIROS_REDIS_WAIT", value_name = "KAIROS_REDIS_WAIT", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=64))]
    pub redis_wait: u16,

    /// How long one `WAIT` for `KAIROS_REDIS_WAIT` replicas blocks (ms).
    /// When fewer replicas confirm, the batch stays unacked and the wait is
    /// repeated.
    #[arg(long, env = "KAIROS_REDIS_WAIT_TIMEOUT_MS", value_name = "KAIROS_REDIS_WAIT_TIMEOUT_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub redis_wait_timeout_ms: u64,

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

    /// How long a scheduler's lease on a shard lasts (ms): schedulers
    /// split the shards between them, renew their leases every third of
    /// this, and take over a dead instance's shards once its leases expire
    /// (within this plus a third of it).
    #[arg(long, env = "KAIROS_SHARD_LEASE_MS", value_name = "KAIROS_SHARD_LEASE_MS", default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(300..=600_000))]
    pub shard_lease_ms: u64,

    /// Longest sleep of the pump when nothing wakes it (ms); bounds how late
    /// an expired lease is noticed.
    #[arg(long, env = "KAIROS_IDLE_MS", value_name = "KAIROS_IDLE_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub idle_ms: u64,

    /// Retries for tasks without an `x-max-retries` header (at most 1000,
    /// the cap a header may ask for).
    #[arg(long, env = "KAIROS_MAX_RETRIES", value_name = "KAIROS_MAX_RETRIES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_RETRIES_CAP)))]
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

    /// Unacked deliveries per intake consumer (lowered further so that
    /// prefetch x KAIROS_MAX_BODY_BYTES stays within
    /// KAIROS_INTAKE_BUFFER_BYTES).
    #[arg(
        long,
        env = "KAIROS_INTAKE_PREFETCH",
        value_name = "KAIROS_INTAKE_PREFETCH",
        default_value_t = 1_000
    )]
    pub intake_prefetch: u16,

    /// Largest task body accepted (bytes); a bigger one is dead-lettered at
    /// intake and refused over HTTP with 413.
    #[arg(long, env = "KAIROS_MAX_BODY_BYTES", value_name = "KAIROS_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES as u64, value_parser = clap::value_parser!(u64).range(1..=512 * MIB))]
    pub max_body_bytes: u64,

    /// Largest encoded properties and headers of a task (bytes): what
    /// Kairos adds on a retry must still fit one AMQP frame.
    #[arg(long, env = "KAIROS_MAX_HEADER_BYTES", value_name = "KAIROS_MAX_HEADER_BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES as u64, value_parser = clap::value_parser!(u64).range(1024..=120 * 1024))]
    pub max_header_bytes: u64,

    /// Furthest a task may be due ahead of now (ms), by `x-run-at` or
    /// `x-delay-ms`; default 3650 days.
    #[arg(long, env = "KAIROS_MAX_DELAY_MS", value_name = "KAIROS_MAX_DELAY_MS", default_value_t = DEFAULT_MAX_DELAY_MS as u64, value_parser = clap::value_parser!(u64).range(1..=i64::MAX as u64))]
    pub max_delay_ms: u64,

    /// Bytes of bodies and headers one intake batch takes (at least one
    /// delivery), besides the count KAIROS_BATCH.
    #[arg(long, env = "KAIROS_INTAKE_BATCH_BYTES", value_name = "KAIROS_INTAKE_BATCH_BYTES", default_value_t = 16 * MIB, value_parser = clap::value_parser!(u64).range(1..))]
    pub intake_batch_bytes: u64,

    /// Bytes the deliveries buffered for one intake consumer may take at
    /// worst: the intake prefetch is at most this / KAIROS_MAX_BODY_BYTES.
    #[arg(long, env = "KAIROS_INTAKE_BUFFER_BYTES", value_name = "KAIROS_INTAKE_BUFFER_BYTES", default_value_t = 256 * MIB, value_parser = clap::value_parser!(u64).range(1..))]
    pub intake_buffer_bytes: u64,

    /// Bytes of records one claim round takes over all shards (each shard
    /// at least one task), besides the count KAIROS_BATCH.
    #[arg(long, env = "KAIROS_CLAIM_BATCH_BYTES", value_name = "KAIROS_CLAIM_BATCH_BYTES", default_value_t = 32 * MIB, value_parser = clap::value_parser!(u64).range(1..))]
    pub claim_batch_bytes: u64,

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

    /// Window of the due-soon gauges (seconds): `kairos_tasks_due_soon`
    /// counts held tasks due within it, `kairos_schedules_due_soon`
    /// schedules whose next tick falls in it (docs/SCALING.md).
    #[arg(long, env = "KAIROS_DUE_SOON_S", value_name = "KAIROS_DUE_SOON_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub due_soon_s: u64,

    /// Bounds on results and checkpoints set over HTTP by handlers in
    /// other languages.
    #[command(flatten)]
    pub handler_limits: kairos_shared::limits::HandlerLimits,

    /// Task status settings (`KAIROS_STATUS`, `KAIROS_STATUS_TTL_S`).
    #[command(flatten)]
    pub status: kairos_shared::status::StatusSettings,
}

impl Config {
    /// Every setting at its default, reading no environment variable
    /// (clap's `env` fallbacks are switched off).
    fn defaults() -> Self {
        let command = Config::command().mut_args(|arg| arg.env(None));
        let matches = command.get_matches_from(["kairos-scheduler"]);
        // The defaults are constants of this file: a unit test parses them.
        Config::from_arg_matches(&matches)
            .unwrap_or_else(|e| panic!("the default settings do not parse: {e}"))
    }

    /// Defaults (ignoring the environment) for one namespace: for tests and
    /// programs that embed the scheduler.
    pub fn for_namespace(namespace: &str) -> Self {
        let mut c = Config::defaults();
        c.common = CommonConfig::new(namespace);
        c.redis_url = DEFAULT_REDIS_URL.to_string();
        c.redis_url_file = None;
        c.api_token = None;
        c.api_token_file = None;
        c.api_insecure = false;
        c
    }

    /// Takes the settings given as files (`KAIROS_*_FILE`) in. Call it once
    /// after parsing.
    pub fn read_secret_files(&mut self) -> Result<(), String> {
        self.common.read_secret_files()?;
        if let Some(path) = &self.redis_url_file {
            self.redis_url = read_secret_file("KAIROS_REDIS_URL_FILE", path, check_redis_url)?;
        }
        if let Some(path) = &self.api_token_file {
            let token = read_secret_file("KAIROS_API_TOKEN_FILE", path, check_token)?;
            self.api_token = Some(Secret::new(token));
        }
        Ok(())
    }

    /// The API may be open (no token) only on a loopback address, unless
    /// `KAIROS_API_INSECURE` says otherwise.
    pub fn check_api_exposure(&self) -> Result<(), String> {
        if self.api_token.is_some() || self.api_insecure || self.http_addr.ip().is_loopback() {
            return Ok(());
        }
        Err(format!(
            "KAIROS_HTTP_ADDR {} is not a loopback address and KAIROS_API_TOKEN is not set: \
             anyone who can reach it could enqueue tasks and change schedules. Set \
             KAIROS_API_TOKEN (or KAIROS_API_TOKEN_FILE), or KAIROS_API_INSECURE=true if \
             something in front of the scheduler authenticates",
            self.http_addr
        ))
    }

    /// The limits on one task (docs/RELIABILITY.md, "Limits").
    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
            max_header_bytes: usize::try_from(self.max_header_bytes).unwrap_or(usize::MAX),
            max_delay_ms: i64::try_from(self.max_delay_ms).unwrap_or(i64::MAX),
        }
    }

    /// The prefetch of an intake consumer: KAIROS_INTAKE_PREFETCH, lowered
    /// so that as many deliveries of the largest accepted body fit in
    /// KAIROS_INTAKE_BUFFER_BYTES. RabbitMQ's prefetch counts messages, not
    /// bytes, and lapin buffers whatever the broker sends: this is what
    /// bounds the intake's memory.
    pub fn intake_prefetch_effective(&self) -> u16 {
        let fit = (self.intake_buffer_bytes / self.max_body_bytes.max(1)).max(1);
        u16::try_from(fit)
            .unwrap_or(u16::MAX)
            .min(self.intake_prefetch)
            .max(1)
    }

    /// How failed attempts are retried.
    pub(crate) fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            default_max_retries: self.max_retries,
            base_ms: self.retry_base_ms,
            max_ms: self.retry_max_ms.max(self.retry_base_ms),
            jitter: self.retry_jitter,
        }
    }
}

const MIB: u64 = 1024 * 1024;

pub use kairos_shared::redis::{check_redis_url, redis_url_parser};

/// Checks an API token is long enough and has no spaces or control
/// characters. The error never quotes the token.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.chars().count() < MIN_TOKEN_LEN {
        return Err(format!(
            "too short: use at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)"
        ));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    Ok(())
}

/// The token parser: a refused token is never shown.
pub fn token_parser() -> impl clap::builder::TypedValueParser<Value = Secret> {
    use clap::builder::TypedValueParser;
    SecretParser {
        check: check_token,
        shown: |_| MASK.to_string(),
    }
    .map(Secret::new)
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
        for bad in ["5", "600001"] {
            let err = Config::try_parse_from(["s", "--shard-lease-ms", bad])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("KAIROS_SHARD_LEASE_MS"), "{err}");
        }
    }

    #[test]
    fn secrets_are_never_echoed() {
        let err = Config::try_parse_from(["s", "--redis-url", "redis://:s3cret@h:port/0"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("KAIROS_REDIS_URL"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let err = Config::try_parse_from(["s", "--api-token", "s3cret"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("KAIROS_API_TOKEN") && err.contains("16"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn an_open_api_listens_only_on_loopback() {
        let open = |addr: &str, extra: &[&str]| {
            let mut args = vec!["s", "--http-addr", addr];
            args.extend_from_slice(extra);
            Config::try_parse_from(args).unwrap().check_api_exposure()
        };
        assert!(open("127.0.0.1:8080", &[]).is_ok());
        assert!(open("[::1]:8080", &[]).is_ok());
        let err = open("0.0.0.0:8080", &[]).unwrap_err();
        assert!(err.contains("KAIROS_API_TOKEN"), "{err}");
        assert!(open("0.0.0.0:8080", &["--api-token", "0123456789abcdef"]).is_ok());
        assert!(open("0.0.0.0:8080", &["--api-insecure", "true"]).is_ok());
    }

    #[test]
    fn redis_url_and_token_can_come_from_files() {
        let dir = std::env::temp_dir().join(format!("kairos-sched-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (redis, token) = (dir.join("redis"), dir.join("token"));
        std::fs::write(&redis, "redis://:s3cret@h:6380/0\n").unwrap();
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        let mut c = Config::try_parse_from([
            "s",
            "--redis-url-file",
            redis.to_str().unwrap(),
            "--api-token-file",
            token.to_str().unwrap(),
        ])
        .unwrap();
        c.read_secret_files().unwrap();
        assert_eq!(c.redis_url, "redis://:s3cret@h:6380/0");
        assert_eq!(
            c.api_token.as_ref().map(Secret::expose),
            Some("0123456789abcdef0123")
        );
        let both = Config::try_parse_from([
            "s",
            "--api-token-file",
            token.to_str().unwrap(),
            "--api-token",
            "0123456789abcdef",
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(
            both.contains("KAIROS_API_TOKEN_FILE") && both.contains("<KAIROS_API_TOKEN>"),
            "{both}"
        );
        std::fs::write(&token, "short\n").unwrap();
        let mut c =
            Config::try_parse_from(["s", "--api-token-file", token.to_str().unwrap()]).unwrap();
        let err = c.read_secret_files().unwrap_err();
        assert!(err.contains("KAIROS_API_TOKEN_FILE"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn redis_fault_settings_default_and_name_themselves() {
        let c = Config::try_parse_from(["s"]).unwrap();
        assert_eq!(c.redis_timeout_ms, 5_000);
        assert!(!c.redis_allow_eviction);
        assert_eq!((c.redis_wait, c.redis_wait_timeout_ms), (0, 1_000));
        for (flag, value) in [
            ("--redis-timeout-ms", "10"),
            ("--redis-allow-eviction", "perhaps"),
            ("--redis-wait", "65"),
            ("--redis-wait-timeout-ms", "0"),
        ] {
            let err = Config::try_parse_from(["s", flag, value])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(flag), "{err}");
        }
    }

    #[test]
    fn defaults_are_documented_values() {
        let c = Config::try_parse_from(["s"]).unwrap();
        assert_eq!(c.shards, 8);
        assert_eq!(c.max_retries, 3);
        assert_eq!(c.retry_jitter, Jitter::Equal);
        assert_eq!(c.limits(), Limits::default());
        assert_eq!(c.max_body_bytes, 4 * MIB);
    }

    #[test]
    fn limits_are_bounded_settings() {
        for (flag, value) in [
            ("--max-retries", "1001"),
            ("--max-body-bytes", "0"),
            ("--max-header-bytes", "200000"),
            ("--max-delay-ms", "0"),
        ] {
            let err = Config::try_parse_from(["s", flag, value])
                .err()
                .unwrap_or_else(|| panic!("{flag} {value} accepted"))
                .to_string();
            assert!(err.contains(flag), "{err}");
        }
    }

    #[test]
    fn the_intake_prefetch_fits_the_buffer() {
        let mut c = Config::try_parse_from(["s"]).unwrap();
        // 256 MiB / 4 MiB.
        assert_eq!(c.intake_prefetch_effective(), 64);
        c.max_body_bytes = 1024;
        assert_eq!(c.intake_prefetch_effective(), 1000);
        c.max_body_bytes = 512 * MIB;
        assert_eq!(c.intake_prefetch_effective(), 1);
    }
    #[test]
    fn for_namespace_ignores_the_environment() {
        // No other unit test of this crate looks at lease_ms.
        std::env::set_var("KAIROS_LEASE_MS", "1234");
        let embedded = Config::for_namespace("ns");
        let parsed = Config::try_parse_from(["x"]).unwrap();
        std::env::remove_var("KAIROS_LEASE_MS");
        assert_eq!(parsed.lease_ms, 1234, "the variable is set");
        assert_eq!(embedded.lease_ms, 30_000);
        assert_eq!(embedded.common.namespace, "ns");
    }
}
