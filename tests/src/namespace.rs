//! [`TestEnv`]: one test's namespace on the shared servers. Every test
//! gets its own namespace (AMQP names and Redis key prefix), so tests run
//! in parallel, and the namespace is removed when the test ends, pass or
//! fail. Settings for services in the namespace come from here too.
//!
//! The servers are the shared ones unless `KAIROS_TEST_AMQP_URL` (one URL
//! or a comma-separated node list) and `KAIROS_TEST_REDIS_URL` (which may
//! be a `redis+cluster://` URL) name others: `scripts/cluster-test.sh`
//! runs tests on the 3-node clusters that way.

use crate::servers::{AMQP_URL, REDIS_URL};
use kairos_shared::config::Concurrency;
use kairos_shared::contract::Names;
use kairos_shared::queue_mode::QueueMode;
use kairos_shared::redis::RedisConnection;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use std::sync::{Arc, Mutex};

pub use kairos_scheduler::Config as SchedulerConfig;
pub use kairos_worker::Config as WorkerConfig;

/// Hex digits of a v7 UUID's random tail that make a namespace unique.
const NS_SUFFIX_START: usize = 22;
/// Base delay of the first retry in tests: short, so retries come quickly.
const TEST_RETRY_BASE_MS: u64 = 100;
/// Handler concurrency of a test worker.
const TEST_CONCURRENCY: Concurrency = Concurrency { min: 4, max: 32 };

/// One test's namespace and connections.
pub struct TestEnv {
    /// The namespace, `kt-PREFIX-RANDOM`.
    pub ns: String,
    /// The contract's AMQP names in the namespace.
    pub names: Names,
    /// The test's broker connection.
    pub conn: Connection,
    /// A channel in confirm mode, for publishing and inspecting.
    pub channel: Channel,
    /// A connection to the test's Redis ([`test_redis_url`]): one server,
    /// or a Redis Cluster (commands routed by key).
    pub redis: RedisConnection,
    /// The broker of this test: the shared one, a cluster's node list
    /// ([`test_amqp_url`]), or an [`OwnRabbit`](crate::OwnRabbit).
    pub amqp_url: String,
    /// The Redis of this test ([`test_redis_url`]).
    pub redis_url: String,
    /// Queues to delete with the namespace (task queues, refusing queues).
    pub(crate) queues: Arc<Mutex<Vec<String>>>,
}

impl TestEnv {
    /// A new namespace on the test servers ([`test_amqp_url`],
    /// [`test_redis_url`]), named after `prefix`, with its base topology
    /// and the `default` task queue declared.
    pub async fn new(prefix: &str) -> Self {
        Self::on_broker(prefix, &test_amqp_url()).await
    }

    /// As [`new`](Self::new), on the broker at `amqp_url` (an
    /// [`OwnRabbit`](crate::OwnRabbit)); Redis is the test one.
    pub async fn on_broker(prefix: &str, amqp_url: &str) -> Self {
        Self::named_on_broker(Self::fresh_namespace(prefix), amqp_url, test_queue_mode()).await
    }

    /// As [`new`](Self::new), with queues of `mode` whatever
    /// `KAIROS_TEST_QUEUE_MODE` says (quorum queues work on one node too).
    pub async fn with_mode(prefix: &str, mode: QueueMode) -> Self {
        Self::named_on_broker(Self::fresh_namespace(prefix), &test_amqp_url(), mode).await
    }

    fn fresh_namespace(prefix: &str) -> String {
        format!(
            "kt-{prefix}-{}",
            &uuid::Uuid::now_v7().simple().to_string()[NS_SUFFIX_START..]
        )
    }

    /// This test's namespace on another broker (the nodes a process fails
    /// over between), cleaned up there too.
    pub async fn same_namespace_on(&self, amqp_url: &str) -> Self {
        Self::named_on_broker(self.ns.clone(), amqp_url, self.names.mode()).await
    }

    async fn named_on_broker(ns: String, amqp_url: &str, mode: QueueMode) -> Self {
        crate::init_logging();
        let names = Names::new(&ns).with_mode(mode);
        let conn = kairos_shared::amqp::connect(amqp_url, "kairos-test")
            .await
            .unwrap_or_else(|e| {
                panic!("RabbitMQ must run at {amqp_url} (scripts/services.sh starts the shared one, scripts/cluster.sh a cluster): {e}")
            });
        let channel = conn.create_channel().await.expect("channel");
        kairos_shared::topology::declare_base(&channel, &names)
            .await
            .expect("declare topology");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let redis_url = test_redis_url();
        let redis = redis_connection(&redis_url).await.unwrap_or_else(|e| {
            panic!("Redis must run at {redis_url} (scripts/services.sh starts the shared one, scripts/cluster.sh a cluster): {e}")
        });
        let env = TestEnv {
            ns,
            names,
            conn,
            channel,
            redis,
            amqp_url: amqp_url.to_string(),
            redis_url,
            queues: Arc::new(Mutex::new(Vec::new())),
        };
        env.declare_queue("default").await;
        env
    }

    /// Deletes `queue` with the namespace (a queue the test declared some
    /// other way).
    pub fn delete_with_namespace(&self, queue: String) {
        self.queues.lock().expect("lock").push(queue);
    }

    /// Declares `NS.q.QUEUE` (every band of it in quorum mode) and
    /// remembers it for cleanup.
    pub async fn declare_queue(&self, logical: &str) {
        kairos_shared::topology::declare_task_queue(&self.channel, &self.names, logical)
            .await
            .expect("declare task queue");
        let mut queues = self.queues.lock().expect("lock");
        for band in self.names.bands(logical) {
            queues.push(format!("{}{}", self.names.queue(logical), band.suffix()));
        }
    }

    /// Scheduler settings for this namespace: events on, quick retries,
    /// and the HTTP API on a free port.
    pub fn scheduler_config(&self) -> SchedulerConfig {
        let mut c = SchedulerConfig::for_namespace(&self.ns);
        c.common.amqp_url = self.amqp_url.clone();
        c.redis_url = self.redis_url.clone();
        c.common.queue_mode = self.names.mode();
        c.common.events = true;
        c.retry_base_ms = TEST_RETRY_BASE_MS;
        // Many schedulers share a test process: each takes a free port.
        c.http_addr = ([127, 0, 0, 1], 0).into();
        c
    }

    /// Worker settings for this namespace, with events on.
    pub fn worker_config(&self) -> WorkerConfig {
        let mut c = WorkerConfig::for_namespace(&self.ns);
        c.common.amqp_url = self.amqp_url.clone();
        c.redis_url = self.redis_url.clone();
        c.common.queue_mode = self.names.mode();
        c.common.events = true;
        c.concurrency = TEST_CONCURRENCY;
        c
    }

    /// Environment for a `kairos-*` process in this namespace.
    pub fn process_env(&self) -> Vec<(String, String)> {
        vec![
            ("KAIROS_NAMESPACE".into(), self.ns.clone()),
            ("KAIROS_AMQP_URL".into(), self.amqp_url.clone()),
            ("KAIROS_REDIS_URL".into(), self.redis_url.clone()),
            ("KAIROS_EVENTS".into(), "true".into()),
            ("KAIROS_QUEUE_MODE".into(), self.names.mode().to_string()),
            (
                "KAIROS_RETRY_BASE_MS".into(),
                TEST_RETRY_BASE_MS.to_string(),
            ),
            ("KAIROS_HTTP_ADDR".into(), "127.0.0.1:0".into()),
            (
                "RUST_LOG".into(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ]
    }
}

impl TestEnv {
    /// A Rust [`Client`](kairos_shared::client::Client) of this namespace,
    /// on its broker and in its queue mode (`Client::connect` would take
    /// the mode from `KAIROS_QUEUE_MODE`, which tests do not set).
    pub async fn client(&self) -> kairos_shared::client::Client {
        kairos_shared::client::Client::connect_with(
            &kairos_shared::amqp::Broker::plain(&self.amqp_url),
            self.names.clone(),
        )
        .await
        .expect("connect the Rust client")
    }

    /// The first node of this test's broker, for clients that take one URL
    /// (pika, the Node client, rabbitmqctl-free tools).
    pub fn first_amqp_url(&self) -> &str {
        kairos_shared::amqp::split_urls(&self.amqp_url)
            .next()
            .unwrap_or(AMQP_URL)
    }

    /// The namespace's Redis keys, on every node of a cluster.
    pub async fn redis_keys(&self) -> Vec<String> {
        namespace_keys(
            &self.redis_url,
            &kairos_shared::admin::key_pattern(&self.names),
        )
        .await
    }
}

/// The broker tests run on: `KAIROS_TEST_AMQP_URL` (one URL, or the nodes
/// of a cluster separated by commas), else the shared one.
pub fn test_amqp_url() -> String {
    std::env::var("KAIROS_TEST_AMQP_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| AMQP_URL.to_string())
}

/// The Redis tests run on: `KAIROS_TEST_REDIS_URL` (a server, or a Redis
/// Cluster as `redis+cluster://host:port,...`), else the shared one.
pub fn test_redis_url() -> String {
    std::env::var("KAIROS_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| REDIS_URL.to_string())
}

/// Whether the tests run on a Redis Cluster (`KAIROS_TEST_REDIS_URL`).
pub fn on_redis_cluster() -> bool {
    kairos_shared::redis::cluster_nodes(&test_redis_url()).is_some()
}

/// How long the test's Redis connection waits for a connect or a reply:
/// long enough for a cluster failover.
const TEST_REDIS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection to `url`: to one server, or to a Redis Cluster.
pub async fn redis_connection(url: &str) -> Result<RedisConnection, String> {
    if kairos_shared::redis::cluster_nodes(url).is_none() {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        return client
            .get_multiplexed_async_connection()
            .await
            .map(RedisConnection::Node)
            .map_err(|e| e.to_string());
    }
    kairos_shared::redis::redis_pool(url, &Default::default(), TEST_REDIS_TIMEOUT)
        .map_err(|e| e.to_string())?
        .get()
        .await
        .map_err(|e| e.to_string())
}

/// The keys matching `pattern` on the Redis at `url`: `KEYS` on the server,
/// or on every node of a cluster that answers (each master holds only its
/// slots; replicas repeat their master's, hence the dedup).
pub async fn namespace_keys(url: &str, pattern: &str) -> Vec<String> {
    let nodes = match kairos_shared::redis::cluster_nodes(url) {
        Some(Ok(nodes)) => nodes,
        Some(Err(_)) => return Vec::new(),
        None => vec![url.to_string()],
    };
    let mut keys = std::collections::BTreeSet::new();
    for node in nodes {
        let Ok(client) = redis::Client::open(node.as_str()) else {
            continue;
        };
        let Ok(mut con) = client.get_multiplexed_async_connection().await else {
            continue; // a stopped node
        };
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut con)
            .await
            .unwrap_or_default();
        keys.extend(found);
    }
    keys.into_iter().collect()
}

/// The queue mode of tests that do not choose one: `KAIROS_TEST_QUEUE_MODE`
/// (`classic` or `quorum`), classic when unset, so the whole suite can run
/// on quorum queues.
pub fn test_queue_mode() -> QueueMode {
    match std::env::var("KAIROS_TEST_QUEUE_MODE") {
        Ok(mode) => mode
            .parse()
            .unwrap_or_else(|e| panic!("KAIROS_TEST_QUEUE_MODE: {e}")),
        Err(_) => QueueMode::Classic,
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let names = self.names.clone();
        let amqp_url = self.amqp_url.clone();
        let redis_url = self.redis_url.clone();
        let queues = self.queues.lock().map(|q| q.clone()).unwrap_or_default();
        // Cleanup needs I/O, and Drop is not async: do it on a thread with
        // its own runtime, so it also runs when the test panicked.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(cleanup(names, queues, amqp_url, redis_url));
        })
        .join();
    }
}

/// Removes the namespace: its queues and exchanges, then its Redis keys.
/// Best effort, on connections of its own (the test's may be broken).
async fn cleanup(names: Names, queues: Vec<String>, amqp_url: String, redis_url: String) {
    if let Ok(conn) = kairos_shared::amqp::connect(&amqp_url, "kairos-test-cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            let outcomes = kairos_scheduler::schedules::outcomes::queue_name(&names);
            let _ = kairos_shared::admin::delete_topology(
                &ch,
                &names,
                queues.into_iter().chain([outcomes]),
            )
            .await;
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
    let keys = namespace_keys(&redis_url, &kairos_shared::admin::key_pattern(&names)).await;
    if keys.is_empty() {
        return;
    }
    if let Ok(mut con) = redis_connection(&redis_url).await {
        // A DEL may name keys of one hash slot only on a cluster: one DEL
        // per slot (a single DEL of them all on one server).
        let mut by_slot: std::collections::BTreeMap<u16, Vec<&String>> = Default::default();
        let cluster = matches!(con, RedisConnection::Cluster(_));
        for key in &keys {
            let slot = if cluster {
                kairos_shared::redis_slots::slot_of(key.as_bytes())
            } else {
                0
            };
            by_slot.entry(slot).or_default().push(key);
        }
        for group in by_slot.values() {
            let _: Result<(), _> = redis::cmd("DEL").arg(group).query_async(&mut con).await;
        }
    }
}
