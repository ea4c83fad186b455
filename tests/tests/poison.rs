//! Issue 14, items 1 and 4: a message whose short strings are not UTF-8
//! (a `type`, `message_id`, `content_type` or header name sent as raw bytes
//! by a client in another language) is dead-lettered with a reason and the
//! body unchanged, and everything behind it keeps flowing; every dead letter,
//! decodable or not, has exactly one `dead` event.

use kairos_shared::contract::{H_ERROR, H_ORIGIN_QUEUE};
use kairos_shared::events::EventKind;
use kairos_tests::*;
use kairos_worker::Worker;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

/// Publishes with pika, which sends `bytes` given for a short string as they
/// are: the Rust client cannot even build such a message. Argument: a JSON
/// list of {exchange, key, body (latin-1), type, id, content_type, header}
/// where each string is latin-1 text standing for raw bytes.
///
/// `nest: N` adds a header `deep` of N field arrays nested in each other
/// (`tables: true`: field tables), written by hand since pika's encoder
/// recurses.
const PUBLISH_RAW: &str = r#"
import json, struct, sys, pika, pika.data
url, messages = sys.argv[1], json.loads(sys.argv[2])
raw = lambda s: None if s is None else s.encode("latin-1")
class Encoded(bytes): pass
encode_value = pika.data.encode_value
def encode_encoded(pieces, value):
    if isinstance(value, Encoded):
        pieces.append(bytes(value))
        return len(value)
    return encode_value(pieces, value)
pika.data.encode_value = encode_encoded
def nested(n, tables):
    v = b"V"
    for _ in range(n):
        v = b"F" + struct.pack(">I", len(v) + 1) + b"\x00" + v if tables else b"A" + struct.pack(">I", len(v)) + v
    return Encoded(v)
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()
for m in messages:
    headers = {raw(m["header"]): 1} if m.get("header") else {}
    if m.get("nest"):
        headers["deep"] = nested(m["nest"], m.get("tables", False))
    ch.basic_publish(
        exchange=m["exchange"], routing_key=m["key"], body=raw(m["body"]),
        properties=pika.BasicProperties(
            type=raw(m.get("type")), message_id=raw(m.get("id")),
            content_type=raw(m.get("content_type")), headers=headers,
            delivery_mode=2))
conn.close()
"#;

fn publish_raw(env: &TestEnv, messages: &serde_json::Value) {
    run_ok(
        Command::new(python()).args([
            "-c",
            PUBLISH_RAW,
            env.first_amqp_url(),
            &messages.to_string(),
        ]),
        "publishing with pika",
        "run python (scripts/test.sh installs pika into target/py)",
    );
}

/// One message per (destination, field), the field holding bytes that are
/// not UTF-8. The body is binary too and must come back unchanged.
fn poison_messages(env: &TestEnv) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (dest, exchange) in [
        ("delay", env.names.delay()),
        ("tasks", env.names.tasks_exchange()),
    ] {
        for field in ["type", "message_id", "content_type", "header"] {
            let id = format!("poison-{dest}-{field}");
            let mut m = serde_json::json!({
                "exchange": exchange,
                "key": "default",
                "body": format!("{id}\u{0}\u{ff}\u{fe}"),
                "type": "test.record",
                "id": id,
                "field": field,
            });
            match field {
                "type" => m["type"] = "test.\u{ff}record".into(),
                "message_id" => m["id"] = format!("{id}-\u{ff}").into(),
                "content_type" => m["content_type"] = "text/\u{c3}".into(),
                _ => m["header"] = "x-\u{ff}\u{fe}".into(),
            }
            out.push(m);
        }
    }
    out
}

/// The body as pika sent it (latin-1 text to bytes).
fn latin1(text: &str) -> Vec<u8> {
    text.chars().map(|c| c as u32 as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_short_strings_are_dead_lettered_and_the_rest_flows() {
    let env = TestEnv::new("poison").await;
    let mut tap = EventTap::new(&env).await;
    let log = RunLog::default();
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.record", log.handler(0)));

    let poison = poison_messages(&env);
    publish_raw(&env, &serde_json::Value::Array(poison.clone()));

    // Then 20 ordinary tasks, half through each poisoned queue.
    let ok = |i: usize| format!("fine-{i}");
    let now: Vec<_> = (0..10)
        .map(|i| {
            (
                "default".to_string(),
                task_props("test.record", &ok(i)),
                b"{}".to_vec(),
            )
        })
        .collect();
    let later: Vec<_> = (10..20)
        .map(|i| {
            (
                "default".to_string(),
                task_props("test.record", &ok(i)),
                b"{}".to_vec(),
            )
        })
        .collect();
    env.publish_many(&env.names.tasks_exchange(), now).await;
    env.publish_many(&env.names.delay(), later).await;

    log.wait_distinct(20, Duration::from_secs(60)).await;
    for i in 0..20 {
        assert_eq!(log.runs_of(&ok(i)), 1, "{} ran once", ok(i));
    }
    assert_eq!(log.distinct(), 20, "no poison message ran as a task");

    // Each poison message is in NS.dead, as it was sent, with a reason.
    let dead = env
        .dead_letters(poison.len(), Duration::from_secs(60))
        .await;
    for m in &poison {
        let body = latin1(m["body"].as_str().expect("body"));
        let letter = dead
            .iter()
            .find(|d| d.body == body)
            .unwrap_or_else(|| panic!("not dead-lettered with its body unchanged: {m}"));
        let error = letter.header(H_ERROR).expect("x-error");
        let expected = match m["field"].as_str() {
            Some("header") => {
                "a header name (\"x-\u{FFFD}\u{FFFD}\") is not valid UTF-8".to_string()
            }
            Some(property) => format!("property `{property}` is not valid UTF-8"),
            None => unreachable!("every poison message names its field"),
        };
        assert!(error.contains(&expected), "{m}: x-error {error:?}");
        assert_eq!(letter.header(H_ORIGIN_QUEUE).as_deref(), Some("default"));
    }

    // One `dead` event per dead letter, with the id where it was readable.
    tap.wait_until(
        Duration::from_secs(30),
        "a dead event per poison message",
        |s| s.iter().filter(|e| e.kind == "dead").count() >= poison.len(),
    )
    .await;
    let events = tap.of(EventKind::Dead);
    assert_eq!(events.len(), poison.len(), "{events:#?}");
    for m in &poison {
        let id = m["id"].as_str().unwrap_or_default();
        let readable = !id.contains('\u{ff}');
        let matching = events
            .iter()
            .filter(|e| {
                if readable {
                    e.id == id
                } else {
                    e.raw["id"].is_null()
                }
            })
            .count();
        let want = if readable { 1 } else { 2 };
        assert_eq!(matching, want, "dead events for {id:?}: {events:#?}");
    }
    for e in &events {
        assert_eq!(e.raw["queue"], "default", "{e:?}");
        assert!(
            e.error.as_deref().is_some_and(|r| r.contains("UTF-8")),
            "{e:?}"
        );
    }

    worker.stop().await;
    scheduler.stop().await;
}

/// A batch of different malformed messages, to both exchanges: each ends as
/// one dead letter with exactly one `dead` event, whichever component
/// refused it (scheduler intake, worker decode, worker handler lookup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dead_letter_has_exactly_one_dead_event() {
    let env = TestEnv::new("deadev").await;
    let mut tap = EventTap::new(&env).await;
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());

    let int = AMQPValue::LongLongInt;
    let text = |s: &str| AMQPValue::LongString(s.into());
    // (id, properties): each one unusable for its own reason.
    let cases: Vec<(Option<&str>, BasicProperties)> = vec![
        (
            Some("m-no-type"),
            BasicProperties::default().with_message_id("m-no-type".into()),
        ),
        (Some("m-empty-type"), task_props("", "m-empty-type")),
        (
            None,
            BasicProperties::default()
                .with_type("kairos.noop".into())
                .with_message_id("".into()),
        ),
        (
            Some("m-bad-run-at"),
            with_headers(
                task_props("kairos.noop", "m-bad-run-at"),
                &[("x-run-at", text("soon"))],
            ),
        ),
        (
            Some("m-bad-attempt"),
            with_headers(
                task_props("kairos.noop", "m-bad-attempt"),
                &[("x-attempt", int(0))],
            ),
        ),
        (
            Some("m-bad-retries"),
            with_headers(
                task_props("kairos.noop", "m-bad-retries"),
                &[("x-max-retries", int(-1))],
            ),
        ),
        (
            Some("m-bad-timeout"),
            with_headers(
                task_props("kairos.noop", "m-bad-timeout"),
                &[("x-timeout-ms", AMQPValue::Double(1.5))],
            ),
        ),
        (
            Some("m-no-handler"),
            task_props("nobody.home", "m-no-handler"),
        ),
        (Some("m-bad-body"), task_props("kairos.sleep", "m-bad-body")),
        (
            Some("m-permanent"),
            with_headers(
                task_props("kairos.fail", "m-permanent"),
                &[("x-max-retries", int(0))],
            ),
        ),
    ];
    let mut published = 0;
    for exchange in [env.names.delay(), env.names.tasks_exchange()] {
        let batch: Vec<_> = cases
            .iter()
            .map(|(_, p)| ("default".to_string(), p.clone(), b"not json".to_vec()))
            .collect();
        published += batch.len();
        env.publish_many(&exchange, batch).await;
    }
    // And raw bytes where the contract wants text, to both.
    let poison: Vec<_> = poison_messages(&env)
        .into_iter()
        .map(|mut m| {
            if m["field"] != "type" {
                m["type"] = "kairos.noop".into();
            }
            m
        })
        .collect();
    published += poison.len();
    publish_raw(&env, &serde_json::Value::Array(poison));

    let dead = env.dead_letters(published, Duration::from_secs(60)).await;
    tap.wait_until(
        Duration::from_secs(60),
        "a dead event per dead letter",
        |s| s.iter().filter(|e| e.kind == "dead").count() >= published,
    )
    .await;

    // The same ids, as many times, on both sides (None: no readable id).
    let mut by_letter: HashMap<Option<String>, usize> = HashMap::new();
    for d in &dead {
        let id = d
            .id()
            .filter(|id| !id.is_empty() && !id.contains('\u{fffd}'));
        *by_letter.entry(id).or_default() += 1;
    }
    let mut by_event: HashMap<Option<String>, usize> = HashMap::new();
    for e in tap.of(EventKind::Dead) {
        *by_event
            .entry(e.raw["id"].as_str().map(str::to_string))
            .or_default() += 1;
        assert!(e.error.is_some(), "a dead event says why: {e:?}");
    }
    assert_eq!(by_letter, by_event, "dead letters vs dead events");
    assert_eq!(dead.len(), published);

    worker.stop().await;
    scheduler.stop().await;
}

/// RabbitMQ accepts a header nested 20,000 levels deep (it refuses unknown
/// field types and malformed tables at publish, closing the publisher's
/// connection): parsing, checking, storing and dropping it must not blow a
/// thread's stack in the scheduler or the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_headers_do_not_take_a_process_down() {
    let env = TestEnv::new("deep").await;
    let mut tap = EventTap::new(&env).await;
    let log = RunLog::default();
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.record", log.handler(0)));
    let mut deep = Vec::new();
    for (dest, exchange) in [
        ("delay", env.names.delay()),
        ("tasks", env.names.tasks_exchange()),
    ] {
        for tables in [false, true] {
            deep.push(serde_json::json!({
                "exchange": exchange, "key": "default", "body": "{}",
                "type": "test.record", "id": format!("deep-{dest}-{tables}"),
                "nest": 20_000, "tables": tables,
            }));
        }
    }
    publish_raw(&env, &serde_json::Value::Array(deep.clone()));
    let fine: Vec<_> = (0..10)
        .map(|i| {
            (
                "default".to_string(),
                task_props("test.record", &format!("fine-{i}")),
                b"{}".to_vec(),
            )
        })
        .collect();
    env.publish_many(&env.names.tasks_exchange(), fine.clone())
        .await;
    env.publish_many(
        &env.names.delay(),
        fine.into_iter()
            .map(|(k, p, b)| {
                let id = p
                    .message_id()
                    .as_ref()
                    .map(|s| format!("{s}-later"))
                    .unwrap_or_default();
                (k, p.with_message_id(id.as_str().into()), b)
            })
            .collect(),
    )
    .await;

    // Each deep message is dead-lettered with a reason, and the rest runs.
    tap.wait_until(Duration::from_secs(60), "every message to end", |seen| {
        let ended = |id: &str| {
            seen.iter()
                .any(|e| e.id == id && (e.kind == "succeeded" || e.kind == "dead"))
        };
        deep.iter()
            .all(|m| ended(m["id"].as_str().unwrap_or_default()))
            && (0..10).all(|i| ended(&format!("fine-{i}")) && ended(&format!("fine-{i}-later")))
    })
    .await;
    assert_eq!(
        log.distinct(),
        20,
        "the ordinary tasks ran, the deep ones did not"
    );
    let dead = env.dead_letters(deep.len(), Duration::from_secs(30)).await;
    for d in &dead {
        let error = d.header(H_ERROR).unwrap_or_default();
        assert!(
            error.contains("more than 32 levels deep"),
            "{:?}: {error}",
            d.id()
        );
        assert!(
            d.id().is_some_and(|id| id.starts_with("deep-")),
            "{:?}",
            d.id()
        );
    }

    worker.stop().await;
    scheduler.stop().await;
}
