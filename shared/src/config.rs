//! Settings every Kairos process shares. Each is an environment variable and
//! the same as a command-line flag (clap `env`); a bad value fails at start
//! with a message that names the setting.

use crate::secrets::{read_secret_file, redact_url, SecretParser};
use clap::builder::BoolishValueParser;
use clap::Args;
use std::path::PathBuf;
use std::str::FromStr;

/// The broker when `KAIROS_AMQP_URL` is not set: a local RabbitMQ.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Redis when `KAIROS_REDIS_URL` is not set: a local Redis, database 0.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// The namespace when `KAIROS_NAMESPACE` is not set.
pub const DEFAULT_NAMESPACE: &str = "kairos";

/// Broker, namespace and events: used by every process.
#[derive(Args, Clone, Debug)]
pub struct CommonConfig {
    /// RabbitMQ URL. Shown with its password masked wherever it appears.
    #[arg(long, env = "KAIROS_AMQP_URL", value_name = "KAIROS_AMQP_URL", default_value = DEFAULT_AMQP_URL, value_parser = amqp_url_parser(), hide_env_values = true)]
    pub amqp_url: String,

    /// A file holding the RabbitMQ URL (a mounted secret), instead of
    /// KAIROS_AMQP_URL.
    #[arg(
        long,
        env = "KAIROS_AMQP_URL_FILE",
        value_name = "KAIROS_AMQP_URL_FILE",
        conflicts_with = "amqp_url"
    )]
    pub amqp_url_file: Option<PathBuf>,

    /// Prefix of every AMQP name and Redis key.
    #[arg(long, env = "KAIROS_NAMESPACE", value_name = "KAIROS_NAMESPACE", default_value = DEFAULT_NAMESPACE, value_parser = parse_namespace)]
    pub namespace: String,

    /// Each task queue's order, `QUEUE:ORDER,...` with ORDER `priority`
    /// (the default for queues not named), `fifo` or `shortest-first`.
    /// Every scheduler, worker and client of the namespace must be given
    /// the same value: it decides how `NS.q.QUEUE` is declared.
    #[arg(long, env = "KAIROS_QUEUE_ORDER", value_name = "KAIROS_QUEUE_ORDER", default_value = "", hide_default_value = true, value_parser = parse_queue_orders)]
    pub queue_order: crate::order::QueueOrders,

    /// The kind of queue declared: `classic` (the default) or `quorum`
    /// (replicated, priorities by band; docs/CLUSTERS.md). Every process
    /// and client of the namespace must be given the same value.
    #[arg(long, env = "KAIROS_QUEUE_MODE", value_name = "KAIROS_QUEUE_MODE", default_value = "classic", value_parser = parse_queue_mode)]
    pub queue_mode: crate::queue_mode::QueueMode,

    /// Publish lifecycle events to `NS.events` (true/false).
    #[arg(long, env = "KAIROS_EVENTS", value_name = "KAIROS_EVENTS", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub events: bool,

    /// Serve Prometheus metrics at `http://ADDR/metrics` (off when unset).
    #[arg(long, env = "KAIROS_METRICS_ADDR", value_name = "KAIROS_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// CA and client certificate for `amqps://` (and `rediss://`).
    #[command(flatten)]
    pub tls: crate::tls::TlsSettings,

    /// `KAIROS_LOG_FORMAT`.
    #[command(flatten)]
    pub log: crate::trace_init::LogSettings,

    /// `KAIROS_OTLP_ENDPOINT`.
    #[command(flatten)]
    pub otlp: crate::trace_init::OtlpSettings,
}

impl CommonConfig {
    /// Defaults for the given namespace, as tests and embedders need.
    pub fn new(namespace: &str) -> Self {
        Self {
            amqp_url: DEFAULT_AMQP_URL.to_string(),
            amqp_url_file: None,
            namespace: namespace.to_string(),
            queue_order: Default::default(),
            queue_mode: Default::default(),
            events: false,
            metrics_addr: None,
            tls: Default::default(),
            log: Default::default(),
            otlp: Default::default(),
        }
    }

    /// Where and how to connect to RabbitMQ.
    pub fn broker(&self) -> crate::amqp::Broker {
        crate::amqp::Broker::new(&self.amqp_url, &self.tls)
    }

    /// The AMQP names and key prefix of this process's namespace, with
    /// each queue's order.
    pub fn names(&self) -> crate::contract::Names {
        crate::contract::Names::new(&self.namespace)
            .with_orders(self.queue_order.clone())
            .with_mode(self.queue_mode)
    }

    /// Checks the namespace again: parsing checked `KAIROS_NAMESPACE`, but
    /// a config built in code was not. The error names the setting.
    pub fn check(&self) -> Result<(), String> {
        crate::contract::validate_namespace(&self.namespace)
            .map_err(|e| format!("KAIROS_NAMESPACE: {e}"))
    }

    /// Takes the settings given as files (`KAIROS_AMQP_URL_FILE`) in. Call
    /// it once after parsing.
    pub fn read_secret_files(&mut self) -> Result<(), String> {
        if let Some(path) = &self.amqp_url_file {
            self.amqp_url = read_secret_file("KAIROS_AMQP_URL_FILE", path, check_amqp_url)?;
        }
        Ok(())
    }
}

/// Checks the URL parses as AMQP, so a typo fails at start, not at the
/// first reconnect. The error never quotes the URL (it may hold a
/// password).
///
/// Several URLs separated by commas name the nodes of one cluster; each
/// must parse, and an error says which (by position).
pub fn check_amqp_url(url: &str) -> Result<(), String> {
    let urls: Vec<&str> = crate::amqp::split_urls(url).collect();
    if urls.is_empty() {
        return Err("no AMQP URL given".into());
    }
    for (i, one) in urls.iter().enumerate() {
        lapin::uri::AMQPUri::from_str(one).map_err(|e| {
            if urls.len() == 1 {
                format!("not an AMQP URL: {e}")
            } else {
                format!("URL {} of {} is not an AMQP URL: {e}", i + 1, urls.len())
            }
        })?;
    }
    Ok(())
}

/// [`check_amqp_url`] as a clap parser that masks the password of a URL it
/// refuses.
pub fn amqp_url_parser() -> SecretParser {
    SecretParser {
        check: check_amqp_url,
        shown: redact_url,
    }
}

/// A namespace becomes part of AMQP names (at most 255 bytes) and Redis
/// keys: a safe alphabet, and short enough to leave room for `NS.q.QUEUE`
/// (see [`crate::contract::validate_namespace`]).
pub fn parse_namespace(ns: &str) -> Result<String, String> {
    crate::contract::validate_namespace(ns)?;
    Ok(ns.to_string())
}

/// `KAIROS_QUEUE_ORDER` as clap parses it ([`crate::order::QueueOrders`]).
pub fn parse_queue_orders(value: &str) -> Result<crate::order::QueueOrders, String> {
    value.parse()
}

/// `KAIROS_QUEUE_MODE` as clap parses it ([`crate::queue_mode::QueueMode`]).
pub fn parse_queue_mode(value: &str) -> Result<crate::queue_mode::QueueMode, String> {
    value.parse()
}

/// Parses a comma-separated list of logical queue names.
pub fn parse_queue_list(list: &str) -> Result<Vec<String>, String> {
    let queues: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(str::to_string)
        .collect();
    if queues.is_empty() {
        return Err("names no queue".into());
    }
    for q in &queues {
        crate::contract::validate_queue(q)?;
    }
    Ok(queues)
}

/// A worker's concurrency: a fixed `N`, or `MIN..MAX` to scale with the
/// backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Concurrency {
    /// The fewest tasks run at once (the floor when idle).
    pub min: usize,
    /// The most tasks run at once (the ceiling under backlog).
    pub max: usize,
}

/// The most tasks one worker process runs at once: each running task
/// holds an unacked delivery, and the prefetch follows the concurrency, so
/// a larger figure is a typo rather than a plan.
const MAX_CONCURRENCY: usize = 10_000;

impl FromStr for Concurrency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("{t:?} is not a whole number (use N or MIN..MAX)"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(s)?;
                (n, n)
            }
        };
        if min == 0 || max < min || max > MAX_CONCURRENCY {
            return Err(format!(
                "{s:?}: need 1 <= MIN <= MAX <= {MAX_CONCURRENCY} (use N or MIN..MAX)"
            ));
        }
        Ok(Concurrency { min, max })
    }
}

impl std::fmt::Display for Concurrency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..{}", self.min, self.max)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_amqp_urls_is_checked_url_by_url() {
        assert!(check_amqp_url("amqp://h1:5681/%2f,amqp://h2:5682/%2f").is_ok());
        let err = check_amqp_url("amqp://h1/%2f,http://u:secret@h2/").unwrap_err();
        assert!(err.starts_with("URL 2 of 2"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        assert!(check_amqp_url(" , ").is_err());
    }
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonConfig,
    }

    #[test]
    fn concurrency_parses_fixed_and_ranges() {
        assert_eq!("8".parse(), Ok(Concurrency { min: 8, max: 8 }));
        assert_eq!("2..32".parse(), Ok(Concurrency { min: 2, max: 32 }));
        assert!("0".parse::<Concurrency>().is_err());
        assert!("9..3".parse::<Concurrency>().is_err());
        assert!("abc".parse::<Concurrency>().is_err());
    }

    #[test]
    fn queue_lists_split_on_commas() {
        assert_eq!(
            parse_queue_list("default, emails").unwrap(),
            vec!["default", "emails"]
        );
        assert!(parse_queue_list(" , ").is_err());
        assert!(parse_queue_list(&"q".repeat(201)).is_err());
    }

    #[test]
    fn defaults_match_the_contract() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.common.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(cli.common.namespace, "kairos");
        assert!(!cli.common.events);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = Cli::try_parse_from(["x", "--namespace", "a b"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("KAIROS_NAMESPACE") || err.contains("--namespace"),
            "{err}"
        );
        let err = Cli::try_parse_from(["x", "--amqp-url", "http://nope"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("amqp-url"), "{err}");
        assert!(Cli::try_parse_from(["x", "--events", "maybe"]).is_err());
        // A namespace that leaves no room for `NS.q.QUEUE` in 255 bytes.
        let long = "n".repeat(49);
        let err = Cli::try_parse_from(["x", "--namespace", long.as_str()])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("KAIROS_NAMESPACE") && err.contains("48"),
            "{err}"
        );
    }

    #[test]
    fn queue_orders_parse_strictly_and_reach_the_names() {
        use crate::order::QueueOrder;
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert!(cli.common.queue_order.is_empty());
        let cli = Cli::try_parse_from(["x", "--queue-order", "emails:fifo,reports:shortest-first"])
            .unwrap();
        let names = cli.common.names();
        assert_eq!(names.orders().of("emails"), QueueOrder::Fifo);
        assert_eq!(names.orders().of("reports"), QueueOrder::ShortestFirst);
        assert_eq!(names.orders().of("default"), QueueOrder::Priority);
        for bad in ["emails:lifo", "emails", "a:fifo,a:fifo", ":fifo"] {
            let err = Cli::try_parse_from(["x", "--queue-order", bad])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("KAIROS_QUEUE_ORDER"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_refused_url_is_shown_without_its_password() {
        let err = Cli::try_parse_from(["x", "--amqp-url", "amqp://u:s3cret@h:port/%2f"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("KAIROS_AMQP_URL"), "{err}");
        assert!(err.contains("amqp://u:***@h:port/%2f"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn the_url_can_come_from_a_file_but_not_from_both() {
        let path = std::env::temp_dir().join(format!("kairos-amqp-{}", std::process::id()));
        std::fs::write(&path, "amqp://u:s3cret@h:5673/%2f\n").unwrap();
        let file = path.to_str().unwrap();
        let mut cli = Cli::try_parse_from(["x", "--amqp-url-file", file]).unwrap();
        cli.common.read_secret_files().unwrap();
        assert_eq!(cli.common.amqp_url, "amqp://u:s3cret@h:5673/%2f");
        let both = Cli::try_parse_from(["x", "--amqp-url-file", file, "--amqp-url", "amqp://h"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            both.contains("KAIROS_AMQP_URL_FILE") && both.contains("<KAIROS_AMQP_URL>"),
            "{both}"
        );
        std::fs::write(&path, "amqp://u:s3cret@h:port/%2f").unwrap();
        let mut cli = Cli::try_parse_from(["x", "--amqp-url-file", file]).unwrap();
        let err = cli.common.read_secret_files().unwrap_err();
        assert!(err.contains("KAIROS_AMQP_URL_FILE"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");
        let _ = std::fs::remove_file(&path);
    }
}
