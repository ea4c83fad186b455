//! One dead letter as the API shows it: the summary of a listing
//! ([`DeadLetter`]) and the whole letter with its body and headers
//! ([`LetterDetail`]).

use crate::contract::{value_to_string, H_ATTEMPT, H_ERROR, H_FAILED_AT, H_ORIGIN_QUEUE};
use lapin::message::BasicGetMessage;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use serde::Serialize;
use serde_json::{json, Map, Value};

/// One dead letter, as `kairosctl dead list` shows it.
#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct DeadLetter {
    /// Task id (`message_id`), if it had a readable one.
    pub id: Option<String>,
    /// Task name (`type`), if readable.
    pub name: Option<String>,
    /// The queue it was meant for (`x-origin-queue`, else the routing key).
    pub queue: String,
    /// `x-attempt` as text.
    pub attempt: Option<String>,
    /// `x-error`: why it failed.
    pub error: Option<String>,
    /// `x-failed-at`, Unix ms.
    pub failed_at: Option<i64>,
    /// Size of its body.
    pub body_bytes: usize,
}

/// A dead letter with its body, headers and properties
/// (`GET /v1/dead/{id}`, `kairosctl dead show`).
#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct LetterDetail {
    /// What a listing shows of it.
    #[serde(flatten)]
    pub letter: DeadLetter,
    /// The routing key it was dead-lettered with.
    pub routing_key: String,
    /// `content_type`, `content_encoding`, `priority`, `timestamp`,
    /// `correlation_id`, `app_id` (absent ones null).
    #[schema(value_type = Object)]
    pub properties: Value,
    /// Every header, as JSON (byte arrays as `{"base64": ...}`).
    pub headers: Map<String, Value>,
    /// How the body is given: `json` (`body` is its JSON value), `text`
    /// (`body` is a string) or `base64` (`body_base64`).
    #[schema(value_type = String)]
    pub body_encoding: &'static str,
    /// The body when it is JSON or UTF-8 text, else null.
    pub body: Option<Value>,
    /// The body in base64 when it is neither, else null.
    pub body_base64: Option<String>,
}

pub(super) fn header(props: &BasicProperties, name: &str) -> Option<String> {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
        .map(value_to_string)
}

/// The summary of a letter.
pub(super) fn describe(m: &BasicGetMessage) -> DeadLetter {
    let p = &m.delivery.properties;
    DeadLetter {
        id: p.message_id().as_ref().map(|s| s.to_string()),
        name: p.kind().as_ref().map(|s| s.to_string()),
        queue: origin_queue(m),
        attempt: header(p, H_ATTEMPT),
        error: header(p, H_ERROR).or_else(|| broker_death(p)),
        failed_at: header(p, H_FAILED_AT).and_then(|s| s.parse().ok()),
        body_bytes: m.delivery.data.len(),
    }
}

/// Why RabbitMQ itself dead-lettered a letter that no Kairos process
/// wrote an `x-error` on: its most recent `x-death` entry (RabbitMQ puts it
/// first). In quorum mode that is how a message the scheduler's intake
/// could not take within `x-delivery-limit` deliveries reaches `NS.dead`.
fn broker_death(p: &BasicProperties) -> Option<String> {
    let headers = p.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(latest) = deaths.as_slice().first()? else {
        return None;
    };
    let field = |name: &str| latest.inner().get(name).map(value_to_string);
    let reason = field("reason")?;
    let queue = field("queue").unwrap_or_default();
    Some(match reason.as_str() {
        "delivery_limit" => format!(
            "dead-lettered by RabbitMQ from {queue}: delivered more than its \
             x-delivery-limit without an ack (its consumer died, lost its connection or \
             returned it each time)"
        ),
        other => format!("dead-lettered by RabbitMQ from {queue} ({other})"),
    })
}

/// The queue a letter was meant for.
pub(super) fn origin_queue(m: &BasicGetMessage) -> String {
    header(&m.delivery.properties, H_ORIGIN_QUEUE)
        .unwrap_or_else(|| m.delivery.routing_key.to_string())
}

/// The whole letter.
pub(super) fn detail(m: &BasicGetMessage) -> LetterDetail {
    let p = &m.delivery.properties;
    let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map(|s| s.to_string());
    let headers = p
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), to_json(v)))
                .collect()
        })
        .unwrap_or_default();
    let (body_encoding, body, body_base64) = body_json(&m.delivery.data);
    LetterDetail {
        letter: describe(m),
        routing_key: m.delivery.routing_key.to_string(),
        properties: json!({
            "content_type": text(p.content_type()),
            "content_encoding": text(p.content_encoding()),
            "priority": p.priority(),
            "timestamp": p.timestamp(),
            "correlation_id": text(p.correlation_id()),
            "app_id": text(p.app_id()),
        }),
        headers,
        body_encoding,
        body,
        body_base64,
    }
}

/// A body as JSON when it is JSON, as a string when it is UTF-8 text,
/// else in base64.
fn body_json(data: &[u8]) -> (&'static str, Option<Value>, Option<String>) {
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        return ("json", Some(v), None);
    }
    match std::str::from_utf8(data) {
        Ok(s) => ("text", Some(Value::String(s.to_string())), None),
        Err(_) => ("base64", None, Some(base64(data))),
    }
}

/// A header value as JSON: strings as strings (bytes that are not UTF-8
/// replaced), numbers, booleans, arrays and tables as such, byte arrays as
/// `{"base64": ...}`.
pub fn to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) | AMQPValue::DecimalValue(_) => {
            json!(value_to_string(v))
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), to_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => json!({ "base64": base64(b.as_slice()) }),
        AMQPValue::Void => Value::Null,
    }
}

/// Standard base64 with padding (RFC 4648).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, FieldTable};

    #[test]
    fn base64_follows_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }

    #[test]
    fn bodies_are_json_text_or_base64() {
        assert_eq!(body_json(br#"{"a":1}"#).1, Some(json!({"a": 1})));
        assert_eq!(body_json(b"hello").0, "text");
        let (enc, body, b64) = body_json(&[0xff, 0x00]);
        assert_eq!((enc, body, b64.as_deref()), ("base64", None, Some("/wA=")));
    }

    #[test]
    fn header_values_become_json() {
        let mut t = FieldTable::default();
        t.insert("n".into(), AMQPValue::LongInt(3));
        t.insert("s".into(), crate::contract::text("x"));
        t.insert("b".into(), AMQPValue::ByteArray(ByteArray::from(vec![1u8])));
        assert_eq!(
            to_json(&AMQPValue::FieldTable(t)),
            json!({"n": 3, "s": "x", "b": {"base64": "AQ=="}})
        );
    }
}
