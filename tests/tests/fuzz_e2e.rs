//! End-to-end fuzz: a few hundred randomized messages, as clients in any
//! language could publish them, to both exchanges, through a real
//! `kairos-scheduler` and `kairos-worker`. Every message ends exactly once,
//! as a success or as a dead letter with its `dead` event, and both
//! processes are still running afterwards.
//!
//! The seed comes from `KAIROS_FUZZ_SEED` (printed, so a failure can be
//! replayed); the count from `KAIROS_FUZZ_MESSAGES` (default 300).

use kairos_shared::contract::DERIVED_ID_PREFIX;
use kairos_shared::events::EventKind;
use kairos_tests::*;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use lapin::BasicProperties;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::Duration;

/// Task names: built-ins that succeed or fail, and names nobody serves.
const NAMES: [&str; 6] = [
    "kairos.noop",
    "kairos.noop",
    "kairos.sleep",
    "kairos.fail",
    "nobody.serves.this",
    "",
];

/// A routing key to `NS.delay` for a queue the test did not set up.
const ODD_QUEUE: &str = "no-such-queue";

/// Headers the contract reads, each given values of every kind.
const CONTRACT_HEADERS: [&str; 5] = [
    "x-delay-ms",
    "x-run-at",
    "x-max-retries",
    "x-timeout-ms",
    "x-attempt",
];

fn odd_integer(rng: &mut StdRng) -> AMQPValue {
    match rng.random_range(0..12) {
        0 => AMQPValue::ShortShortInt(rng.random()),
        1 => AMQPValue::ShortShortUInt(rng.random()),
        2 => AMQPValue::ShortInt(rng.random()),
        3 => AMQPValue::ShortUInt(rng.random()),
        4 => AMQPValue::LongInt(rng.random()),
        5 => AMQPValue::LongUInt(rng.random()),
        6 => AMQPValue::LongLongInt(rng.random()),
        7 => AMQPValue::LongLongInt(i64::MAX),
        8 => AMQPValue::LongLongInt(i64::MIN),
        9 => AMQPValue::LongString(LongString::from(rng.random::<i64>().to_string())),
        10 => AMQPValue::LongString(LongString::from("99999999999999999999999")),
        _ => AMQPValue::Timestamp(rng.random()),
    }
}

/// A sensible value for a contract header (most messages should run).
fn sound(name: &str, rng: &mut StdRng) -> AMQPValue {
    match name {
        "x-delay-ms" => AMQPValue::LongLongInt(rng.random_range(-500..1_500)),
        "x-run-at" => AMQPValue::LongLongInt(now_ms() + rng.random_range(-5_000..1_500)),
        "x-max-retries" => AMQPValue::ShortShortUInt(rng.random_range(0..3)),
        "x-timeout-ms" => AMQPValue::LongUInt(rng.random_range(1..5_000)),
        _ => AMQPValue::LongInt(rng.random_range(1..4)),
    }
}

fn odd_value(rng: &mut StdRng, depth: u32) -> AMQPValue {
    match rng.random_range(0..10) {
        0 => AMQPValue::Boolean(rng.random()),
        1 => AMQPValue::Double(rng.random::<f64>() * 1e300),
        // Finite: RabbitMQ closes the channel of a publisher that sends NaN.
        2 => AMQPValue::Float(rng.random::<f32>() * -1e30),
        3 => AMQPValue::DecimalValue(DecimalValue {
            scale: rng.random(),
            value: rng.random(),
        }),
        4 => AMQPValue::ByteArray(ByteArray::from(random_bytes(rng, 40))),
        5 => AMQPValue::Void,
        6 if depth < 3 => AMQPValue::FieldTable(odd_table(rng, depth + 1)),
        7 if depth < 3 => AMQPValue::FieldArray(FieldArray::from(
            (0..rng.random_range(0..4))
                .map(|_| odd_value(rng, depth + 1))
                .collect::<Vec<_>>(),
        )),
        8 => AMQPValue::LongString(LongString::from(random_bytes(rng, 300))),
        _ => odd_integer(rng),
    }
}

fn odd_table(rng: &mut StdRng, depth: u32) -> FieldTable {
    let mut t = FieldTable::default();
    for i in 0..rng.random_range(0..5) {
        t.insert(
            format!("k{i}-{}", rng.random::<u16>()).into(),
            odd_value(rng, depth),
        );
    }
    t
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random()).collect()
}

/// A body from 0 bytes to 2 MB; the sleep handler gets JSON most times.
fn body(name: &str, rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..20) {
        0 => Vec::new(),
        1 => vec![b'x'; rng.random_range(1_000_000..=2_000_000)],
        2 => random_bytes(rng, 4_096),
        _ if name == "kairos.sleep" => format!("{{\"ms\": {}}}", rng.random_range(0..50)).into(),
        _ => b"{}".to_vec(),
    }
}

struct Message {
    exchange: String,
    key: String,
    props: BasicProperties,
    body: Vec<u8>,
}

fn message(i: usize, env: &TestEnv, rng: &mut StdRng) -> Message {
    let name = NAMES[rng.random_range(0..NAMES.len())];
    let mut props = BasicProperties::default().with_delivery_mode(2);
    if rng.random_range(0..12) != 0 {
        props = props.with_type(name.into());
    }
    // Mostly unique readable ids (so the test can follow them); sometimes
    // none, one too long, or one with characters the contract refuses.
    props = match rng.random_range(0..12) {
        0 => props,
        1 => props.with_message_id("i".repeat(200).into()),
        2 => props.with_message_id(format!("fz-{i}-é\n").into()),
        _ => props.with_message_id(format!("fz-{i}").into()),
    };
    if rng.random_bool(0.5) {
        props = props.with_priority(rng.random());
    }
    if rng.random_bool(0.2) {
        props = props.with_content_type("application/json".into());
    }
    let mut headers = FieldTable::default();
    for h in CONTRACT_HEADERS {
        match rng.random_range(0..10) {
            0..=5 => {}
            6..=8 => {
                headers.insert(h.into(), sound(h, rng));
            }
            _ => {
                headers.insert(h.into(), odd_value(rng, 0));
            }
        }
    }
    for (k, v) in odd_table(rng, 0).inner() {
        headers.insert(k.clone(), v.clone());
    }
    if !headers.inner().is_empty() {
        props = props.with_headers(headers);
    }
    let delayed = rng.random_bool(0.5);
    let (exchange, key) = if delayed {
        // The scheduler gets odd routing keys too; the task exchange only
        // routes `default` (anything else the broker itself drops).
        let key = match rng.random_range(0..15) {
            0 => "",
            1 => ODD_QUEUE,
            _ => "default",
        };
        (env.names.delay(), key)
    } else {
        (env.names.tasks_exchange(), "default")
    };
    Message {
        exchange,
        key: key.to_string(),
        body: body(name, rng),
        props,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_messages_each_end_exactly_once() {
    let seed: u64 = std::env::var("KAIROS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let count: usize = std::env::var("KAIROS_FUZZ_MESSAGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    eprintln!("fuzz_e2e: KAIROS_FUZZ_SEED={seed} KAIROS_FUZZ_MESSAGES={count}");
    let mut rng = StdRng::seed_from_u64(seed);

    let env = TestEnv::new("fuzz").await;
    let mut tap = EventTap::new(&env).await;
    // A delayed task routed to a queue nobody declared is published to
    // that queue (declared on demand) and waits for its workers: this
    // worker serves it too, so every message can end.
    env.declare_queue(ODD_QUEUE).await;
    let mut penv = env.process_env();
    penv.push(("KAIROS_CONCURRENCY".into(), "8..32".into()));
    penv.push(("KAIROS_QUEUES".into(), format!("default,{ODD_QUEUE}")));
    let mut scheduler = Proc::spawn("kairos-scheduler", &penv);
    let mut worker = Proc::spawn("kairos-worker", &penv);

    let messages: Vec<Message> = (0..count).map(|i| message(i, &env, &mut rng)).collect();
    let started = now_ms();
    for m in &messages {
        env.publish(&m.exchange, &m.key, m.props.clone(), &m.body)
            .await;
    }

    // Every message settles: it ran, it is a dead letter, it is held for a
    // time beyond the test (an odd integer can be a valid delay of days;
    // the contract's horizon is ten years), or it is deep in a long but
    // valid retry cycle (`x-max-retries` up to 1,000 with `kairos.fail`).
    let beyond_the_test = started + 10 * 60 * 1000;
    let end = |e: &SeenEvent| e.kind == "succeeded" || e.kind == "dead";
    let settles = |e: &SeenEvent| {
        end(e)
            || (e.kind == "scheduled" && e.due_at.is_some_and(|due| due > beyond_the_test))
            || (e.kind == "retried" && e.attempt >= 4)
    };
    // Tasks settled: each task id once. A refused id (too long, not
    // ASCII) is shared by several messages and never becomes a task: each
    // of its dead letters counts, as does each end without an id (a
    // message whose id could not be read).
    let is_task_id = |id: &str| {
        kairos_shared::contract::validate_id(id).is_ok()
            && (id.starts_with("fz-") || id.starts_with(DERIVED_ID_PREFIX))
    };
    let settled = |seen: &[SeenEvent]| {
        let ids: HashMap<&str, ()> = seen
            .iter()
            .filter(|e| is_task_id(&e.id) && settles(e))
            .map(|e| (e.id.as_str(), ()))
            .collect();
        ids.len() + seen.iter().filter(|e| !is_task_id(&e.id) && end(e)).count()
    };
    let all_settled = tap
        .try_wait_until(Duration::from_secs(180), |seen| settled(seen) >= count)
        .await;
    if !all_settled {
        let done: HashMap<&str, ()> = tap
            .seen
            .iter()
            .filter(|e| settles(e))
            .map(|e| (e.id.as_str(), ()))
            .collect();
        // Tasks seen on their way (scheduled, started, ...) that never
        // settled: the events say where each one stopped.
        let mut stuck: HashMap<&str, Vec<&str>> = HashMap::new();
        for e in &tap.seen {
            if !done.contains_key(e.id.as_str()) {
                stuck
                    .entry(e.id.as_str())
                    .or_default()
                    .push(e.kind.as_str());
            }
        }
        let unseen: Vec<String> = messages
            .iter()
            .enumerate()
            .filter(|(i, m)| {
                m.props.message_id().as_ref().is_some_and(|id| {
                    id.as_str() == format!("fz-{i}")
                        && !tap.seen.iter().any(|e| e.id == id.as_str())
                })
            })
            .map(|(_, m)| format!("{} {:?} {:?}", m.exchange, m.key, m.props))
            .collect();
        panic!(
            "only {} of {count} messages settled (seed {seed}); tasks with events but no end: {stuck:?}; messages never seen: {unseen:?}",
            settled(&tap.seen)
        );
    }
    // A task ending twice would show up right behind the last one.
    tap.collect_for(Duration::from_secs(3)).await;
    assert_eq!(
        settled(&tap.seen),
        count,
        "settled tasks for {count} messages (seed {seed})"
    );
    let mut ends: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in tap.seen.iter().filter(|e| is_task_id(&e.id) && end(e)) {
        ends.entry(e.id.as_str()).or_default().push(e.kind.as_str());
    }
    for (id, got) in &ends {
        assert_eq!(got.len(), 1, "{id} ended {got:?} (seed {seed})");
    }
    for (i, m) in messages.iter().enumerate() {
        let id = format!("fz-{i}");
        if m.props
            .message_id()
            .as_ref()
            .is_some_and(|got| got.as_str() == id)
        {
            assert!(
                tap.seen.iter().any(|e| e.id == id && settles(e)),
                "{id} did not settle (seed {seed}); message {:?} to {} {:?}",
                m.props,
                m.exchange,
                m.key
            );
        }
    }

    // Every dead event has its dead letter in NS.dead, with a reason.
    let dead_events = tap.of(EventKind::Dead).len();
    let dead = env.dead_letters(dead_events, Duration::from_secs(30)).await;
    for d in &dead {
        assert!(
            d.header("x-error").is_some_and(|e| !e.is_empty()),
            "dead letter without a reason: {:?}",
            d.props
        );
    }
    assert_eq!(
        env.queue_depth(&env.names.dead()).await,
        0,
        "more dead letters than dead events (seed {seed})"
    );
    assert!(
        scheduler.child.try_wait().expect("status").is_none(),
        "scheduler died (seed {seed})"
    );
    assert!(
        worker.child.try_wait().expect("status").is_none(),
        "worker died (seed {seed})"
    );
}
