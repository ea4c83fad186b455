//! Redis for every Kairos process: the client (TLS), the pool with the
//! reply timeout Kairos needs, one connection kept between calls, and the
//! shard a task id maps to (the delay queue's and the task status's).
//!
//! `KAIROS_REDIS_URL` names one server (`redis://`, `rediss://`) or a Redis
//! Cluster (`redis+cluster://host:port,host:port`, see [`cluster_nodes`]):
//! [`RedisPool`] and [`RedisConnection`] are either, and the code above
//! them is the same for both (docs/CLUSTERS.md).
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
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{ClientTlsConfig, Cmd, Pipeline, RedisFuture, TlsCertificates, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A client for `url`. A `rediss://` URL trusts `KAIROS_TLS_CA_FILE` when
/// it is set (instead of the system's roots) and presents the client
/// certificate when one is set; a `redis://` URL ignores them.
///
/// For a Redis Cluster URL it is a client of the first node listed: what a
/// plain connection needs (the wake channel's SUBSCRIBE, since a classic
/// PUBLISH reaches every node of a cluster).
pub fn client(url: &str, tls: &TlsSettings) -> redis::RedisResult<redis::Client> {
    let first;
    let url = match cluster_nodes(url) {
        Some(Ok(nodes)) => {
            first = nodes.into_iter().next().unwrap_or_default();
            first.as_str()
        }
        Some(Err(e)) => return Err(invalid_url(e)),
        None => url,
    };
    let plain = redis::Client::open(url)?;
    let is_tls = matches!(
        plain.get_connection_info().addr(),
        redis::ConnectionAddr::TcpTls { .. }
    );
    match certificates(tls) {
        Some(certificates) if is_tls => redis::Client::build_with_tls(url, certificates),
        _ => Ok(plain),
    }
}

/// The certificates `tls` asks for, if any.
fn certificates(tls: &TlsSettings) -> Option<TlsCertificates> {
    if tls.tls_ca_file.is_none() && tls.identity().is_none() {
        return None;
    }
    crate::tls::install_crypto_provider();
    Some(TlsCertificates {
        client_tls: tls.identity().map(|(cert, key)| ClientTlsConfig {
            client_cert: cert.bytes().to_vec(),
            client_key: key.bytes().to_vec(),
        }),
        root_cert: tls.tls_ca_file.as_ref().map(|ca| ca.bytes().to_vec()),
    })
}

fn invalid_url(why: String) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "bad Redis Cluster URL",
        why,
    ))
}

/// The scheme of a Redis Cluster URL, and of a TLS one.
const CLUSTER_SCHEME: &str = "redis+cluster://";
const CLUSTER_TLS_SCHEME: &str = "rediss+cluster://";

/// The node URLs of a Redis Cluster URL
/// (`redis+cluster://[user:password@]host:port,host:port[/...]`, or
/// `rediss+cluster://` for TLS): `None` for any other URL. The user and
/// password apply to every node. Errors never quote the URL.
pub fn cluster_nodes(url: &str) -> Option<Result<Vec<String>, String>> {
    let (rest, scheme) = if let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) {
        (rest, "redis://")
    } else if let Some(rest) = url.strip_prefix(CLUSTER_TLS_SCHEME) {
        (rest, "rediss://")
    } else {
        return None;
    };
    // The host list ends at the first `/`, `?` or `#`; a password may hold
    // none of them unescaped in a URL anyway.
    let (auth, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let end = hosts.find(['/', '?', '#']).unwrap_or(hosts.len());
    let (hosts, tail) = hosts.split_at(end);
    if tail
        .trim_start_matches('/')
        .split(['?', '#'])
        .next()
        .is_some_and(|db| !db.is_empty() && db != "0")
    {
        return Some(Err("a Redis Cluster has only database 0".into()));
    }
    let mut nodes = Vec::new();
    for host in hosts.split(',') {
        if host.is_empty() {
            return Some(Err("an empty node in the Redis Cluster node list".into()));
        }
        let node = format!("{scheme}{auth}{host}");
        if let Err(e) = redis::Client::open(node.as_str()) {
            return Some(Err(format!("not a Redis Cluster node: {e}")));
        }
        nodes.push(node);
    }
    Some(Ok(nodes))
}

/// Where Kairos's Redis lives: one server (a pool of connections to it),
/// or a Redis Cluster (the redis crate's cluster client, whose connection
/// routes each command to the master of its key's slot). Cheap to clone.
#[derive(Clone)]
pub enum RedisPool {
    /// One Redis server.
    Node(Pool),
    /// A Redis Cluster.
    Cluster(Arc<ClusterClient>),
}

impl From<Pool> for RedisPool {
    fn from(pool: Pool) -> Self {
        RedisPool::Node(pool)
    }
}

impl RedisPool {
    /// A connection: out of the pool, or a new cluster connection (which
    /// multiplexes over every master by itself).
    pub async fn get(&self) -> Result<RedisConnection, deadpool_redis::PoolError> {
        match self {
            RedisPool::Node(pool) => Ok(RedisConnection::Node(deadpool_redis::Connection::take(
                pool.get().await?,
            ))),
            RedisPool::Cluster(client) => client
                .get_async_connection()
                .await
                .map(RedisConnection::Cluster)
                .map_err(deadpool_redis::PoolError::Backend),
        }
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisPool::Cluster(_))
    }
}

/// A connection of a [`RedisPool`]: to one server, or to a cluster.
/// Cheap to clone (both kinds are multiplexed).
#[derive(Clone)]
pub enum RedisConnection {
    /// To one Redis server.
    Node(MultiplexedConnection),
    /// To a Redis Cluster.
    Cluster(ClusterConnection),
}

impl RedisConnection {
    /// Replaces this handle's reply timeout (other clones keep theirs). A
    /// cluster connection keeps the client's (`KAIROS_REDIS_TIMEOUT_MS`):
    /// redis-rs sets it for the whole cluster client only.
    pub fn set_response_timeout(&mut self, timeout: Duration) {
        if let RedisConnection::Node(con) = self {
            con.set_response_timeout(timeout);
        }
    }
}

impl RedisConnection {
    /// Runs `pipe`: as one pipeline on one server (the hot path keeps its
    /// single round trip), by hash slot on a cluster (see
    /// [`crate::redis_slots::query_by_slot`]).
    pub async fn query_pipe<T: redis::FromRedisValue>(
        &mut self,
        pipe: &Pipeline,
    ) -> redis::RedisResult<T> {
        match self {
            RedisConnection::Node(con) => pipe.query_async(con).await,
            RedisConnection::Cluster(con) => crate::redis_slots::query_by_slot(con, pipe).await,
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Node(con) => con.req_packed_command(cmd),
            RedisConnection::Cluster(con) => con.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Node(con) => con.req_packed_commands(cmd, offset, count),
            RedisConnection::Cluster(con) => con.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Node(con) => con.get_db(),
            RedisConnection::Cluster(con) => con.get_db(),
        }
    }
}

/// [`pool`] for one server, or the cluster client of a Redis Cluster URL
/// (see [`cluster_nodes`]) with the same timeouts and TLS settings.
pub fn redis_pool(
    url: &str,
    tls: &TlsSettings,
    timeout: Duration,
) -> Result<RedisPool, RedisSetupError> {
    let nodes = match cluster_nodes(url) {
        None => return pool(url, tls, timeout).map(RedisPool::Node),
        Some(nodes) => nodes.map_err(|e| RedisSetupError::Client(invalid_url(e)))?,
    };
    let mut builder = ClusterClient::builder(nodes)
        .connection_timeout(timeout)
        .response_timeout(timeout);
    if url.starts_with(CLUSTER_TLS_SCHEME) {
        if let Some(certs) = certificates(tls) {
            builder = builder.certs(certs);
        }
    }
    builder
        .build()
        .map(|client| RedisPool::Cluster(Arc::new(client)))
        .map_err(RedisSetupError::Client)
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
    pool: RedisPool,
    kept: Arc<Mutex<Option<RedisConnection>>>,
}

impl RedisConn {
    /// A handle on `pool`, with no connection kept yet.
    pub fn new(pool: impl Into<RedisPool>) -> Self {
        RedisConn {
            pool: pool.into(),
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
    pub async fn get(&self) -> Result<RedisConnection, deadpool_redis::PoolError> {
        if let Some(con) = self.lock().as_ref() {
            return Ok(con.clone());
        }
        let con = self.pool.get().await?;
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
    /// The pool (or cluster) behind this handle.
    pub fn pool(&self) -> &RedisPool {
        &self.pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<RedisConnection>> {
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
    if let Some(nodes) = cluster_nodes(url) {
        return nodes.map(|_| ());
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

    #[test]
    fn cluster_urls_list_their_nodes() {
        let nodes = cluster_nodes("redis+cluster://u:secret@a:7001,b:7002").unwrap();
        assert_eq!(
            nodes.unwrap(),
            ["redis://u:secret@a:7001", "redis://u:secret@b:7002"]
        );
        let nodes = cluster_nodes("rediss+cluster://a:7001/").unwrap().unwrap();
        assert_eq!(nodes, ["rediss://a:7001"]);
        assert!(cluster_nodes("redis://a:6379").is_none());
        assert!(check_redis_url("redis+cluster://a:7001,b:7002").is_ok());
        for bad in [
            "redis+cluster://u:secret@a:7001,,b:7002",
            "redis+cluster://u:secret@a:7001/3",
            "redis+cluster://u:secret@a:notaport",
        ] {
            let err = check_redis_url(bad).unwrap_err();
            assert!(!err.contains("secret"), "{err}");
        }
    }
}
