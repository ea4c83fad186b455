//! The stored form of a task while it waits in the Redis delay queue.
//!
//! A record keeps the AMQP properties in their own wire encoding (the
//! encoder and parser of `amq-protocol`, which lapin uses itself), so every
//! header type and pass-through property survives the stay in Redis exactly,
//! at a few bytes of overhead:
//!
//! ```text
//! b'K' 2 | attempt (u32 BE) | queue len (u8) | queue | props len (u32 BE) | props | body
//! ```
//!
//! The task id is not stored in the record: it is the key the record is
//! stored under, and each pending task costs Redis memory for every byte.
//! For the same reason the attempt travels as four bytes, not as a header.

use crate::contract::{ProtocolError, Task, H_ATTEMPT};
use lapin::protocol::basic::{gen_properties, parse_properties};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

const MAGIC: u8 = b'K';
const VERSION: u8 = 2;

/// The properties to store: the task's publish properties without its id
/// and `x-attempt`, which [`decode`] restores.
fn stored_properties(task: &Task) -> BasicProperties {
    let p = task.publish_properties();
    let mut out = BasicProperties::default();
    macro_rules! copy {
        ($($get:ident => $set:ident),*) => {
            $(if let Some(v) = p.$get() { out = out.$set(v.clone()); })*
        };
    }
    copy!(content_type => with_content_type, content_encoding => with_content_encoding,
        delivery_mode => with_delivery_mode, priority => with_priority,
        correlation_id => with_correlation_id, reply_to => with_reply_to,
        expiration => with_expiration, timestamp => with_timestamp, kind => with_type,
        user_id => with_user_id, app_id => with_app_id, cluster_id => with_cluster_id);
    if let Some(headers) = p.headers() {
        let mut kept = FieldTable::default();
        for (k, v) in headers.inner() {
            if k.as_str() != H_ATTEMPT {
                kept.insert(k.clone(), v.clone());
            }
        }
        out = out.with_headers(kept);
    }
    out
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
    let props_len = u32::try_from(props.len())
        .map_err(|_| ProtocolError::BadRecord("properties too large".into()))?;
    let mut out = Vec::with_capacity(11 + queue.len() + props.len() + task.body.len());
    out.extend_from_slice(&[MAGIC, VERSION]);
    out.extend_from_slice(&task.attempt.to_be_bytes());
    out.push(queue_len);
    out.extend_from_slice(queue);
    out.extend_from_slice(&props_len.to_be_bytes());
    out.extend_from_slice(&props);
    out.extend_from_slice(&task.body);
    Ok(out)
}

/// Decodes the record stored under task `id` back into the task.
pub fn decode(id: &str, bytes: &[u8]) -> Result<Task, ProtocolError> {
    let err = |what: &str| ProtocolError::BadRecord(what.to_string());
    let [magic, version, a0, a1, a2, a3, queue_len, rest @ ..] = bytes else {
        return Err(err("too short"));
    };
    if *magic != MAGIC || *version != VERSION {
        return Err(err("unknown record format"));
    }
    let attempt = u32::from_be_bytes([*a0, *a1, *a2, *a3]);
    let queue_len = usize::from(*queue_len);
    if rest.len() < queue_len + 4 {
        return Err(err("truncated queue"));
    }
    let (queue, rest) = rest.split_at(queue_len);
    let queue = std::str::from_utf8(queue).map_err(|_| err("queue is not UTF-8"))?;
    let (len, rest) = rest.split_at(4);
    let props_len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if rest.len() < props_len {
        return Err(err("truncated properties"));
    }
    let (props, body) = rest.split_at(props_len);
    let (_, properties) =
        parse_properties(props).map_err(|e| ProtocolError::BadRecord(format!("{e:?}")))?;
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(H_ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(attempt)));
    let properties = properties.with_message_id(id.into()).with_headers(headers);
    Task::decode(queue, &properties, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{text, H_ATTEMPT};
    use lapin::types::{AMQPValue, FieldArray, FieldTable};
    use lapin::BasicProperties;

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
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode("x", b"").is_err());
        assert!(decode("x", b"K\x02\x00\x00\x00\x01\xff").is_err());
        assert!(decode("x", b"X\x02\x00\x00\x00\x01\x00\x00\x00\x00\x00").is_err());
        assert!(decode("x", b"K\x02\x00\x00\x00\x01\x01q\x00\x00\x00\x09abc").is_err());
    }
}
