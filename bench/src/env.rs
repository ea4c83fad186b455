//! One workload's namespace on the shared servers: its own AMQP names and
//! Redis keys, so workloads never see each other's messages, and a cleanup
//! that removes all of it. Cleanup needs async I/O, so it is an explicit
//! call that every workload makes on every path, pass or fail.

use crate::target::Target;
use anyhow::{Context, Result};
use kairos_shared::client::Client;
use kairos_shared::contract::Names;
use kairos_shared::queue_mode::QueueMode;
use kairos_shared::redis::RedisConnection;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use redis::AsyncCommands;
use std::time::Duration;

/// Hex digits of a v7 UUID's random tail that make a namespace unique.
const NS_SUFFIX_START: usize = 24;
/// Members of a record hash `MEMORY USAGE` samples: enough for a stable
/// mean, fast on a million-member hash.
const MEMORY_SAMPLES: u32 = 1_000;
/// `MEMORY USAGE` commands sent in one pipeline.
const KEYS_PER_PIPELINE: usize = 1_000;
/// Status hashes `MEMORY USAGE` samples per shard.
const STATUS_SAMPLES_PER_SHARD: usize = 125;
/// How long cleanup waits for a connection to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect and reply timeout of the bench's own Redis Cluster connection
/// (a single server keeps the redis crate's defaults, as before).
const CLUSTER_REDIS_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct BenchEnv {
    pub(crate) ns: String,
    pub(crate) names: Names,
    pub(crate) amqp_url: String,
    pub(crate) redis_url: String,
    pub(crate) conn: Connection,
    pub(crate) channel: Channel,
    /// To the one server, or to the Redis Cluster (commands routed by
    /// key; `KEYS` goes to every master).
    pub(crate) redis: RedisConnection,
    /// Extra queues to delete on cleanup (baseline queues, event taps).
    extra_queues: Vec<String>,
}

impl BenchEnv {
    /// A namespace on the single node, with the queue mode of
    /// `KAIROS_QUEUE_MODE` (classic unless set).
    pub(crate) async fn new(label: &str, amqp_url: &str, redis_url: &str) -> Result<Self> {
        let mode = kairos_shared::queue_mode::from_env().map_err(anyhow::Error::msg)?;
        Self::open(label, amqp_url, redis_url, mode).await
    }

    /// A namespace on `target`'s servers, with its queue mode.
    pub(crate) async fn on(label: &str, target: &Target) -> Result<Self> {
        Self::open(label, &target.amqp_url, &target.redis_url, target.mode).await
    }

    async fn open(label: &str, amqp_url: &str, redis_url: &str, mode: QueueMode) -> Result<Self> {
        let ns = format!(
            "kb-{label}-{}",
            &uuid::Uuid::now_v7().simple().to_string()[NS_SUFFIX_START..]
        );
        // `KAIROS_QUEUE_ORDER=default:fifo` measures a fifo queue; the
        // Rust client reads the same variable.
        let orders = kairos_shared::order::QueueOrders::from_env().map_err(anyhow::Error::msg)?;
        let names = Names::new(&ns).with_orders(orders).with_mode(mode);
        let conn = kairos_shared::amqp::connect(amqp_url, "kairos-bench")
            .await
            .with_context(|| {
                format!(
                    "RabbitMQ at {} (scripts/services.sh starts it; scripts/cluster.sh the cluster)",
                    redact(amqp_url)
                )
            })?;
        let channel = conn.create_channel().await?;
        kairos_shared::topology::declare_base(&channel, &names).await?;
        kairos_shared::topology::declare_task_queue(&channel, &names, "default").await?;
        let redis = redis_connection(redis_url).await.with_context(|| {
            format!(
                "Redis at {} (scripts/services.sh starts it)",
                redact(redis_url)
            )
        })?;
        Ok(BenchEnv {
            ns,
            names,
            amqp_url: amqp_url.to_string(),
            redis_url: redis_url.to_string(),
            conn,
            channel,
            redis,
            extra_queues: Vec::new(),
        })
    }

    pub(crate) fn forget_on_cleanup(&mut self, queue: &str) {
        self.extra_queues.push(queue.to_string());
    }

    pub(crate) fn scheduler_config(&self) -> kairos_scheduler::Config {
        let mut c = kairos_scheduler::Config::for_namespace(&self.ns);
        c.common.amqp_url = self.amqp_url.clone();
        c.common.queue_mode = self.names.mode();
        c.redis_url = self.redis_url.clone();
        c
    }

    pub(crate) fn worker_config(&self) -> kairos_worker::Config {
        let mut c = kairos_worker::Config::for_namespace(&self.ns);
        c.common.amqp_url = self.amqp_url.clone();
        c.common.queue_order = self.names.orders().clone();
        c.common.queue_mode = self.names.mode();
        // Task status lives in the same Redis as the delay queue.
        c.redis_url = self.redis_url.clone();
        c
    }

    /// A Rust client of this namespace with its queue mode and orders
    /// (`Client::connect` would take the mode from `KAIROS_QUEUE_MODE`,
    /// which is the single node's, not the cluster's).
    pub(crate) async fn client(&self) -> Result<Client> {
        let broker = kairos_shared::amqp::Broker::plain(&self.amqp_url);
        Ok(Client::connect_with(&broker, self.names.clone()).await?)
    }

    /// The task queue `logical` is held in: every band in quorum mode.
    pub(crate) fn task_queues(&self, logical: &str) -> Vec<String> {
        self.names
            .bands(logical)
            .iter()
            .filter_map(|b| self.names.band_queue(logical, *b).ok())
            .map(|q| q.to_string())
            .collect()
    }

    /// A consumer on `queue` that takes messages without acks, on its own
    /// channel (returned too: it must stay open while consuming).
    pub(crate) async fn consume_no_ack(&self, queue: &str) -> Result<(Channel, Consumer)> {
        let ch = self.conn.create_channel().await?;
        let consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok((ch, consumer))
    }

    /// Ready messages in a queue (unacked ones are not counted).
    pub(crate) async fn queue_depth(&self, queue: &str) -> Result<u32> {
        Ok(kairos_shared::admin::queue_depth(&self.channel, queue).await?)
    }

    /// The delay queue's shard count: the scheduler's default, which every
    /// workload's scheduler runs with.
    fn shards(&self) -> u16 {
        self.scheduler_config().shards
    }

    /// Tasks held in this namespace's delay queue (waiting or leased),
    /// over the shards of [`scheduler_config`](Self::scheduler_config).
    pub(crate) async fn pending(&self) -> Result<u64> {
        let mut con = self.redis.clone();
        let mut pipe = redis::pipe();
        for s in 0..self.shards() {
            pipe.cmd("HLEN").arg(format!("{}:dq{{{s}}}:rec", self.ns));
        }
        let counts: Vec<u64> = pipe.query_async(&mut con).await?;
        Ok(counts.into_iter().sum())
    }

    /// Bytes of the delay queue's due index (the bucket sorted sets and
    /// the index over them) and record hashes (over every shard; `MEMORY
    /// USAGE` sampling [`MEMORY_SAMPLES`] members of each record hash), and the
    /// size of one stored record: where the memory per task goes.
    pub(crate) async fn delay_queue_breakdown(&self) -> Result<(u64, u64, u64)> {
        let mut con = self.redis.clone();
        let (mut zsets, mut hashes) = (0, 0);
        let mut index_keys: Vec<String> = Vec::new();
        for s in 0..self.shards() {
            let pattern = format!("{}:dq{{{s}}}:idx*", self.ns);
            let mut scan = self.redis.clone();
            let mut iter: redis::AsyncIter<String> = scan.scan_match(&pattern).await?;
            while let Some(k) = iter.next_item().await {
                index_keys.push(k?);
            }
            let used: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("{}:dq{{{s}}}:rec", self.ns))
                .arg("SAMPLES")
                .arg(MEMORY_SAMPLES)
                .query_async(&mut con)
                .await?;
            hashes += used.unwrap_or(0);
        }
        for chunk in index_keys.chunks(KEYS_PER_PIPELINE) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
            }
            let used: Vec<Option<u64>> = pipe.query_async(&mut con).await?;
            zsets += used.into_iter().flatten().sum::<u64>();
        }
        let rec = format!("{}:dq{{0}}:rec", self.ns);
        let member: Option<String> = redis::cmd("HRANDFIELD")
            .arg(&rec)
            .query_async(&mut con)
            .await?;
        let record_len: u64 = match member {
            Some(m) => {
                redis::cmd("HSTRLEN")
                    .arg(&rec)
                    .arg(m)
                    .query_async(&mut con)
                    .await?
            }
            None => 0,
        };
        Ok((zsets, hashes, record_len))
    }

    /// Task statuses written in this namespace (entries of the recent
    /// sets), and the memory one takes: the mean `MEMORY USAGE` of a
    /// sample of status hashes plus the recent sets' usage per entry.
    pub(crate) async fn status_memory(&self) -> Result<(u64, f64)> {
        let mut con = self.redis.clone();
        let (mut entries, mut recent_bytes) = (0u64, 0u64);
        let mut sample: Vec<(usize, String)> = Vec::new();
        for s in 0..usize::from(self.shards()) {
            let recent = format!("{}:st{{{s}}}:recent", self.ns);
            let n: u64 = redis::cmd("ZCARD")
                .arg(&recent)
                .query_async(&mut con)
                .await?;
            let used: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&recent)
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut con)
                .await?;
            entries += n;
            recent_bytes += used.unwrap_or(0);
            let ids: Vec<String> = redis::cmd("ZRANDMEMBER")
                .arg(&recent)
                .arg(STATUS_SAMPLES_PER_SHARD)
                .query_async(&mut con)
                .await?;
            sample.extend(ids.into_iter().map(|id| (s, id)));
        }
        let mut pipe = redis::pipe();
        for (s, id) in &sample {
            pipe.cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("{}:st{{{s}}}:t:{id}", self.ns))
                .arg("SAMPLES")
                .arg(0);
        }
        let used: Vec<Option<u64>> = if sample.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut con).await?
        };
        let hashes: Vec<u64> = used.into_iter().flatten().collect();
        let per_hash = hashes.iter().sum::<u64>() as f64 / hashes.len().max(1) as f64;
        let per_entry = recent_bytes as f64 / entries.max(1) as f64;
        Ok((entries, per_hash + per_entry))
    }

    /// Redis's `used_memory`, bytes; 0 on a Redis Cluster (`INFO` there
    /// answers per node, and the status memory row is single-server only).
    pub(crate) async fn redis_used_memory(&self) -> Result<u64> {
        let mut con = match &self.redis {
            RedisConnection::Node(con) => con.clone(),
            RedisConnection::Cluster(_) => return Ok(0),
        };
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut con)
            .await?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .context("INFO memory has no used_memory")
    }

    async fn redis_keys(&self) -> Result<Vec<String>> {
        let mut con = self.redis.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(kairos_shared::admin::key_pattern(&self.names))
            .query_async(&mut con)
            .await?;
        Ok(keys)
    }

    /// Deletes every queue, exchange and Redis key of the namespace. It
    /// connects afresh: the workload's own connection may have died with
    /// the broker (a restart by another user of the shared servers), and
    /// the namespace must go all the same.
    pub(crate) async fn cleanup(self) {
        let fresh = kairos_shared::amqp::connect(&self.amqp_url, "kairos-bench-cleanup").await;
        let channel = match &fresh {
            Ok(conn) => conn.create_channel().await.ok(),
            Err(_) => None,
        };
        let channel = channel.as_ref().unwrap_or(&self.channel);
        let queues = self
            .task_queues("default")
            .into_iter()
            .chain([kairos_scheduler::schedules::outcomes::queue_name(
                &self.names,
            )])
            .chain(self.extra_queues.iter().cloned());
        let _ = kairos_shared::admin::delete_topology(channel, &self.names, queues).await;
        if let Ok(keys) = self.redis_keys().await {
            let mut con = self.redis.clone();
            // UNLINK frees big hashes in the background instead of blocking
            // Redis for the second a million-member DEL takes.
            for k in keys {
                let _: Result<(), _> = redis::cmd("UNLINK").arg(&k).query_async(&mut con).await;
            }
        }
        for conn in fresh.iter().chain([&self.conn]) {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "bench done".into())).await;
        }
    }
}

/// The bench's own Redis connection: the multiplexed connection it always
/// used for one server, the cluster client's for a `redis+cluster://` URL.
async fn redis_connection(url: &str) -> Result<RedisConnection> {
    if kairos_shared::redis::cluster_nodes(url).is_none() {
        let con = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        return Ok(RedisConnection::Node(con));
    }
    let pool = kairos_shared::redis::redis_pool(
        url,
        &kairos_shared::tls::TlsSettings::default(),
        CLUSTER_REDIS_TIMEOUT,
    )?;
    Ok(pool.get().await?)
}

/// A URL (or list) without its passwords, for error messages.
fn redact(url: &str) -> String {
    kairos_shared::secrets::redact_url(url)
}
