//! Where a workload runs: the single RabbitMQ node and Redis server of
//! `--amqp-url`/`--redis-url` (every workload), or, with `--cluster`, a
//! RabbitMQ cluster (a node list) and a Redis Cluster with quorum queues
//! (W1, W2 and W10 only). Each target gets its own raw baseline in the same
//! run, measured on the same broker, so cluster rows are read against the
//! cluster's own ceiling and not the single node's.

use kairos_shared::queue_mode::QueueMode;

/// The servers and queue kind one set of rows ran on.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// Appended to workload names in rows ("" for the single node, so its
    /// rows keep the names docs/BENCHMARKS.md already uses).
    pub(crate) suffix: &'static str,
    /// `KAIROS_AMQP_URL`: one URL or the cluster's nodes, comma-separated.
    pub(crate) amqp_url: String,
    /// `KAIROS_REDIS_URL`: `redis://` or `redis+cluster://`.
    pub(crate) redis_url: String,
    pub(crate) mode: QueueMode,
}

impl Target {
    /// Whether this is the cluster target (some single-server figures,
    /// such as `INFO memory` deltas, do not apply to it).
    pub(crate) fn is_cluster(&self) -> bool {
        !self.suffix.is_empty()
    }

    /// `workload` as this target's rows name it, e.g. "W1 burst (cluster,
    /// quorum)".
    pub(crate) fn name(&self, workload: &str) -> String {
        format!("{workload}{}", self.suffix)
    }

    /// The AMQP URLs of the nodes, in the order given.
    pub(crate) fn node_urls(&self) -> Vec<String> {
        kairos_shared::amqp::split_urls(&self.amqp_url)
            .map(str::to_string)
            .collect()
    }
}
