//! The Redis pool, and one connection kept between calls.
//!
//! deadpool checks a connection on every checkout with an `UNWATCH` +
//! `PING` round trip. The pump claims and completes, and the ticker reads
//! and fires, every few milliseconds under load: a check per call would
//! add a round trip to every call of the hot path (figures in
//! docs/BENCHMARKS.md). A multiplexed connection is meant to be shared, so
//! the handle keeps a clone of one and returns to the pool only when a call
//! on it failed (the pool's check then weeds out a broken one).

use deadpool_redis::Pool;
use kairos_shared::tls::TlsSettings;
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
    kairos_shared::tls::install_crypto_provider();
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
pub(crate) struct RedisConn {
    pool: Pool,
    kept: Arc<Mutex<Option<MultiplexedConnection>>>,
}

impl RedisConn {
    /// A handle on `pool`, with no connection kept yet.
    pub(crate) fn new(pool: Pool) -> Self {
        RedisConn {
            pool,
            kept: Arc::default(),
        }
    }

    /// Another handle on the same pool that keeps its own connection, so a
    /// long pipeline of one component never queues another's call behind
    /// it on the same socket.
    pub(crate) fn separate(&self) -> Self {
        Self::new(self.pool.clone())
    }

    /// The kept connection, checked out of the pool when there is none.
    /// Pass the result of each call on it to [`watch`](Self::watch).
    pub(crate) async fn get(&self) -> Result<MultiplexedConnection, deadpool_redis::PoolError> {
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
    pub(crate) fn watch<T>(&self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
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
pub(crate) fn no_reply(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Io || e.is_timeout() || e.is_connection_dropped()
}
