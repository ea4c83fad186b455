//! Every task-status key, built in one place, and the shard count the
//! status shares with the delay queue.

use super::StatusError;
use crate::redis::{shard_of, RedisConn};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The delay queue's shard count when `NS:dq:shards` is not there yet (no
/// scheduler ever started in the namespace): `KAIROS_SHARDS`'s default.
pub const DEFAULT_SHARDS: usize = 8;

/// The status keys of one namespace.
#[derive(Clone, Debug)]
pub struct StatusKeys {
    namespace: String,
}

impl StatusKeys {
    /// The keys of `namespace`.
    pub fn new(namespace: &str) -> Self {
        StatusKeys {
            namespace: namespace.to_string(),
        }
    }

    /// `NS:st{S}`: the prefix, with the delay-queue shard's hash tag.
    fn prefix(&self, shard: usize) -> String {
        format!("{}:st{{{shard}}}", self.namespace)
    }

    /// `NS:st{S}:t:ID`: the task's status hash.
    pub fn task(&self, shard: usize, id: &str) -> String {
        format!("{}:t:{id}", self.prefix(shard))
    }

    /// `NS:st{S}:cp:ID`: the task's last checkpoint.
    pub fn checkpoint(&self, shard: usize, id: &str) -> String {
        format!("{}:cp:{id}", self.prefix(shard))
    }

    /// `NS:st{S}:recent`: id -> last update (ms), for listing.
    pub fn recent(&self, shard: usize) -> String {
        format!("{}:recent", self.prefix(shard))
    }

    /// `NS:st{S}:wait:`: the prefix of the shard's per-queue sets of
    /// waiting tasks (`NS:st{S}:wait:QUEUE`, id -> due ms).
    pub fn wait_prefix(&self, shard: usize) -> String {
        format!("{}:wait:", self.prefix(shard))
    }

    /// `NS:st{S}:wait:QUEUE`.
    pub fn wait(&self, shard: usize, queue: &str) -> String {
        format!("{}{queue}", self.wait_prefix(shard))
    }

    /// `NS:queues`: every logical queue seen.
    pub fn queues(&self) -> String {
        format!("{}:queues", self.namespace)
    }

    /// `NS:rate:QUEUE`: counts per event and 10-second bucket.
    pub fn rate(&self, queue: &str) -> String {
        format!("{}:rate:{queue}", self.namespace)
    }

    /// `NS:dq:shards`: the delay queue's shard count.
    pub fn shard_count(&self) -> String {
        format!("{}:dq:shards", self.namespace)
    }
}

/// The delay queue's shard count: given (the scheduler knows it), or read
/// from `NS:dq:shards` on first use and kept once found.
#[derive(Clone, Debug, Default)]
pub struct ShardCount {
    /// 0 until known.
    known: Arc<AtomicUsize>,
}

impl ShardCount {
    /// A count the caller knows (`KAIROS_SHARDS`, checked against Redis).
    pub fn known(shards: usize) -> Self {
        ShardCount {
            known: Arc::new(AtomicUsize::new(shards.max(1))),
        }
    }

    /// A count read from Redis when first needed.
    pub fn lookup() -> Self {
        Self::default()
    }

    /// The count: as known, else `NS:dq:shards` (kept), else
    /// [`DEFAULT_SHARDS`] (not kept: a scheduler may record another).
    pub async fn get(&self, redis: &RedisConn, keys: &StatusKeys) -> Result<usize, StatusError> {
        let n = self.known.load(Ordering::Relaxed);
        if n > 0 {
            return Ok(n);
        }
        let mut con = redis.get().await?;
        let stored: Option<usize> = redis.watch(
            redis::cmd("GET")
                .arg(keys.shard_count())
                .query_async(&mut con)
                .await,
        )?;
        match stored {
            Some(n) if n > 0 => {
                self.known.store(n, Ordering::Relaxed);
                Ok(n)
            }
            _ => Ok(DEFAULT_SHARDS),
        }
    }

    /// The shard of `id` among `shards`.
    pub fn shard(id: &str, shards: usize) -> usize {
        shard_of(id, shards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_the_documented_one() {
        let k = StatusKeys::new("ns");
        assert_eq!(k.task(3, "a"), "ns:st{3}:t:a");
        assert_eq!(k.checkpoint(3, "a"), "ns:st{3}:cp:a");
        assert_eq!(k.recent(3), "ns:st{3}:recent");
        assert_eq!(k.wait(3, "q"), "ns:st{3}:wait:q");
        assert_eq!(k.queues(), "ns:queues");
        assert_eq!(k.rate("q"), "ns:rate:q");
        assert_eq!(k.shard_count(), "ns:dq:shards");
    }
}
