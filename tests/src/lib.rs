//! Test harness for Kairos integration tests: every test gets its own
//! namespace (AMQP names and Redis key prefix), so tests run in parallel on
//! the shared servers, and cleans it up when the test ends, pass or fail.
//!
//! * [`TestEnv`]: namespace, settings, broker and Redis access, cleanup.
//! * [`EventTap`]: a private queue on `NS.events` to await lifecycle events.
//! * [`Proc`]: a real `kairos-scheduler` / `kairos-worker` process (for
//!   kill -9 and signal tests).
//! * [`InProcess`]: a scheduler or worker run in the test's runtime.

pub mod tls;

use futures_util::StreamExt;
use kairos_shared::config::Concurrency;
use kairos_shared::contract::Names;
use kairos_shared::events::EventKind;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use kairos_scheduler::Config as SchedulerConfig;
pub use kairos_worker::Config as WorkerConfig;

pub const AMQP_URL: &str = kairos_shared::config::DEFAULT_AMQP_URL;
pub const REDIS_URL: &str = kairos_shared::config::DEFAULT_REDIS_URL;

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

/// One test's namespace and connections.
pub struct TestEnv {
    pub ns: String,
    pub names: Names,
    pub conn: Connection,
    pub channel: Channel,
    pub redis: redis::aio::MultiplexedConnection,
    /// The broker of this test: the shared one, or an [`OwnRabbit`].
    pub amqp_url: String,
    queues: Arc<Mutex<Vec<String>>>,
}

impl TestEnv {
    pub async fn new(prefix: &str) -> Self {
        Self::on_broker(prefix, AMQP_URL).await
    }

    /// As [`new`](Self::new), on the broker at `amqp_url` (an
    /// [`OwnRabbit`]); Redis is the shared one.
    pub async fn on_broker(prefix: &str, amqp_url: &str) -> Self {
        init_logging();
        let ns = format!(
            "kt-{prefix}-{}",
            &uuid::Uuid::now_v7().simple().to_string()[22..]
        );
        let names = Names::new(&ns);
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

    /// Declares `NS.q.QUEUE` and remembers it for cleanup.
    pub async fn declare_queue(&self, logical: &str) {
        kairos_shared::topology::declare_task_queue(&self.channel, &self.names, logical)
            .await
            .expect("declare task queue");
        self.queues
            .lock()
            .expect("lock")
            .push(self.names.queue(logical));
    }

    pub fn scheduler_config(&self) -> SchedulerConfig {
        let mut c = SchedulerConfig::for_namespace(&self.ns);
        c.common.amqp_url = self.amqp_url.clone();
        c.common.events = true;
        c.retry_base_ms = 100;
        // Many schedulers share a test process: each takes a free port.
        c.http_addr = ([127, 0, 0, 1], 0).into();
        c
    }

    pub fn worker_config(&self) -> WorkerConfig {
        let mut c = WorkerConfig::for_namespace(&self.ns);
        c.common.amqp_url = self.amqp_url.clone();
        c.common.events = true;
        c.concurrency = Concurrency { min: 4, max: 32 };
        c
    }

    /// Environment for a `kairos-*` process in this namespace.
    pub fn process_env(&self) -> Vec<(String, String)> {
        vec![
            ("KAIROS_NAMESPACE".into(), self.ns.clone()),
            ("KAIROS_AMQP_URL".into(), self.amqp_url.clone()),
            ("KAIROS_REDIS_URL".into(), REDIS_URL.into()),
            ("KAIROS_EVENTS".into(), "true".into()),
            ("KAIROS_RETRY_BASE_MS".into(), "100".into()),
            ("KAIROS_HTTP_ADDR".into(), "127.0.0.1:0".into()),
            (
                "RUST_LOG".into(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ]
    }

    /// Publishes one message with confirms.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        props: BasicProperties,
        body: &[u8],
    ) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "broker did not confirm");
    }

    /// Publishes many messages with their confirms outstanding together.
    pub async fn publish_many(
        &self,
        exchange: &str,
        messages: Vec<(String, BasicProperties, Vec<u8>)>,
    ) {
        let mut confirms = Vec::with_capacity(messages.len());
        for (key, props, body) in messages {
            confirms.push(
                self.channel
                    .basic_publish(
                        exchange.into(),
                        key.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
                    .expect("publish"),
            );
        }
        for c in futures_util::future::join_all(confirms).await {
            assert!(c.expect("confirm").is_ack());
        }
    }

    /// Waits until `n` messages arrived in `NS.dead`, and returns them.
    pub async fn dead_letters(&self, n: usize, within: Duration) -> Vec<DeadLetter> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let got = self
                .channel
                .basic_get(
                    self.names.dead().as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic_get");
            match got {
                Some(m) => out.push(DeadLetter {
                    routing_key: m.delivery.routing_key.to_string(),
                    props: m.delivery.properties.clone(),
                    body: m.delivery.data.clone(),
                }),
                None => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "only {} of {n} dead letters arrived",
                        out.len()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        out
    }

    /// Declares a queue bound to `exchange` (with `key`) that refuses every
    /// message: `x-max-length` 0 with `x-overflow: reject-publish`, so the
    /// broker nacks each publish routed to it. Removed with the namespace.
    /// Returns its name.
    pub async fn declare_refusing_queue(&self, exchange: &str, key: &str) -> String {
        let name = format!(
            "{}.refuse.{}",
            self.ns,
            self.queues.lock().expect("lock").len()
        );
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(0));
        args.insert(
            "x-overflow".into(),
            lapin::types::AMQPValue::LongString("reject-publish".into()),
        );
        self.channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
            .await
            .expect("declare refusing queue");
        self.channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind refusing queue");
        self.queues.lock().expect("lock").push(name.clone());
        name
    }

    /// Deletes a queue now (e.g. a refusing queue, so publishes flow again).
    pub async fn delete_queue(&self, queue: &str) {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .expect("delete queue");
    }

    /// Messages now in a queue.
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let q = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        q.message_count()
    }

    /// Redis keys of this namespace.
    pub async fn redis_keys(&self) -> Vec<String> {
        let mut con = self.redis.clone();
        redis::cmd("KEYS")
            .arg(format!("{}:*", self.ns))
            .query_async(&mut con)
            .await
            .expect("KEYS")
    }

    /// A consumer on a task queue, for tests that read what the scheduler
    /// publishes without a worker.
    pub async fn consume_queue(&self, logical: &str, prefetch: u16) -> Consumer {
        let ch = self.conn.create_channel().await.expect("channel");
        ch.basic_qos(prefetch, lapin::options::BasicQosOptions::default())
            .await
            .expect("qos");
        ch.basic_consume(
            self.names.queue_name(logical).expect("queue name"),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let ns = self.ns.clone();
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
            rt.block_on(cleanup(ns, names, queues, amqp_url));
        })
        .join();
    }
}

async fn cleanup(ns: String, names: Names, queues: Vec<String>, amqp_url: String) {
    if let Ok(conn) = kairos_shared::amqp::connect(&amqp_url, "kairos-test-cleanup").await {
        if let Ok(ch) = conn.create_channel().await {
            let all_queues = queues
                .into_iter()
                .chain([names.delay(), names.retry(), names.dead()])
                .chain([kairos_scheduler::schedules::outcomes::queue_name(&names)]);
            for q in all_queues {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for e in [
                names.tasks_exchange(),
                names.delay(),
                names.retry(),
                names.dead(),
                names.events(),
            ] {
                let _ = ch
                    .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
    if let Ok(client) = redis::Client::open(REDIS_URL) {
        if let Ok(mut con) = client.get_multiplexed_async_connection().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{ns}:*"))
                .query_async(&mut con)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut con).await;
            }
        }
    }
}

/// A message taken from `NS.dead`.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub routing_key: String,
    pub props: BasicProperties,
    pub body: Vec<u8>,
}

impl DeadLetter {
    pub fn header(&self, name: &str) -> Option<String> {
        self.props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name))
            .map(kairos_shared::contract::value_to_string)
    }

    pub fn id(&self) -> Option<String> {
        self.props.message_id().as_ref().map(|s| s.to_string())
    }
}

/// A task message as the contract describes it, for tests that publish
/// raw AMQP like a client in another language would.
pub fn task_props(name: &str, id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_type(name.into())
        .with_message_id(id.into())
        .with_delivery_mode(2)
}

pub fn with_headers(
    props: BasicProperties,
    headers: &[(&str, lapin::types::AMQPValue)],
) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    for (k, v) in headers {
        table.insert((*k).into(), v.clone());
    }
    props.with_headers(table)
}

/// One lifecycle event as received.
#[derive(Clone, Debug)]
pub struct SeenEvent {
    pub kind: String,
    pub id: String,
    pub name: String,
    pub attempt: u64,
    pub at: i64,
    pub due_at: Option<i64>,
    pub error: Option<String>,
    pub raw: Value,
}

/// A private queue bound to `NS.events`; collects events as they arrive.
pub struct EventTap {
    rx: tokio::sync::mpsc::UnboundedReceiver<SeenEvent>,
    pub seen: Vec<SeenEvent>,
    _task: JoinHandle<()>,
}

impl EventTap {
    pub async fn new(env: &TestEnv) -> Self {
        Self::on(&env.conn, &env.names).await
    }

    /// A tap on another broker (one a test started itself).
    pub async fn on(conn: &Connection, names: &Names) -> Self {
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("event queue");
        ch.queue_bind(
            q.name().clone(),
            names.events().into(),
            "task.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind events");
        let mut consumer = ch
            .basic_consume(
                q.name().clone(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume events");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _keep = ch;
            while let Some(Ok(d)) = consumer.next().await {
                let Ok(v) = serde_json::from_slice::<Value>(&d.data) else {
                    continue;
                };
                let ev = SeenEvent {
                    kind: v["event"].as_str().unwrap_or_default().to_string(),
                    id: v["id"].as_str().unwrap_or_default().to_string(),
                    name: v["name"].as_str().unwrap_or_default().to_string(),
                    attempt: v["attempt"].as_u64().unwrap_or_default(),
                    at: v["at"].as_i64().unwrap_or_default(),
                    due_at: v["due_at"].as_i64(),
                    error: v["error"].as_str().map(str::to_string),
                    raw: v,
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        EventTap {
            rx,
            seen: Vec::new(),
            _task: task,
        }
    }

    /// Waits until `done(seen)` holds, or panics after `within`.
    pub async fn wait_until(
        &mut self,
        within: Duration,
        what: &str,
        done: impl Fn(&[SeenEvent]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.seen.push(ev),
                Ok(None) => panic!("event stream ended while waiting for {what}"),
                Err(_) => panic!(
                    "timed out after {within:?} waiting for {what}; saw {} events",
                    self.seen.len()
                ),
            }
        }
    }

    /// Waits for `n` events of `kind` with distinct ids.
    pub async fn wait_distinct(&mut self, kind: EventKind, n: usize, within: Duration) {
        let k = kind.as_str();
        self.wait_until(within, &format!("{n} distinct {k} events"), |seen| {
            distinct_ids(seen, k) >= n
        })
        .await;
    }

    /// Like [`EventTap::wait_until`], but says whether `done` held in time
    /// instead of panicking, for tests that explain a shortfall themselves.
    pub async fn try_wait_until(
        &mut self,
        within: Duration,
        done: impl Fn(&[SeenEvent]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.seen.push(ev),
                Ok(None) | Err(_) => return false,
            }
        }
        true
    }

    /// Keeps collecting for `quiet`: for checks that nothing more arrives
    /// (a duplicate would come right behind what was awaited).
    pub async fn collect_for(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            self.seen.push(ev);
        }
    }

    /// Events of one kind.
    pub fn of(&self, kind: EventKind) -> Vec<&SeenEvent> {
        self.seen
            .iter()
            .filter(|e| e.kind == kind.as_str())
            .collect()
    }
}

/// How many distinct task ids have an event of `kind`.
pub fn distinct_ids(seen: &[SeenEvent], kind: &str) -> usize {
    let mut ids: HashMap<&str, ()> = HashMap::new();
    for e in seen.iter().filter(|e| e.kind == kind) {
        ids.insert(&e.id, ());
    }
    ids.len()
}

/// Acks a delivery a test consumed.
pub async fn ack(d: &lapin::message::Delivery) {
    d.acker.ack(BasicAckOptions::default()).await.expect("ack");
}

/// A scheduler or worker running in this test's runtime.
pub struct InProcess {
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl InProcess {
    pub fn scheduler(config: SchedulerConfig) -> Self {
        Self::spawn(move |shutdown| async move {
            kairos_scheduler::run(config, shutdown)
                .await
                .expect("scheduler run");
        })
    }

    pub fn worker(worker: kairos_worker::Worker) -> Self {
        Self::spawn(move |shutdown| async move {
            worker.run(shutdown).await.expect("worker run");
        })
    }

    fn spawn<F, Fut>(f: F) -> Self
    where
        F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = rx.await;
        });
        InProcess {
            stop: Some(tx),
            handle: Some(tokio::spawn(f(shutdown))),
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("service task");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// A `kairos-*` binary built by `cargo build` (the test command builds the
/// workspace's binaries first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A child process, killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, env: &[(String, String)]) -> Self {
        let mut cmd = Command::new(binary(name));
        cmd.envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        Proc {
            child: cmd.spawn().expect("spawn kairos binary"),
        }
    }

    /// As [`spawn`](Self::spawn), with the output (the log goes to stdout)
    /// appended to `log` for the test to read.
    pub fn spawn_logged(name: &str, env: &[(String, String)], log: &std::path::Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let err = file.try_clone().expect("log file");
        let mut cmd = Command::new(binary(name));
        cmd.envs(env.iter().cloned())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        Proc {
            child: cmd.spawn().expect("spawn kairos binary"),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "process did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Percentile of a sorted slice (nearest rank).
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The Python interpreter with pika: `KAIROS_TEST_PYTHON`, else the venv
/// `scripts/test.sh` makes (`target/py`), else `python3`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("KAIROS_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join("target/py/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs the documented Python example (docs/examples/python/enqueue.py)
/// and returns what it printed.
pub fn python_enqueue(env: &TestEnv, args: &[&str]) -> Value {
    let out = Command::new(python())
        .arg(workspace_root().join("docs/examples/python/enqueue.py"))
        .args(["--namespace", &env.ns, "--amqp-url", AMQP_URL])
        .args(args)
        .output()
        .expect("run python (scripts/test.sh installs pika into target/py)");
    assert!(
        out.status.success(),
        "enqueue.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("enqueue.py prints JSON")
}

/// Records which task ids a handler ran, for tests whose completion signal
/// must survive a broker restart (events travel through the broker).
#[derive(Clone, Default)]
pub struct RunLog {
    runs: Arc<Mutex<HashMap<String, usize>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl RunLog {
    pub fn record(&self, id: &str) {
        if let Ok(mut runs) = self.runs.lock() {
            *runs.entry(id.to_string()).or_default() += 1;
        }
        self.notify.notify_waiters();
    }

    pub fn distinct(&self) -> usize {
        self.runs.lock().map(|r| r.len()).unwrap_or(0)
    }

    pub fn runs_of(&self, id: &str) -> usize {
        self.runs
            .lock()
            .map(|r| r.get(id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.runs.lock().map(|r| r.values().sum()).unwrap_or(0)
    }

    /// Waits until `n` distinct ids ran.
    pub async fn wait_distinct(&self, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.notify.notified();
            if self.distinct() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "only {} of {n} tasks ran within {within:?}",
                    self.distinct()
                );
            }
        }
    }

    /// A handler that records the task id, then sleeps `ms`.
    pub fn handler(&self, ms: u64) -> impl kairos_worker::Handler {
        let log = self.clone();
        move |ctx: kairos_worker::TaskContext, _body: Vec<u8>| {
            let log = log.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                log.record(&ctx.id);
                Ok(())
            }
        }
    }
}

/// A private `redis-server` on a free port, with AOF so that a restart
/// keeps its data; killed when dropped.
pub struct OwnRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Settings after the defaults (they win over them), e.g. `--maxmemory`.
    extra: Vec<String>,
}

impl OwnRedis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments, e.g.
    /// `["--maxmemory-policy", "allkeys-lru"]` or `["--replicaof", "127.0.0.1", "6380"]`.
    pub fn start_with(extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = std::env::temp_dir().join(format!("kairos-redis-{port}"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut r = OwnRedis {
            port,
            dir,
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port and data directory.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/services.sh installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "own redis did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP) until [`resume`](Self::resume): a
    /// replica that stops acknowledging, a primary that stops answering.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "kill {sig} own redis");
        }
    }

    /// A connection of the test's own to this server, without a reply
    /// timeout (a `DEBUG SLEEP` on it takes as long as it takes).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let settings = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection_with_config(&settings)
            .await
            .expect("own redis connection")
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private RabbitMQ node: its own node name, ports and data directory
/// (management off), for tests that make the broker misbehave (a memory
/// alarm) without touching the shared one. Stopped and removed on drop.
/// Starting takes 10 to 30 s on a loaded 2-core machine.
pub struct OwnRabbit {
    pub port: u16,
    pub node: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnRabbit {
    /// The server scripts that run as the calling user: the ones in
    /// /usr/sbin switch to the `rabbitmq` user (another home, another
    /// Erlang cookie).
    const BIN: &'static str = "/usr/lib/rabbitmq/bin";

    /// Starts a node and waits until it accepts AMQP connections. Blocking.
    pub fn start() -> Self {
        let port = free_port();
        let dist = free_port();
        let node = format!("kairos-test-{port}@localhost");
        let dir = std::env::temp_dir().join(format!("kairos-rabbit-{port}"));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("rabbit dir");
        }
        std::fs::write(dir.join("enabled_plugins"), "[].").expect("plugins file");
        let child = Command::new(format!("{}/rabbitmq-server", Self::BIN))
            // The Erlang cookie is made in, and read from, HOME: the node
            // and `ctl` share it.
            .env("HOME", &dir)
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitmq-server must be installed");
        let rabbit = OwnRabbit {
            port,
            node,
            dir,
            child: Some(child),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "own RabbitMQ did not start (logs in {})",
                rabbit.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        rabbit
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl -n NODE ARGS` against this node only. Blocking.
    pub fn ctl(&self, args: &[&str]) {
        let out = Command::new(format!("{}/rabbitmqctl", Self::BIN))
            .env("HOME", &self.dir)
            .args(["-n", &self.node])
            .args(args)
            .output()
            .expect("run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A memory alarm: the node blocks every connection that publishes.
    pub fn block_publishers(&self) {
        self.ctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
    }

    /// Back to the default watermark: the alarm clears.
    pub fn unblock_publishers(&self) {
        self.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        let _ = Command::new(format!("{}/rabbitmqctl", Self::BIN))
            .env("HOME", &self.dir)
            .args(["-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the documented Node example (docs/examples/node/enqueue.js) with
/// the amqplib that `scripts/test.sh` installs into `target/node`.
pub fn node_enqueue(env: &TestEnv, args: &[&str]) -> Value {
    let out = Command::new("node")
        .arg(workspace_root().join("docs/examples/node/enqueue.js"))
        .args(["--namespace", &env.ns, "--amqp-url", AMQP_URL])
        .args(args)
        .env(
            "NODE_PATH",
            workspace_root().join("target/node/node_modules"),
        )
        .output()
        .expect("run node (scripts/test.sh installs amqplib into target/node)");
    assert!(
        out.status.success(),
        "enqueue.js failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("enqueue.js prints JSON")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `GET http://127.0.0.1:PORT/PATH` with a bare HTTP/1.0 request: (status,
/// body). Errors (nothing listening yet) are `None`.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Lines of a log file that contain `needle`.
pub fn log_lines(log: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// A free local address for a scheduler's HTTP API (bound, then released).
pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// The schedules HTTP API of one scheduler, through kairosctl's client
/// (blocking, so each call runs on the blocking pool).
#[derive(Clone)]
pub struct ScheduleApi {
    pub addr: String,
}

impl ScheduleApi {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        ScheduleApi {
            addr: addr.to_string(),
        }
    }

    pub async fn call(
        &self,
        f: impl FnOnce(&kairosctl::Api) -> Result<kairosctl::Reply, String> + Send + 'static,
    ) -> kairosctl::Reply {
        let addr = self.addr.clone();
        tokio::task::spawn_blocking(move || f(&kairosctl::Api::new(&addr)))
            .await
            .expect("api task")
            .expect("scheduler HTTP API")
    }

    pub async fn put(&self, id: &str, spec: Value) -> kairosctl::Reply {
        let id = id.to_string();
        self.call(move |a| a.put(&id, &spec)).await
    }

    pub async fn get(&self, id: &str) -> kairosctl::Reply {
        let id = id.to_string();
        self.call(move |a| a.get(&id)).await
    }

    /// Waits until the API answers (a process scheduler is starting).
    pub async fn wait_ready(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let addr = self.addr.clone();
            let ok = tokio::task::spawn_blocking(move || kairosctl::Api::new(&addr).list())
                .await
                .map(|r| r.is_ok_and(|r| r.ok()))
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "scheduler API at {} did not answer",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl RunLog {
    /// Every id that ran, with its run count.
    pub fn snapshot(&self) -> HashMap<String, usize> {
        self.runs.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Ticks of schedule `id` that ran (task ids `id@tick`), sorted.
    pub fn ticks_of(&self, schedule: &str) -> Vec<i64> {
        let mut ticks: Vec<i64> = self
            .snapshot()
            .keys()
            .filter_map(|k| {
                let (s, t) = k.rsplit_once('@')?;
                (s == schedule).then(|| t.parse().ok()).flatten()
            })
            .collect();
        ticks.sort_unstable();
        ticks
    }

    /// Waits until `done(self)` holds.
    pub async fn wait_for(&self, within: Duration, what: &str, done: impl Fn(&RunLog) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "timed out after {within:?} waiting for {what}; ran: {:?}",
                    self.snapshot()
                );
            }
        }
    }
}

/// `n` `kairos-scheduler` processes in the test's namespace, each with its
/// API on its own address; returns once every API answers.
pub async fn scheduler_processes(env: &TestEnv, n: usize) -> (Vec<Proc>, Vec<ScheduleApi>) {
    let mut procs = Vec::new();
    let mut apis = Vec::new();
    for _ in 0..n {
        let addr = free_addr();
        let mut penv = env.process_env();
        penv.push(("KAIROS_HTTP_ADDR".into(), addr.to_string()));
        procs.push(Proc::spawn("kairos-scheduler", &penv));
        apis.push(ScheduleApi::new(addr));
    }
    for api in &apis {
        api.wait_ready(Duration::from_secs(20)).await;
    }
    (procs, apis)
}
