//! Talking to Kairos as a client does: publishing tasks (raw AMQP, or the
//! documented Python and Node examples), reading queues and dead letters,
//! and the HTTP APIs ([`http_get`], [`ScheduleApi`]).

use crate::namespace::TestEnv;
use crate::processes::{run_ok, workspace_root};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Consumer};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// How often [`TestEnv::dead_letters`] looks into an empty `NS.dead`.
const DEAD_LETTER_POLL: Duration = Duration::from_millis(20);
/// How often [`TestEnv::wait_depth`] looks at a queue.
const DEPTH_POLL: Duration = Duration::from_millis(20);
/// How long [`http_get`] waits for a reply.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`ScheduleApi::wait_ready`] asks a starting scheduler.
const API_POLL: Duration = Duration::from_millis(50);
/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

impl TestEnv {
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
                    tokio::time::sleep(DEAD_LETTER_POLL).await;
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
        args.insert("x-max-length".into(), AMQPValue::LongInt(0));
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
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
        kairos_shared::admin::queue_depth(&self.channel, queue)
            .await
            .expect("passive declare")
    }

    /// Consumers of `queue` now (a passive declare).
    pub async fn consumer_count(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect("passive declare")
            .consumer_count()
    }

    /// Polls the depth of `queue` until `done(depth)` holds; panics,
    /// saying `what` did not happen, after `within`.
    pub async fn wait_depth(
        &self,
        queue: &str,
        within: Duration,
        what: &str,
        done: impl Fn(u32) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while !done(self.queue_depth(queue).await) {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(DEPTH_POLL).await;
        }
    }

    /// Waits until `NS.dead` holds at least `n` messages (without taking
    /// them, unlike [`dead_letters`](Self::dead_letters)).
    pub async fn wait_dead_depth(&self, n: u32, within: Duration) {
        let what = format!("{n} dead letters did not arrive within {within:?}");
        self.wait_depth(&self.names.dead(), within, &what, |depth| depth >= n)
            .await;
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

/// A message taken from `NS.dead`.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The routing key it was dead-lettered with (its logical queue).
    pub routing_key: String,
    /// Its properties, with the failure headers.
    pub props: BasicProperties,
    /// Its body, as the task had it.
    pub body: Vec<u8>,
}

impl DeadLetter {
    /// Header `name` as text, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name))
            .map(kairos_shared::contract::value_to_string)
    }

    /// The task id (`message_id`), if present.
    pub fn id(&self) -> Option<String> {
        self.props.message_id().as_ref().map(|s| s.to_string())
    }
}

/// The dead letter of task `id` among `dead`; panics, listing them all,
/// when it is not there.
pub fn dead_letter_of<'a>(dead: &'a [DeadLetter], id: &str) -> &'a DeadLetter {
    dead.iter()
        .find(|d| d.id().as_deref() == Some(id))
        .unwrap_or_else(|| panic!("{id} not dead-lettered: {dead:?}"))
}

/// Why task `id` was dead-lettered: its `x-error` header; panics when it
/// is not among `dead` or has no such header.
pub fn dead_letter_error(dead: &[DeadLetter], id: &str) -> String {
    dead_letter_of(dead, id)
        .header(kairos_shared::contract::H_ERROR)
        .unwrap_or_else(|| panic!("{id} has no x-error"))
}

/// Messages for [`TestEnv::publish_many`]: (routing key, properties, body).
pub type Batch = Vec<(String, BasicProperties, Vec<u8>)>;

/// `n` messages with empty bodies for the `default` queue, the i-th with
/// properties `props(i)`.
pub fn batch(n: usize, props: impl Fn(usize) -> BasicProperties) -> Batch {
    (0..n)
        .map(|i| ("default".to_string(), props(i), Vec::new()))
        .collect()
}

/// A task for [`TestEnv::publish`] to `NS.delay` that is due `delay_ms`
/// after the scheduler takes it (`x-delay-ms`).
pub fn delayed_props(name: &str, id: &str, delay_ms: i32) -> BasicProperties {
    with_headers(
        task_props(name, id),
        &[("x-delay-ms", AMQPValue::LongInt(delay_ms))],
    )
}

/// A task message as the contract describes it, for tests that publish
/// raw AMQP like a client in another language would.
pub fn task_props(name: &str, id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_type(name.into())
        .with_message_id(id.into())
        .with_delivery_mode(PERSISTENT)
}

/// `props` with `headers` added (replacing any of the same name).
pub fn with_headers(props: BasicProperties, headers: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    for (k, v) in headers {
        table.insert((*k).into(), v.clone());
    }
    props.with_headers(table)
}

/// Acks a delivery a test consumed.
pub async fn ack(d: &lapin::message::Delivery) {
    d.acker.ack(BasicAckOptions::default()).await.expect("ack");
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

/// Runs the documented Python example (docs/examples/python/enqueue.py)
/// and returns what it printed.
pub fn python_enqueue(env: &TestEnv, args: &[&str]) -> Value {
    let out = run_ok(
        Command::new(python())
            .arg(workspace_root().join("docs/examples/python/enqueue.py"))
            .args(["--namespace", &env.ns, "--amqp-url", env.first_amqp_url()])
            .args(args),
        "enqueue.py",
        "run python (scripts/test.sh installs pika into target/py)",
    );
    serde_json::from_slice(&out.stdout).expect("enqueue.py prints JSON")
}

/// Runs the documented Node example (docs/examples/node/enqueue.js) with
/// the amqplib that `scripts/test.sh` installs into `target/node`.
pub fn node_enqueue(env: &TestEnv, args: &[&str]) -> Value {
    let out = run_ok(
        Command::new("node")
            .arg(workspace_root().join("docs/examples/node/enqueue.js"))
            .args(["--namespace", &env.ns, "--amqp-url", env.first_amqp_url()])
            .args(args)
            .env(
                "NODE_PATH",
                workspace_root().join("target/node/node_modules"),
            ),
        "enqueue.js",
        "run node (scripts/test.sh installs amqplib into target/node)",
    );
    serde_json::from_slice(&out.stdout).expect("enqueue.js prints JSON")
}

/// `GET http://127.0.0.1:PORT/PATH` with a bare HTTP/1.0 request: (status,
/// body). Errors (nothing listening yet) are `None`.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(HTTP_TIMEOUT)).ok()?;
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

/// The schedules HTTP API of one scheduler, through kairosctl's client
/// (blocking, so each call runs on the blocking pool).
#[derive(Clone)]
pub struct ScheduleApi {
    /// `HOST:PORT` of the scheduler's HTTP API.
    pub addr: String,
}

impl ScheduleApi {
    /// The API at `addr`.
    pub fn new(addr: std::net::SocketAddr) -> Self {
        ScheduleApi {
            addr: addr.to_string(),
        }
    }

    /// Runs `f` with a kairosctl client on the blocking pool; panics when
    /// the API cannot be reached (a reply with an error status is returned).
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

    /// `PUT /v1/schedules/ID` with `spec`.
    pub async fn put(&self, id: &str, spec: Value) -> kairosctl::Reply {
        let id = id.to_string();
        self.call(move |a| a.put(&id, &spec)).await
    }

    /// `GET /v1/schedules/ID`.
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
            tokio::time::sleep(API_POLL).await;
        }
    }
}
