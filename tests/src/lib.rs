//! Test harness for Kairos integration tests against the real Redis and
//! RabbitMQ. Every test gets its own namespace (AMQP names and Redis key
//! prefix), so tests run in parallel on the shared servers, and the
//! namespace is removed when the test ends, pass or fail.
//!
//! # Layout
//!
//! * [`namespace`]: [`TestEnv`], one test's namespace, its connections,
//!   service settings and cleanup.
//! * [`clients`]: publishing tasks (raw AMQP, the Python and Node
//!   examples), reading queues and dead letters, the HTTP APIs.
//! * [`events`]: [`EventTap`] (lifecycle events on `NS.events`) and
//!   [`RunLog`] (what a test's handler ran).
//! * [`processes`]: [`InProcess`] (a scheduler or worker in the test's
//!   runtime) and [`Proc`] (a real `kairos-*` binary, for kill -9 and
//!   signal tests).
//! * [`servers`]: the shared servers' URLs, free ports, and private
//!   servers a test starts itself: [`OwnRedis`], [`OwnRabbit`], plain or
//!   TLS.
//! * [`tls`]: throwaway certificates for the TLS servers.
//!
//! Everything is re-exported here: tests `use kairos_tests::*`.

pub mod clients;
pub mod events;
pub mod namespace;
pub mod processes;
pub mod servers;
pub mod tls;

pub use clients::*;
pub use events::*;
pub use namespace::*;
pub use processes::*;
pub use servers::*;

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Unix ms by this host's clock (the services run on the same host).
pub fn now_ms() -> i64 {
    kairos_shared::amqp::now_ms()
}

/// Percentile `p` (0 to 100) of a sorted slice, by nearest rank; 0 for an
/// empty one.
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
