//! [`TestEnv`]: one test's namespace on the shared servers. Every test
//! gets its own namespace (AMQP names and Redis key prefix), so tests run
//! in parallel, and the namespace is removed when the test ends, pass or
//! fail. Settings for services in the namespace come from here too.

use crate::servers::{AMQP_URL, REDIS_URL};
use kairos_shared::config::Concurrency;
use kairos_shared::contract::Names;
use kairos_shared::queue_mode::QueueMode;
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
    /// A connection to the shared Redis.
    pub redis: redis::aio::MultiplexedConnection,
    /// The broker of this test: the shared one, or an [`OwnRabbit`](crate::OwnRabbit).
    pub amqp_url: String,
    /// Queues to delete with the namespace (task queues, refusing queues).
    pub(crate) queues: Arc<Mutex<Vec<String>>>,
}

impl TestEnv {
    /// A new namespace on the shared servers, named after `prefix`, with
    /// its base topology and the `default` task queue declared.
    pub async fn new(prefix: &str) -> Self {
        Self::on_broker(prefix, AMQP_URL).await
    }

    /// As [`new`](Self::new), on the broker at `amqp_url` (an
    /// [`OwnRabbit`](crate::OwnRabbit)); Redis is the shared one.
    pub async fn on_broker(prefix: &str, amqp_url: &str) -> Self {
        Self::named_on_broker(Self::fresh_namespace(prefix), amqp_url, test_queue_mode()).await
    }

    /// As [`new`](Self::new), with queues of `mode` whatever
    /// `KAIROS_TEST_QUEUE_MODE` says (quorum queues work on one node too).
    pub async fn with_mode(prefix: &str, mode: QueueMode) -> Self {
        Self::named_on_broker(Self::fresh_namespace(prefix), AMQP_URL, mode).await
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
            .expect("RabbitMQ must run at 127.0.0.1:5672 (scripts/services.sh starts it)");
        let channel = conn.create_channel().await.expect("channel");
        kairos_shared::topology::declare_base(&channel, &names)
            .await
            .expect("declare topology");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let redis = redis::Client::open(REDIS_URL)
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("Redis must run at 127.0.0.1:6379 (scripts/services.sh starts it)");
        let env = TestEnv {
            ns,
            names,
            conn,
            channel,
            redis,
            amqp_url: amqp_url.to_string(),
            queues: Arc::new(Mutex::new(Vec::new())),
        };
        env.declare_queue("default").await;
        env
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
            ("KAIROS_REDIS_URL".into(), REDIS_URL.into()),
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
            rt.block_on(cleanup(names, queues, amqp_url));
        })
        .join();
    }
}

/// Removes the namespace: its queues and exchanges, then its Redis keys.
/// Best effort, on connections of its own (the test's may be broken).
async fn cleanup(names: Names, queues: Vec<String>, amqp_url: String) {
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
    if let Ok(client) = redis::Client::open(REDIS_URL) {
        if let Ok(mut con) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(kairos_shared::admin::key_pattern(&names))
                .query_async(&mut con)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut con).await;
            }
        }
    }
}
