//! End-to-end fuzz: a few hundred randomized messages, as clients in any
//! language could publish them, to both exchanges, through a real
//! `kairos-scheduler` and `kairos-worker`. Every message ends exactly once,
//! as a success or as a dead letter with its `dead` event, and both
//! processes are still running afterwards.
//!
//! The seed comes from `KAIROS_FUZZ_SEED` (printed, so a failure can be
//! replayed); the count from `KAIROS_FUZZ_MESSAGES` (default 300).

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
            1 => "no-such-queue",
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
    let mut penv = env.process_env();
    penv.push(("KAIROS_CONCURRENCY".into(), "8..32".into()));
    let mut scheduler = Proc::spawn("kairos-scheduler", &penv);
    let mut worker = Proc::spawn("kairos-worker", &penv);

    let messages: Vec<Message> = (0..count).map(|i| message(i, &env, &mut rng)).collect();
    for m in &messages {
        env.publish(&m.exchange, &m.key, m.props.clone(), &m.body)
            .await;
    }

    // Every message ends in exactly one terminal event.
    let terminal = |e: &SeenEvent| e.kind == "succeeded" || e.kind == "dead";
    let all_ended = tap
        .try_wait_until(Duration::from_secs(180), |seen| {
            seen.iter().filter(|e| terminal(e)).count() >= count
        })
        .await;
    if !all_ended {
        let ended: HashMap<&str, ()> = tap
            .seen
            .iter()
            .filter(|e| terminal(e))
            .map(|e| (e.id.as_str(), ()))
            .collect();
        let missing: Vec<String> = messages
            .iter()
            .filter(|m| {
                m.props
                    .message_id()
                    .as_ref()
                    .is_some_and(|id| !ended.contains_key(id.as_str()))
            })
            .take(10)
            .map(|m| {
                format!(
                    "{} {:?} {:?} body {} bytes",
                    m.exchange,
                    m.key,
                    m.props,
                    m.body.len()
                )
            })
            .collect();
        panic!(
            "only {} of {count} messages ended (seed {seed}); some that did not:\n{}",
            tap.seen.iter().filter(|e| terminal(e)).count(),
            missing.join("\n")
        );
    }
    // A task ending twice would show up right behind the last one.
    tap.collect_for(Duration::from_secs(3)).await;
    let ended = tap.seen.iter().filter(|e| terminal(e)).count();
    assert_eq!(
        ended, count,
        "terminal events for {count} messages (seed {seed})"
    );

    let mut ends: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in tap.seen.iter().filter(|e| terminal(e)) {
        ends.entry(e.id.as_str()).or_default().push(e.kind.as_str());
    }
    for (i, m) in messages.iter().enumerate() {
        let Some(id) = m.props.message_id().as_ref().map(|s| s.to_string()) else {
            continue;
        };
        if id != format!("fz-{i}") {
            continue; // refused ids end under no id of theirs
        }
        let got = ends.get(id.as_str()).cloned().unwrap_or_default();
        assert_eq!(
            got.len(),
            1,
            "{id} ended {got:?} (seed {seed}); message {:?} to {} {:?}",
            m.props,
            m.exchange,
            m.key
        );
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
