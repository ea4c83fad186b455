//! Settings every Kairos process shares. Each is an environment variable and
//! the same as a command-line flag (clap `env`); a bad value fails at start
//! with a message that names the setting.

use clap::builder::BoolishValueParser;
use clap::Args;
use std::str::FromStr;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub const DEFAULT_NAMESPACE: &str = "kairos";

/// Broker, namespace and events: used by every process.
#[derive(Args, Clone, Debug)]
pub struct CommonConfig {
    /// RabbitMQ URL.
    #[arg(long, env = "KAIROS_AMQP_URL", value_name = "KAIROS_AMQP_URL", default_value = DEFAULT_AMQP_URL, value_parser = parse_amqp_url)]
    pub amqp_url: String,

    /// Prefix of every AMQP name and Redis key.
    #[arg(long, env = "KAIROS_NAMESPACE", value_name = "KAIROS_NAMESPACE", default_value = DEFAULT_NAMESPACE, value_parser = parse_namespace)]
    pub namespace: String,

    /// Publish lifecycle events to `NS.events` (true/false).
    #[arg(long, env = "KAIROS_EVENTS", value_name = "KAIROS_EVENTS", default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub events: bool,

    /// Serve Prometheus metrics at `http://ADDR/metrics` (off when unset).
    #[arg(long, env = "KAIROS_METRICS_ADDR", value_name = "KAIROS_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// CA and client certificate for `amqps://` (and `rediss://`).
    #[command(flatten)]
    pub tls: crate::tls::TlsSettings,
}

impl CommonConfig {
    /// Defaults for the given namespace, as tests and embedders need.
    pub fn new(namespace: &str) -> Self {
        Self {
            amqp_url: DEFAULT_AMQP_URL.to_string(),
            namespace: namespace.to_string(),
            events: false,
            metrics_addr: None,
            tls: Default::default(),
        }
    }

    /// Where and how to connect to RabbitMQ.
    pub fn broker(&self) -> crate::amqp::Broker {
        crate::amqp::Broker::new(&self.amqp_url, &self.tls)
    }

    pub fn names(&self) -> crate::contract::Names {
        crate::contract::Names::new(&self.namespace)
    }
}

/// Checks the URL parses as AMQP, so a typo fails at start, not at the
/// first reconnect.
pub fn parse_amqp_url(url: &str) -> Result<String, String> {
    lapin::uri::AMQPUri::from_str(url)
        .map(|_| url.to_string())
        .map_err(|e| format!("not an AMQP URL: {e}"))
}

/// A namespace becomes part of AMQP names (at most 255 bytes) and Redis
/// keys: keep it to a safe alphabet.
pub fn parse_namespace(ns: &str) -> Result<String, String> {
    if ns.is_empty() || ns.len() > 100 {
        return Err("must be 1 to 100 characters".into());
    }
    if let Some(c) = ns
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!(
            "character {c:?} is not allowed (use letters, digits, - _ . :)"
        ));
    }
    Ok(ns.to_string())
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
        if q.len() > 200 || q.chars().any(|c| c.is_control()) {
            return Err(format!("queue name {q:?} is not usable"));
        }
    }
    Ok(queues)
}

/// A worker's concurrency: a fixed `N`, or `MIN..MAX` to scale with the
/// backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Concurrency {
    pub min: usize,
    pub max: usize,
}

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
        if min == 0 || max < min || max > 10_000 {
            return Err(format!(
                "{s:?}: need 1 <= MIN <= MAX <= 10000 (use N or MIN..MAX)"
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
    }
}
