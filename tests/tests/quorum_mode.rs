//! `KAIROS_QUEUE_MODE=quorum` on the shared single-node RabbitMQ (quorum
//! queues work on one node): the queues Kairos declares, the band each
//! publisher routes a priority to, the delivery limit of a poison message,
//! the errors of a namespace declared in the other mode, and a delayed task
//! and a retry end to end.

use futures_util::StreamExt;
use kairos_shared::client::{Client, ClientError, NewTask};
use kairos_shared::contract::Names;
use kairos_shared::events::EventKind;
use kairos_shared::queue_mode::{Band, QueueMode, DELIVERY_LIMIT};
use kairos_shared::topology::{self, BaseDeclareError, DeclareError};
use kairos_tests::*;
use kairos_worker::Worker;
use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long a test waits for what the broker or a scheduler does.
const WITHIN: Duration = Duration::from_secs(30);

async fn quorum_env(prefix: &str) -> TestEnv {
    TestEnv::with_mode(prefix, QueueMode::Quorum).await
}

/// A client of the test's namespace with `orders`, in the test's mode.
async fn client(env: &TestEnv, orders: &str) -> Client {
    let names = Names::new(&env.ns)
        .with_mode(env.names.mode())
        .with_orders(orders.parse().expect("orders"));
    Client::connect_with(&kairos_shared::amqp::Broker::plain(&env.amqp_url), names)
        .await
        .expect("client connects")
}

/// The depth of each band queue of `logical`, low band first.
async fn band_depths(env: &TestEnv, logical: &str) -> [u32; 3] {
    let mut out = [0; 3];
    for band in Band::HIGHEST_FIRST {
        let queue = env.names.band_queue(logical, band).expect("band queue");
        out[usize::from(band.index())] = env.queue_depth(queue.as_str()).await;
    }
    out
}

/// Polls `band_depths` until they are `want`.
async fn wait_band_depths(env: &TestEnv, logical: &str, want: [u32; 3]) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let got = band_depths(env, logical).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "bands of {logical} (low, middle, high): {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every queue of the namespace on the broker: name, type, arguments.
fn broker_queues(ns: &str) -> Vec<Value> {
    let out = run_ok(
        std::process::Command::new("rabbitmqctl").args([
            "list_queues",
            "name",
            "type",
            "arguments",
            "exclusive",
            "--formatter",
            "json",
        ]),
        "rabbitmqctl list_queues",
        "rabbitmqctl must be on PATH (the shared RabbitMQ's)",
    );
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).expect("rabbitmqctl JSON");
    all.into_iter()
        .filter(|q| {
            q["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&format!("{ns}.")))
        })
        .collect()
}

/// An argument of a queue as rabbitmqctl prints it: `[[name, type,
/// value]]` (3.10), `[[name, value]]` or an object in other versions.
fn argument(queue: &Value, name: &str) -> Option<Value> {
    match &queue["arguments"] {
        Value::Object(m) => m.get(name).cloned(),
        Value::Array(a) => a.iter().find_map(|pair| {
            let pair = pair.as_array()?;
            (pair.first()?.as_str()? == name).then(|| pair.last().cloned().unwrap_or(Value::Null))
        }),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_durable_queue_is_a_quorum_queue_with_its_arguments() {
    let env = quorum_env("qm-args").await;
    let scheduler = InProcess::scheduler(env.scheduler_config());
    // The scheduler declares the outcomes queue once connected.
    let outcomes = kairos_scheduler::schedules::outcomes::queue_name(&env.names);
    let deadline = Instant::now() + WITHIN;
    while !broker_queues(&env.ns)
        .iter()
        .any(|q| q["name"] == outcomes.as_str())
    {
        assert!(Instant::now() < deadline, "no {outcomes}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let queues = broker_queues(&env.ns);
    let names: Vec<&str> = queues.iter().filter_map(|q| q["name"].as_str()).collect();
    let ns = &env.ns;
    for want in [
        format!("{ns}.delay"),
        format!("{ns}.retry"),
        format!("{ns}.dead"),
        format!("{ns}.q.default"),
        format!("{ns}.q.default.p4"),
        format!("{ns}.q.default.p7"),
        outcomes.clone(),
    ] {
        assert!(names.contains(&want.as_str()), "{want} missing: {names:?}");
    }
    for q in &queues {
        let name = q["name"].as_str().unwrap_or_default();
        // Exclusive per-process queues (event listeners) stay classic.
        if q["exclusive"] == json!(true) || q["exclusive"] == "true" {
            continue;
        }
        assert_eq!(q["type"], "quorum", "{name}: {q}");
        let text = |v: Option<Value>| v.and_then(|v| v.as_str().map(str::to_string));
        let int = |v: Option<Value>| v.and_then(|v| v.as_i64());
        if name == format!("{ns}.dead") {
            assert_eq!(argument(q, "x-delivery-limit"), None, "{q}");
            continue;
        }
        if name == outcomes {
            assert_eq!(int(argument(q, "x-max-length")), Some(100_000), "{q}");
            assert_eq!(int(argument(q, "x-delivery-limit")), Some(20), "{q}");
            continue;
        }
        let dlx = if name.starts_with(&format!("{ns}.q.")) {
            format!("{ns}.retry")
        } else {
            format!("{ns}.dead")
        };
        assert_eq!(
            int(argument(q, "x-delivery-limit")),
            Some(i64::from(DELIVERY_LIMIT)),
            "{q}"
        );
        assert_eq!(
            text(argument(q, "x-dead-letter-exchange")),
            Some(dlx),
            "{q}"
        );
        assert_eq!(
            text(argument(q, "x-dead-letter-strategy")).as_deref(),
            Some("at-least-once"),
            "{q}"
        );
        assert_eq!(
            text(argument(q, "x-overflow")).as_deref(),
            Some("reject-publish"),
            "{q}"
        );
        assert_eq!(argument(q, "x-max-priority"), None, "{q}");
    }
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publisher_routes_a_priority_to_its_band() {
    let env = quorum_env("qm-bands").await;
    let orders = "plain:fifo,short:shortest-first";
    let mut sc = env.scheduler_config();
    sc.common.queue_order = orders.parse().expect("orders");
    let addr = free_addr();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let api = ScheduleApi::new(addr);
    api.wait_ready(WITHIN).await;
    // Declared (and so removed with the namespace) before the client's
    // first task: `short` has bands; `plain` (fifo) is deleted at the end.
    env.declare_queue("short").await;

    // The Rust client.
    let c = client(&env, orders).await;
    for p in [0, 5, 9] {
        c.enqueue(NewTask::new("kairos.noop").priority(p))
            .await
            .expect("enqueue");
    }
    wait_band_depths(&env, "default", [1, 1, 1]).await;

    // POST /v1/tasks.
    for p in [0, 5, 9] {
        let r = api
            .call(move |a| a.enqueue(&json!({"name": "kairos.noop", "priority": p})))
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    wait_band_depths(&env, "default", [2, 2, 2]).await;

    // Through NS.delay and the scheduler's pump (the HTTP API's delayed
    // tasks take this way too).
    for p in [0, 5, 9] {
        c.enqueue(NewTask::new("kairos.noop").priority(p).delay_ms(10))
            .await
            .expect("enqueue delayed");
    }
    wait_band_depths(&env, "default", [3, 3, 3]).await;

    // shortest-first: the priority comes from the cost (1 = 9, 5 = 5,
    // 10 = 0), whatever the publisher asked for.
    for cost in [1, 5, 10] {
        c.enqueue(
            NewTask::new("kairos.noop")
                .queue("short")
                .priority(0)
                .cost(cost),
        )
        .await
        .expect("enqueue shortest-first");
    }
    wait_band_depths(&env, "short", [1, 1, 1]).await;

    // fifo: one queue, every priority in it, and no band queues.
    for p in [0, 5, 9] {
        c.enqueue(NewTask::new("kairos.noop").queue("plain").priority(p))
            .await
            .expect("enqueue fifo");
    }
    let plain = env.names.queue("plain");
    env.wait_depth(&plain, WITHIN, "3 tasks in the fifo queue", |d| d == 3)
        .await;
    let listed: Vec<String> = broker_queues(&env.ns)
        .iter()
        .filter_map(|q| q["name"].as_str().map(str::to_string))
        .filter(|n| n.starts_with(&plain))
        .collect();
    assert_eq!(listed, vec![plain.clone()]);

    // GET /v1/queues sums the bands.
    let r = api.call(|a| a.queues().map_err(|e| e.to_string())).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let ready = |name: &str| {
        r.body["queues"]
            .as_array()
            .and_then(|qs| qs.iter().find(|q| q["name"] == name))
            .map(|q| q["ready"].clone())
    };
    assert_eq!(ready("default"), Some(json!(9)), "{:?}", r.body);
    env.delete_queue(&plain).await;
    c.close().await.expect("close");
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_publishes_reach_the_low_band_by_the_queue_name_and_a_higher_band_by_its_key() {
    let env = quorum_env("qm-raw").await;
    let tasks = env.names.tasks_exchange();
    env.publish(&tasks, "default", task_props("kairos.noop", "raw-low"), b"")
        .await;
    env.publish(
        &tasks,
        "default.p7",
        task_props("kairos.noop", "raw-high").with_priority(9),
        b"",
    )
    .await;
    env.publish(
        &tasks,
        "default.p4",
        task_props("kairos.noop", "raw-mid"),
        b"",
    )
    .await;
    wait_band_depths(&env, "default", [1, 1, 1]).await;
    // The documented Python example (pika) publishes with key QUEUE: its
    // priority-9 task reaches the low band.
    let out = python_enqueue(&env, &["--name", "kairos.noop", "--priority", "9"]);
    assert!(out["id"].as_str().is_some(), "{out}");
    wait_band_depths(&env, "default", [2, 1, 1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_once_after_the_delivery_limit() {
    let env = quorum_env("qm-poison").await;
    let mut sc = env.scheduler_config();
    let addr = free_addr();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let api = ScheduleApi::new(addr);
    api.wait_ready(WITHIN).await;
    let c = client(&env, "").await;
    let started = Instant::now();
    let id = c
        .enqueue(
            NewTask::new("kairos.noop")
                .id("poison")
                .priority(9)
                .max_retries(5),
        )
        .await
        .expect("enqueue");
    // A consumer of the high band that returns every delivery.
    let ch = env.conn.create_channel().await.expect("channel");
    ch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            env.names
                .band_queue("default", Band::HIGH)
                .expect("band queue"),
            "poison".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // Returned from a task of its own, so that the dead-letter poll below
    // is never cancelled half-way (a `basic_get` dropped in flight could
    // lose its message).
    let returner = tokio::spawn(async move {
        let mut deliveries = 0u32;
        let mut last_count = None;
        while let Some(Ok(d)) = consumer.next().await {
            deliveries += 1;
            last_count = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-delivery-count").cloned());
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            if d.nack(requeue).await.is_err() {
                break;
            }
        }
        (deliveries, last_count)
    });
    env.wait_dead_depth(1, WITHIN).await;
    let took = started.elapsed();
    let _ = ch.close(200, "done".into()).await;
    let (deliveries, last_count) = returner.await.expect("returner");
    println!(
        "poison: {deliveries} deliveries (last x-delivery-count {last_count:?}), dead-lettered \
         in {} ms",
        took.as_millis()
    );
    assert!(
        deliveries > DELIVERY_LIMIT as u32,
        "dead-lettered after {deliveries} deliveries"
    );
    // Exactly once: nothing else arrives, nothing is held for a retry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.queue_depth(&env.names.dead()).await, 1);
    assert_eq!(env.queue_depth(&env.names.retry()).await, 0);
    assert_eq!(band_depths(&env, "default").await, [0, 0, 0]);
    // As the dead-letter API shows it.
    let listed = api.call(|a| a.dead_list(10)).await;
    let letters = listed.body["dead"].as_array().cloned().unwrap_or_default();
    assert_eq!(letters.len(), 1, "{:?}", listed.body);
    assert_eq!(letters[0]["id"], id.as_str());
    assert_eq!(letters[0]["queue"], "default");
    let error = letters[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("delivered more than 20 times without an ack (x-delivery-limit)"),
        "{error}"
    );
    // A replay goes back to the band of its priority (9: high), its
    // delivery count gone.
    let replayed = api.call(|a| a.dead_replay(&["poison".to_string()])).await;
    assert_eq!(
        replayed.body["replayed"],
        json!(["poison"]),
        "{:?}",
        replayed.body
    );
    wait_band_depths(&env, "default", [0, 0, 1]).await;
    c.close().await.expect("close");
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intake_message_past_its_delivery_limit_reaches_the_dead_letters() {
    let env = quorum_env("qm-intake").await;
    env.publish(
        &env.names.delay(),
        "default",
        delayed_props("kairos.noop", "stuck", 10),
        b"",
    )
    .await;
    // No scheduler yet: a consumer of NS.delay that returns every delivery
    // stands for a scheduler that dies on this message each time.
    let ch = env.conn.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            env.names.short_delay(),
            "returner".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let returner = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            if d.nack(requeue).await.is_err() {
                break;
            }
        }
    });
    env.wait_dead_depth(1, WITHIN).await;
    let _ = ch.close(200, "done".into()).await;
    let _ = returner.await;
    let mut sc = env.scheduler_config();
    let addr = free_addr();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let api = ScheduleApi::new(addr);
    api.wait_ready(WITHIN).await;
    let listed = api.call(|a| a.dead_list(10)).await;
    let letters = listed.body["dead"].as_array().cloned().unwrap_or_default();
    assert_eq!(letters.len(), 1, "{:?}", listed.body);
    assert_eq!(letters[0]["id"], "stuck");
    assert_eq!(letters[0]["queue"], "default");
    let error = letters[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&env.names.delay()) && error.contains("x-delivery-limit"),
        "{error}"
    );
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_of_the_other_mode_is_refused_naming_the_setting() {
    for (first, then) in [
        (QueueMode::Classic, QueueMode::Quorum),
        (QueueMode::Quorum, QueueMode::Classic),
    ] {
        let env = TestEnv::with_mode("qm-mismatch", first).await;
        let other = Names::new(&env.ns).with_mode(then);
        // Declaring in quorum mode makes the higher bands before it meets
        // the low one.
        for band in kairos_shared::queue_mode::Band::HIGHEST_FIRST {
            env.delete_with_namespace(format!("{}{}", env.names.queue("default"), band.suffix()));
        }
        let ch = env.conn.create_channel().await.expect("channel");
        match topology::declare_base_checked(&ch, &other).await {
            Err(BaseDeclareError::Mismatch(m)) => {
                let text = m.to_string();
                assert!(text.contains("KAIROS_QUEUE_MODE"), "{text}");
                assert!(text.contains(&env.names.delay()), "{text}");
            }
            other => panic!("{first} then {then}: {other:?}"),
        }
        let ch = env.conn.create_channel().await.expect("channel");
        match topology::declare_task_queue(&ch, &other, "default").await {
            Err(DeclareError::Inequivalent(m)) => {
                assert!(m.to_string().contains("KAIROS_QUEUE_MODE"), "{m}");
            }
            other => panic!("{first} then {then}: {other:?}"),
        }
        let refused = Client::connect_with(
            &kairos_shared::amqp::Broker::plain(&env.amqp_url),
            other.clone(),
        )
        .await;
        match refused {
            Err(ClientError::Setting(e)) => assert!(e.contains("KAIROS_QUEUE_MODE"), "{e}"),
            Err(e) => panic!("{first} then {then}: {e}"),
            Ok(_) => panic!("{first} then {then}: connected"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_task_and_a_retry_run_end_to_end() {
    let env = quorum_env("qm-e2e").await;
    let mut tap = EventTap::new(&env).await;
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());
    let c = client(&env, "").await;
    c.enqueue(NewTask::new("kairos.noop").id("later").delay_ms(200))
        .await
        .expect("enqueue delayed");
    c.enqueue(NewTask::new("kairos.fail").id("failing").max_retries(2))
        .await
        .expect("enqueue failing");
    tap.wait_until(
        WITHIN,
        "the delayed task ran and the failing one died",
        |s| {
            s.iter().any(|e| e.id == "later" && e.kind == "succeeded")
                && s.iter().any(|e| e.id == "failing" && e.kind == "dead")
        },
    )
    .await;
    let attempts = tap
        .of(EventKind::Started)
        .iter()
        .filter(|e| e.id == "failing")
        .count();
    assert_eq!(attempts, 3, "one attempt and two retries");
    let dead = env.dead_letters(1, WITHIN).await;
    assert_eq!(dead[0].id().as_deref(), Some("failing"));
    assert_eq!(dead[0].header("x-attempt").as_deref(), Some("3"));
    c.close().await.expect("close");
    worker.stop().await;
    scheduler.stop().await;
}

/// RabbitMQ 3.10 puts the letters a scan held back into a quorum queue in
/// another order (see docs/RELIABILITY.md, quorum mode): listings and
/// replays lose nothing and repeat nothing, whatever the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_scans_lose_nothing_on_a_quorum_dead_queue() {
    let env = quorum_env("qm-scan").await;
    let mut sc = env.scheduler_config();
    let addr = free_addr();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let api = ScheduleApi::new(addr);
    api.wait_ready(WITHIN).await;
    const N: usize = 200;
    let letters = batch(N, |i| {
        task_props("kairos.noop", &format!("l-{i:03}")).with_priority(if i % 2 == 0 {
            0
        } else {
            9
        })
    });
    env.publish_many(&env.names.dead(), letters).await;
    env.wait_dead_depth(N as u32, WITHIN).await;
    let ids = |body: &Value| -> Vec<String> {
        body["dead"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let published: Vec<String> = (0..N).map(|i| format!("l-{i:03}")).collect();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let mut in_order = 0;
    for round in 0..3 {
        // A short listing first: it holds a part of the queue only.
        let first = api.call(|a| a.dead_list(5)).await;
        assert_eq!(ids(&first.body).len(), 5, "listing {round}");
        let listed = ids(&api.call(|a| a.dead_list(1000)).await.body);
        in_order += usize::from(listed == published);
        assert_eq!(sorted(listed), published, "listing {round}");
    }
    println!("scans: {in_order} of 3 full listings in publish order");
    // Replayed: to the high band (priority 9), and gone from the letters.
    let replayed = api.call(|a| a.dead_replay(&["l-151".to_string()])).await;
    assert_eq!(
        replayed.body["replayed"],
        json!(["l-151"]),
        "{:?}",
        replayed.body
    );
    wait_band_depths(&env, "default", [0, 0, 1]).await;
    let listed = ids(&api.call(|a| a.dead_list(1000)).await.body);
    let rest: Vec<String> = published
        .iter()
        .filter(|i| *i != "l-151")
        .cloned()
        .collect();
    assert_eq!(sorted(listed), rest);
    scheduler.stop().await;
}
