//! Issue 17: a queue's order (`KAIROS_QUEUE_ORDER`). A backlog of tasks
//! with mixed priorities, costs and estimates, some of them through the
//! delay queue (the pump's publish), waits while no worker consumes; then
//! one worker running one task at a time (prefetch 1) takes them, and the
//! order it ran them in is the queue's order.

use kairos_shared::client::{Client, ClientError, NewTask};
use kairos_shared::contract::Names;
use kairos_shared::order::QueueOrders;
use kairos_shared::topology::{declare_task_queue, DeclareError};
use kairos_tests::*;
use kairos_worker::Worker;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use std::time::Duration;
use tokio::sync::mpsc;

/// The queue of each order in these tests.
const ORDERS: &str = "fifo-q:fifo,short-q:shortest-first";
/// Long enough for a backlog on a shared, busy machine.
const WITHIN: Duration = Duration::from_secs(60);

/// One task of a backlog: its id, and how it is published.
struct Backlog {
    id: &'static str,
    priority: u8,
    cost: Option<u32>,
    estimate_ms: Option<u64>,
    delay_ms: Option<i64>,
    /// Sent to the scheduler's HTTP API (`POST /v1/tasks`) rather than
    /// with the Rust client.
    http: bool,
}

const fn task(id: &'static str, priority: u8) -> Backlog {
    Backlog {
        id,
        priority,
        cost: None,
        estimate_ms: None,
        delay_ms: None,
        http: false,
    }
}

impl Backlog {
    const fn cost(mut self, c: u32) -> Self {
        self.cost = Some(c);
        self
    }
    const fn estimate(mut self, ms: u64) -> Self {
        self.estimate_ms = Some(ms);
        self
    }
    const fn delayed(mut self, ms: i64) -> Self {
        self.delay_ms = Some(ms);
        self
    }
    const fn http(mut self) -> Self {
        self.http = true;
        self
    }

    /// The task as `POST /v1/tasks` takes it.
    fn http_body(&self, queue: &str) -> serde_json::Value {
        serde_json::json!({
            "name": "test.order",
            "queue": queue,
            "id": self.id,
            "priority": self.priority,
            "cost": self.cost,
            "estimate_ms": self.estimate_ms,
        })
    }

    fn new_task(&self, queue: &str) -> NewTask {
        let mut t = NewTask::new("test.order")
            .queue(queue)
            .id(self.id)
            .priority(self.priority);
        if let Some(c) = self.cost {
            t = t.cost(c);
        }
        if let Some(ms) = self.estimate_ms {
            t = t.estimate_ms(ms);
        }
        if let Some(ms) = self.delay_ms {
            t = t.delay_ms(ms);
        }
        t
    }

    /// The task as raw AMQP for `NS.delay`, as a client in another
    /// language publishes it: its priority as given, whatever the queue's
    /// order, so only the pump can put it in its place.
    fn delayed_message(&self, queue: &str) -> (String, BasicProperties, Vec<u8>) {
        let delay = i32::try_from(self.delay_ms.unwrap_or(0)).expect("a short delay");
        let mut headers = Vec::new();
        if let Some(c) = self.cost {
            headers.push(("x-cost", AMQPValue::LongLongInt(i64::from(c))));
        }
        if let Some(ms) = self.estimate_ms {
            let ms = i64::try_from(ms).expect("a test estimate");
            headers.push(("x-estimate-ms", AMQPValue::LongLongInt(ms)));
        }
        let props = with_headers(delayed_props("test.order", self.id, delay), &headers)
            .with_priority(self.priority);
        (queue.to_string(), props, Vec::new())
    }
}

fn orders() -> QueueOrders {
    ORDERS.parse().expect("orders")
}

/// Publishes `backlog` to `queue` (the ready tasks first, in order, with
/// the Rust client; then those marked `http` through the scheduler's HTTP
/// API; then the delayed ones as raw AMQP, which the scheduler's pump
/// publishes when due, in the order of their delays), waits
/// until all are in the queue, then runs one worker with concurrency 1 and
/// prefetch 1. Returns the ids in the order the worker ran them.
async fn run_backlog(prefix: &str, queue: &str, backlog: &[Backlog]) -> Vec<String> {
    let mut env = TestEnv::new(prefix).await;
    // The test's own declares, the scheduler, the client and the worker
    // all take the same orders, as the processes would from one setting.
    env.names = env.names.clone().with_orders(orders());
    env.declare_queue(queue).await;
    let mut sc = env.scheduler_config();
    sc.common.queue_order = orders();
    let api_addr = free_addr();
    sc.http_addr = api_addr;
    let scheduler = InProcess::scheduler(sc);
    let api = ScheduleApi::new(api_addr);

    let client = Client::connect_with(
        &kairos_shared::amqp::Broker::plain(&env.amqp_url),
        env.names.clone(),
    )
    .await
    .expect("client");
    let (ready, delayed): (Vec<_>, Vec<_>) = backlog.iter().partition(|t| t.delay_ms.is_none());
    let (http, ready): (Vec<_>, Vec<_>) = ready.into_iter().partition(|t| t.http);
    let ready: Vec<NewTask> = ready.iter().map(|t| t.new_task(queue)).collect();
    client.enqueue_many(&ready).await.expect("enqueue ready");
    api.wait_ready(WITHIN).await;
    for t in &http {
        let body = t.http_body(queue);
        let reply = api.call(move |a| a.enqueue(&body)).await;
        assert!(reply.ok(), "POST /v1/tasks: {reply:?}");
    }
    for t in &delayed {
        let (key, props, body) = t.delayed_message(queue);
        env.publish(&env.names.delay(), &key, props, &body).await;
    }
    let n = u32::try_from(backlog.len()).expect("a small backlog");
    env.wait_depth(
        &env.names.queue(queue),
        WITHIN,
        "the backlog (the delayed tasks too) did not reach the queue",
        |depth| depth == n,
    )
    .await;

    let (ran, mut order) = mpsc::unbounded_channel::<String>();
    let mut wc = env.worker_config();
    wc.common.queue_order = orders();
    wc.queues = vec![queue.to_string()];
    wc.concurrency = "1".parse().expect("concurrency");
    wc.prefetch = Some(1);
    // Room for the heaviest task of the backlog: one at a time runs anyway
    // (concurrency 1), and none is dead-lettered for its `x-cost`.
    wc.capacity = Some(100);
    let worker = InProcess::worker(Worker::new(wc).handler(
        "test.order",
        move |ctx: kairos_worker::TaskContext, _body: Vec<u8>| {
            let ran = ran.clone();
            async move {
                let _ = ran.send(ctx.id.clone());
                Ok(())
            }
        },
    ));
    let mut ids = Vec::with_capacity(backlog.len());
    while ids.len() < backlog.len() {
        match tokio::time::timeout(WITHIN, order.recv()).await {
            Ok(Some(id)) => ids.push(id),
            _ => panic!("only {ids:?} ran within {WITHIN:?}"),
        }
    }
    worker.stop().await;
    scheduler.stop().await;
    let _ = client.close().await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_queue_runs_the_highest_priority_first() {
    // Costs and estimates that would reverse the order: ignored here.
    let backlog = [
        task("p3", 3).cost(1).http(),
        task("p7", 7).cost(9).estimate(1_000_000),
        task("p0", 0).estimate(1),
        task("p9", 9).cost(10),
        task("p5", 5).delayed(50),
        task("p8", 8).delayed(150).estimate(300_000),
        task("p1", 1).delayed(250),
    ];
    let ran = run_backlog("order-prio", "default", &backlog).await;
    assert_eq!(ran, ["p9", "p8", "p7", "p5", "p3", "p1", "p0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_queue_runs_in_arrival_order_whatever_the_priority() {
    let backlog = [
        task("a0", 0),
        task("a1", 9),
        task("a2", 1).cost(10),
        task("a3", 8).estimate(1),
        task("a4", 2).http(),
        task("d5", 9).delayed(50),
        task("d6", 0).delayed(150),
        task("d7", 7).delayed(250),
    ];
    let ran = run_backlog("order-fifo", "fifo-q", &backlog).await;
    assert_eq!(ran, ["a0", "a1", "a2", "a3", "a4", "d5", "d6", "d7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shortest_first_queue_runs_the_shortest_first() {
    // Each task's own priority is the opposite of its length's: ignored.
    // The names give the priority its length maps to.
    let backlog = [
        task("s4-est2000", 5).estimate(2_000),
        task("s1-cost9", 8).cost(9),
        task("s9-cost1", 0).cost(1),
        task("s6-est100", 3).estimate(100).cost(10).http(),
        task("s2-est20000", 7).estimate(20_000).delayed(50),
        task("s8-est5", 1).estimate(5).delayed(150),
        task("s7-cost3", 2).cost(3).delayed(250),
        task("s0-est1e6", 9).estimate(1_000_000),
        task("s5-cost5", 4).cost(5).delayed(350),
        task("s3-cost7", 6).cost(7).http(),
    ];
    let ran = run_backlog("order-short", "short-q", &backlog).await;
    assert_eq!(
        ran,
        [
            "s9-cost1",
            "s8-est5",
            "s7-cost3",
            "s6-est100",
            "s5-cost5",
            "s4-est2000",
            "s3-cost7",
            "s2-est20000",
            "s1-cost9",
            "s0-est1e6",
        ]
    );
}

/// Checks the refusal of a queue declared in another order: the message
/// names the setting, the queue and what to do.
fn assert_names_the_way_out(message: &str, queue: &str) {
    for part in ["KAIROS_QUEUE_ORDER", queue, "delete", "inequivalent arg"] {
        assert!(message.contains(part), "{part:?} missing in: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_in_another_order_is_refused_with_the_way_out() {
    // `default` exists as a priority queue (TestEnv declared it).
    let env = TestEnv::new("order-mismatch").await;
    let queue = env.names.queue("default");
    let fifo = Names::new(&env.ns).with_orders("default:fifo".parse().expect("orders"));

    // A declarer: the broker closes the channel, the error says why.
    let channel = env.conn.create_channel().await.expect("channel");
    match declare_task_queue(&channel, &fifo, "default").await {
        Err(e @ DeclareError::Inequivalent(_)) => assert_names_the_way_out(&e.to_string(), &queue),
        other => panic!("expected an inequivalent queue, got {other:?}"),
    }

    // A publisher: the Rust client refuses the task, naming the setting.
    let broker = kairos_shared::amqp::Broker::plain(&env.amqp_url);
    let client = Client::connect_with(&broker, fifo).await.expect("client");
    match client.enqueue(NewTask::new("test.order")).await {
        Err(ClientError::Setting(message)) => assert_names_the_way_out(&message, &queue),
        other => panic!("expected a refusal naming the setting, got {other:?}"),
    }

    // A worker process: it does not consume, and says why.
    let log = std::env::temp_dir().join(format!("{}-worker.log", env.ns));
    let mut penv = env.process_env();
    penv.push(("KAIROS_QUEUE_ORDER".into(), "default:fifo".into()));
    let mut worker = Proc::spawn_logged("kairos-worker", &penv, &log);
    wait_for_order_error(&log, "worker").await;
    worker.kill9();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.contains("KAIROS_QUEUE_ORDER"))
        .unwrap_or_default();
    assert_names_the_way_out(line, &queue);
    let _ = std::fs::remove_file(&log);

    // Setting the order back to the queue's present one is the way out.
    let prio = Names::new(&env.ns);
    let channel = env.conn.create_channel().await.expect("channel");
    declare_task_queue(&channel, &prio, "default")
        .await
        .expect("the present order declares fine");
}

/// Whether `NS.q.QUEUE` exists now (a passive declare, on a channel of its
/// own: a missing queue closes the channel) and how many tasks it holds.
async fn depth_if_declared(env: &TestEnv, queue: &str) -> Option<u32> {
    let channel = env.conn.create_channel().await.expect("channel");
    let depth = kairos_shared::admin::queue_depth(&channel, queue)
        .await
        .ok();
    let _ = channel.close(200, "done".into()).await;
    depth
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_keeps_due_tasks_until_the_queue_is_redeclared() {
    // `default` exists as a priority queue; the scheduler is told fifo.
    let env = TestEnv::new("order-sched").await;
    let queue = env.names.queue("default");
    let log = std::env::temp_dir().join(format!("{}-scheduler.log", env.ns));
    let mut penv = env.process_env();
    penv.push(("KAIROS_QUEUE_ORDER".into(), "default:fifo".into()));
    let mut scheduler = Proc::spawn_logged("kairos-scheduler", &penv, &log);
    env.publish(
        &env.names.delay(),
        "default",
        delayed_props("test.order", "held", 10),
        b"",
    )
    .await;
    wait_for_order_error(&log, "scheduler").await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.contains("KAIROS_QUEUE_ORDER"))
        .unwrap_or_default();
    assert_names_the_way_out(line, &queue);
    assert_eq!(
        depth_if_declared(&env, &queue).await,
        Some(0),
        "the task must wait in the delay queue"
    );

    // The operator's way out: delete the (empty) queue. The scheduler
    // declares it anew, as fifo, and publishes the task it held.
    env.delete_queue(&queue).await;
    let deadline = tokio::time::Instant::now() + WITHIN;
    while depth_if_declared(&env, &queue).await != Some(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the held task did not reach the redeclared queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fifo = Names::new(&env.ns).with_orders("default:fifo".parse().expect("orders"));
    let channel = env.conn.create_channel().await.expect("channel");
    declare_task_queue(&channel, &fifo, "default")
        .await
        .expect("the queue is fifo now");
    scheduler.kill9();
    let _ = std::fs::remove_file(&log);
}

/// Waits until the process logging to `log` names `KAIROS_QUEUE_ORDER`. The
/// log is a file the process appends to: it is read until the line comes
/// (there is no event to await).
async fn wait_for_order_error(log: &std::path::Path, who: &str) {
    let deadline = tokio::time::Instant::now() + WITHIN;
    while log_lines(log, "KAIROS_QUEUE_ORDER") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the {who} did not report the queue's order: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
