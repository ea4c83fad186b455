//! The stored form of a task while it waits in the Redis delay queue.
//!
//! A record keeps the AMQP properties in their own wire encoding (the
//! encoder and parser of `amq-protocol`, which lapin uses itself), so every
//! header type and pass-through property survives the stay in Redis exactly,
//! at a few bytes of overhead:
//!
//! ```text
//! b'k' | attempt (varint) | queue len (u8) | queue | props | body
//! ```
//!
//! The properties encoding knows its own length, so the body is what
//! follows it. Each pending task costs Redis memory for every byte, so
//! nothing is stored that can be restored: not the task id (it is the key
//! the record is stored under), not `x-attempt` (the varint), not `x-run-at`
//! (the due time the record is held at, which the scheduler writes back
//! into `x-run-at` when it publishes), not the delivery mode (always
//! persistent) nor a priority of 0 (the default). The leading `k` marks this format;
//! a record that starts with anything else is unreadable and is
//! dead-lettered with what can be salvaged.

use crate::contract::{
    int_header, ProtocolError, Task, H_ATTEMPT, H_MAX_RETRIES, H_RUN_AT, MAX_RETRIES_CAP,
};
use lapin::protocol::basic::{gen_properties, parse_properties};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

/// The first byte of every record.
const MAGIC: u8 = b'k';

/// The properties to store: the task's publish properties without its id,
/// `x-attempt` and `x-run-at` (see the module comment).
fn stored_properties(task: &Task) -> BasicProperties {
    let p = task.publish_properties();
    let mut out = BasicProperties::default();
    macro_rules! copy {
        ($($get:ident => $set:ident),*) => {
            $(if let Some(v) = p.$get() { out = out.$set(v.clone()); })*
        };
    }
    copy!(content_type => with_content_type, content_encoding => with_content_encoding,
        correlation_id => with_correlation_id, reply_to => with_reply_to,
        expiration => with_expiration, timestamp => with_timestamp, kind => with_type,
        user_id => with_user_id, app_id => with_app_id, cluster_id => with_cluster_id);
    if task.priority > 0 {
        out = out.with_priority(task.priority);
    }
    if let Some(headers) = p.headers() {
        let mut kept = FieldTable::default();
        for (k, v) in headers.inner() {
            if k.as_str() != H_ATTEMPT && k.as_str() != H_RUN_AT {
                kept.insert(k.clone(), v.clone());
            }
        }
        // No table at all rather than an empty one: four bytes a task.
        if !kept.inner().is_empty() {
            out = out.with_headers(kept);
        }
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut n: u32) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads a varint from the front of `bytes`; None when truncated or too long.
fn take_varint(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let mut n: u64 = 0;
    for (i, b) in bytes.iter().enumerate().take(5) {
        n |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((u32::try_from(n).ok()?, &bytes[i + 1..]));
        }
    }
    None
}

/// Encodes a task for storage under its id.
pub fn encode(task: &Task) -> Result<Vec<u8>, ProtocolError> {
    let props = cookie_factory::gen_simple(
        gen_properties(&stored_properties(task)),
        Vec::with_capacity(64),
    )
    .map_err(|e| ProtocolError::BadRecord(format!("cannot encode properties: {e:?}")))?;
    let queue = task.queue.as_bytes();
    let queue_len = u8::try_from(queue.len())
        .map_err(|_| ProtocolError::BadRecord("queue name longer than 255 bytes".into()))?;
    let mut out = Vec::with_capacity(7 + queue.len() + props.len() + task.body.len());
    out.push(MAGIC);
    put_varint(&mut out, task.attempt);
    out.push(queue_len);
    out.extend_from_slice(queue);
    out.extend_from_slice(&props);
    out.extend_from_slice(&task.body);
    Ok(out)
}

/// Decodes the record stored under task `id` back into the task.
pub fn decode(id: &str, bytes: &[u8]) -> Result<Task, ProtocolError> {
    let err = |what: &str| ProtocolError::BadRecord(what.to_string());
    let (attempt, queue, props_and_body) = match bytes {
        [MAGIC, rest @ ..] => split(rest).ok_or_else(|| err("truncated record"))?,
        _ => return Err(err("unknown record format")),
    };
    let queue = std::str::from_utf8(queue).map_err(|_| err("queue is not UTF-8"))?;
    // The parser stops where the properties end: the rest is the body.
    let (body, properties) =
        parse_properties(props_and_body).map_err(|e| ProtocolError::BadRecord(format!("{e:?}")))?;
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(H_ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(attempt)));
    // Records written before `x-max-retries` was capped may ask for more:
    // they were accepted, so they run with the cap rather than being
    // dropped as unreadable.
    if matches!(int_header(&headers, H_MAX_RETRIES), Ok(Some(n)) if n > i64::from(MAX_RETRIES_CAP))
    {
        headers.insert(
            H_MAX_RETRIES.into(),
            AMQPValue::LongLongInt(i64::from(MAX_RETRIES_CAP)),
        );
    }
    // The id is the Redis member the record was stored under.
    let message_id =
        crate::short::short("task id", id).map_err(|e| ProtocolError::BadRecord(e.to_string()))?;
    let properties = properties.with_message_id(message_id).with_headers(headers);
    Task::decode(queue, &properties, body)
}

/// A record that does not decode into a task, as a dead letter: its
/// properties and body when they can still be read (the queue name was the
/// fault, say), else the raw record as the body. With the dead-letter
/// headers (the error, and the queue it was meant for when known).
pub fn salvage(id: &str, bytes: &[u8], error: &str, failed_at: i64) -> (BasicProperties, Vec<u8>) {
    let parts = match bytes {
        [MAGIC, rest @ ..] => split(rest),
        _ => None,
    };
    let parsed = parts.and_then(|(_, queue, props_and_body)| {
        let (body, props) = parse_properties(props_and_body).ok()?;
        Some((
            String::from_utf8_lossy(queue).into_owned(),
            props,
            body.to_vec(),
        ))
    });
    let (queue, mut props, body) =
        parsed.unwrap_or_else(|| (String::new(), BasicProperties::default(), bytes.to_vec()));
    if let Ok(id) = crate::short::short("task id", id) {
        props = props.with_message_id(id);
    }
    let props = crate::contract::raw_dead_letter_properties(&props, &queue, error, failed_at);
    (props, body)
}

/// The parts of a record: attempt, queue, then the properties followed by
/// the body.
type Parts<'a> = (u32, &'a [u8], &'a [u8]);

fn split(rest: &[u8]) -> Option<Parts<'_>> {
    let (attempt, rest) = take_varint(rest)?;
    let (&queue_len, rest) = rest.split_first()?;
    let (queue, rest) = rest.split_at_checked(usize::from(queue_len))?;
    Some((attempt, queue, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{text, H_ATTEMPT};
    use lapin::types::{AMQPValue, FieldArray, FieldTable};
    use lapin::BasicProperties;

    #[test]
    fn a_record_for_a_queue_too_long_is_salvaged_with_its_properties() {
        let mut task = Task::decode(
            "q",
            &BasicProperties::default().with_type("t".into()),
            b"body",
        )
        .unwrap();
        task.queue = "k".repeat(250);
        let rec = encode(&task).unwrap();
        let err = decode("id-1", &rec).unwrap_err();
        assert!(err.to_string().contains("routing key"), "{err}");
        let (props, body) = salvage("id-1", &rec, &err.to_string(), 5);
        assert_eq!(body, b"body");
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "t");
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "id-1");
        let h = props.headers().as_ref().unwrap();
        assert_eq!(h.inner().get("x-origin-queue"), Some(&text(&task.queue)));
        let (_, raw) = salvage("id-2", b"garbage", "unknown record format", 5);
        assert_eq!(raw, b"garbage");
    }

    #[test]
    fn round_trip_keeps_everything() {
        let mut headers = FieldTable::default();
        headers.insert("s".into(), text("v"));
        headers.insert("i8".into(), AMQPValue::ShortShortInt(-3));
        headers.insert("u64".into(), AMQPValue::LongLongInt(1 << 40));
        headers.insert("b".into(), AMQPValue::Boolean(true));
        headers.insert(
            "arr".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1)])),
        );
        headers.insert(H_ATTEMPT.into(), AMQPValue::LongLongInt(2));
        let props = BasicProperties::default()
            .with_type("email.send".into())
            .with_message_id("id-7".into())
            .with_priority(4)
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_correlation_id("corr".into())
            .with_headers(headers);
        let task = Task::decode("emails", &props, b"{\"to\":\"x\"}").unwrap();
        let back = decode("id-7", &encode(&task).unwrap()).unwrap();
        assert_eq!(back.id, "id-7");
        assert_eq!(back.name, "email.send");
        assert_eq!(back.queue, "emails");
        assert_eq!(back.priority, 4);
        assert_eq!(back.attempt, 2);
        assert_eq!(back.body, b"{\"to\":\"x\"}");
        assert_eq!(back.publish_properties(), task.publish_properties());
    }

    #[test]
    fn the_id_is_not_stored_twice() {
        let props = BasicProperties::default()
            .with_type("t".into())
            .with_message_id("a-rather-long-task-identifier-0123456789".into());
        let task = Task::decode("q", &props, b"").unwrap();
        let rec = encode(&task).unwrap();
        assert!(!rec.windows(10).any(|w| w == b"identifier"));
        assert!(rec.len() < 40, "{} bytes", rec.len());
    }

    #[test]
    fn run_at_is_not_stored_and_small_tasks_stay_small() {
        let mut headers = FieldTable::default();
        headers.insert(H_RUN_AT.into(), AMQPValue::LongLongInt(1_764_000_000_000));
        let props = BasicProperties::default()
            .with_type("kairos.noop".into())
            .with_headers(headers);
        let task = Task::decode("default", &props, b"").unwrap();
        let rec = encode(&task).unwrap();
        // magic, attempt, queue, property flags, type.
        assert_eq!(rec.len(), 1 + 1 + 8 + 2 + 12, "{rec:?}");
        let back = decode("x", &rec).unwrap();
        assert_eq!(back.run_at, None);
        assert_eq!(back.attempt, 1);
    }

    #[test]
    fn varints_round_trip() {
        for n in [0, 1, 127, 128, 300, 16_383, 16_384, u32::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, n);
            assert_eq!(take_varint(&out), Some((n, &[][..])), "{n}");
        }
        assert_eq!(take_varint(&[0x80, 0x80]), None);
        assert_eq!(take_varint(&[0xff; 6]), None);
    }

    #[test]
    fn records_from_before_the_retry_cap_still_decode() {
        // Written by a version without the cap: x-max-retries u32::MAX.
        let mut headers = FieldTable::default();
        headers.insert(
            H_MAX_RETRIES.into(),
            AMQPValue::LongLongInt(i64::from(u32::MAX)),
        );
        let props = cookie_factory::gen_simple(
            gen_properties(
                &BasicProperties::default()
                    .with_type("t".into())
                    .with_headers(headers),
            ),
            Vec::new(),
        )
        .unwrap();
        let mut rec = vec![MAGIC, 1, 1, b'q'];
        rec.extend_from_slice(&props);
        let task = decode("old", &rec).unwrap();
        assert_eq!(task.max_retries, Some(MAX_RETRIES_CAP));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode("x", b"").is_err());
        assert!(decode("x", b"K\x02\x00\x00\x00\x01\xff").is_err());
        assert!(decode("x", b"X\x02\x00\x00\x00\x01\x00\x00\x00\x00\x00").is_err());
        assert!(decode("x", b"K\x02\x00\x00\x00\x01\x01q\x00\x00\x00\x09abc").is_err());
        assert!(decode("x", b"k\x01\x01q\x09abc").is_err());
        assert!(decode("x", b"k\xff\xff").is_err());
        assert!(decode("x", b"k\x01\x05q").is_err());
    }
}
