//! Redis for every Kairos process: the client (TLS), the pool with the
//! reply timeout Kairos needs, one connection kept between calls, and the
//! shard a task id maps to (the delay queue's and the task status's).
//!
//! The pool and the kept connection:
//!
//! deadpool checks a connection on every checkout with an `UNWATCH` +
//! `PING` round trip. The pump claims and completes, and the ticker reads
//! and fires, every few milliseconds under load: a check per call would
//! add a round trip to every call of the hot path (figures in
//! docs/BENCHMARKS.md). A multiplexed connection is meant to be shared, so
//! the handle keeps a clone of one and returns to the pool only when a call
//! on it failed (the pool's check then weeds out a broken one).

use crate::secrets::{redact_url, SecretParser};
use crate::tls::TlsSettings;
use deadpool_redis::Pool;
use redis::aio::MultiplexedConnection;
use redis::{ClientTlsConfig, TlsCertificates};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A client for `url`. A `rediss://` URL trusts `KAIROS_TLS_CA_FILE` when
/// it is set (instead of the system's roots) and presents the client
/// certificate when one is set; a `redis://` URL ignores them.
pub fn client(url: &str, tls: &TlsSettings) -> redis::RedisResult<redis::Client> {
    let plain = redis::Client::open(url)?;
    let is_tls = matches!(
        plain.get_connection_info().addr(),
        redis::ConnectionAddr::TcpTls { .. }
    );
    if !is_tls || (tls.tls_ca_file.is_none() && tls.identity().is_none()) {
        return Ok(plain);
    }
    crate::tls::install_crypto_provider();
    let certificates = TlsCertificates {
        client_tls: tls.identity().map(|(cert, key)| ClientTlsConfig {
            client_cert: cert.bytes().to_vec(),
            client_key: key.bytes().to_vec(),
        }),
        root_cert: tls.tls_ca_file.as_ref().map(|ca| ca.bytes().to_vec()),
    };
    redis::Client::build_with_tls(url, certificates)
}

/// Why a Redis client or pool could not be set up from the settings.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// The URL, or its TLS files, are unusable.
    #[error("{0}")]
    Client(#[source] redis::RedisError),
    /// deadpool refused the pool's settings.
    #[error("{0}")]
    Pool(#[source] deadpool_redis::BuildError),
}

/// The connection pool of `url`, with [`client`]'s TLS settings (deadpool's
/// own `Config` cannot carry certificates), whose connections wait
/// `timeout` for a reply and for a connection (`KAIROS_REDIS_TIMEOUT_MS`):
/// redis-rs's own default is short enough that a briefly stalled Redis
/// turns every script in flight into an error whose script had run.
pub fn pool(url: &str, tls: &TlsSettings, timeout: Duration) -> Result<Pool, RedisSetupError> {
    let info = client(url, tls)
        .map_err(RedisSetupError::Client)?
        .get_connection_info()
        .clone();
    let settings = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(timeout))
        .set_connection_timeout(Some(timeout));
    let manager = deadpool_redis::Manager::new_with_config(info, settings)
        .map_err(RedisSetupError::Client)?;
    Pool::builder(manager)
        .runtime(deadpool_redis::Runtime::Tokio1)
        .build()
        .map_err(RedisSetupError::Pool)
}

/// A handle on the pool that keeps one multiplexed connection between
/// calls; clones share it.
#[derive(Clone)]
pub struct RedisConn {
    pool: Pool,
    kept: Arc<Mutex<Option<MultiplexedConnection>>>,
}

impl RedisConn {
    /// A handle on `pool`, with no connection kept yet.
    pub fn new(pool: Pool) -> Self {
        RedisConn {
            pool,
            kept: Arc::default(),
        }
    }

    /// Another handle on the same pool that keeps its own connection, so a
    /// long pipeline of one component never queues another's call behind
    /// it on the same socket.
    pub fn separate(&self) -> Self {
        Self::new(self.pool.clone())
    }

    /// The kept connection, checked out of the pool when there is none.
    /// Pass the result of each call on it to [`watch`](Self::watch).
    pub async fn get(&self) -> Result<MultiplexedConnection, deadpool_redis::PoolError> {
        if let Some(con) = self.lock().as_ref() {
            return Ok(con.clone());
        }
        let con = deadpool_redis::Connection::take(self.pool.get().await?);
        *self.lock() = Some(con.clone());
        Ok(con)
    }

    /// Passes on the result of a call on [`get`](Self::get)'s connection.
    /// After a failure without a reply (I/O, timeout), the connection may
    /// be dead: the next call checks out a
    /// fresh one, or it would fail on the same dead socket for ever.
    pub fn watch<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if let Err(e) = &result {
            if no_reply(e) {
                self.lock().take();
            }
        }
        result
    }

    /// Holds only a connection handle; a poisoned lock is still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The call got no reply from Redis (I/O error, timeout, dropped
/// connection): it may or may not have run. A reply, even an error (OOM,
/// NOSCRIPT, a script's own error, which redis-rs reports as `Server` or,
/// for codes it does not know such as OOM, `Extension`), means Redis
/// answered it.
pub fn no_reply(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Io || e.is_timeout() || e.is_connection_dropped()
}

/// Checks the URL is one the Redis client accepts. The error never quotes
/// the URL (it may hold a password).
pub fn check_redis_url(url: &str) -> Result<(), String> {
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
        .map(|_| ())
        .map_err(|e| format!("not a Redis URL: {e}"))
}

/// [`check_redis_url`] as a clap parser that masks the password of a URL
/// it refuses.
pub fn redis_url_parser() -> SecretParser {
    SecretParser {
        check: check_redis_url,
        shown: redact_url,
    }
}

/// FNV-1a offset basis and prime (64-bit).
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// The shard of task `id` among `shards` (FNV-1a of the id): a stable
/// hash, so every process maps an id to the same shard. The delay queue
/// holds the task there (`NS:dq{S}`) and its status lives beside it
/// (`NS:st{S}`), under the same Redis Cluster hash tag.
pub fn shard_of(id: &str, shards: usize) -> usize {
    let mut h: u64 = FNV_OFFSET;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    (h % shards.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("task-1", 8), shard_of("task-1", 8));
        let mut seen = [0usize; 8];
        for i in 0..8000 {
            seen[shard_of(&format!("task-{i}"), 8)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 700), "{seen:?}");
        assert_eq!(shard_of("x", 0), 0);
    }

    #[test]
    fn urls_are_checked_without_echoing_them() {
        assert!(check_redis_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_redis_url("nope://x").is_err());
        let err = check_redis_url("rediss://h:6380/#insecure").unwrap_err();
        assert!(err.contains("KAIROS_TLS_CA_FILE"), "{err}");
    }
}
