//! One Redis connection kept between calls.
//!
//! deadpool checks a connection on every checkout with an `UNWATCH` +
//! `PING` round trip. The pump claims and completes, and the ticker reads
//! and fires, every few milliseconds under load: that check doubled the
//! round trips of the hot path and sent Redis as many extra commands as
//! scripts. A multiplexed connection is meant to be shared, so the handle
//! keeps a clone of one and returns to the pool only when a call on it
//! failed (the pool's check then weeds out a broken one).

use deadpool_redis::Pool;
use redis::aio::MultiplexedConnection;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct RedisConn {
    pool: Pool,
    kept: Arc<Mutex<Option<MultiplexedConnection>>>,
}

impl RedisConn {
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
