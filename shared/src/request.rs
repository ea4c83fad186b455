//! A task described in JSON, as the HTTP API (`POST /v1/tasks`) and
//! `kairosctl task add` accept it, checked and turned into a [`NewTask`].
//!
//! ```json
//! {"name": "email.send", "queue": "emails", "id": "welcome-42", "priority": 5,
//!  "body": {"to": "a@b.c"}, "delay_ms": 5000, "max_retries": 3,
//!  "timeout_ms": 10000, "headers": {"tenant": "acme"}}
//! ```
//!
//! `body` is any JSON value, sent as JSON bytes with `content_type:
//! application/json`; `body_text` sends a string as UTF-8 bytes instead.
//! `run_at` (Unix ms) or `delay_ms` make it a delayed task.

use crate::client::NewTask;
use crate::contract::{
    validate_id, validate_queue, H_ATTEMPT, H_DELAY_MS, H_ERROR, H_FAILED_AT, H_MAX_RETRIES,
    H_ORIGIN_QUEUE, H_RUN_AT, H_SCHEDULE_ID, H_TIMEOUT_MS, MAX_PRIORITY, MAX_RETRIES_CAP,
};
use lapin::types::{AMQPValue, LongString};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    pub name: String,
    #[serde(default = "default_queue")]
    pub queue: String,
    pub id: Option<String>,
    #[serde(default)]
    pub priority: u8,
    pub body: Option<Value>,
    pub body_text: Option<String>,
    pub run_at: Option<i64>,
    pub delay_ms: Option<i64>,
    pub max_retries: Option<u32>,
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub headers: BTreeMap<String, Value>,
}

fn default_queue() -> String {
    "default".to_string()
}

/// What is wrong with a request, and in which field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RequestError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> RequestError {
    RequestError {
        field,
        message: message.into(),
    }
}

impl TaskRequest {
    /// Parses and checks a JSON request.
    pub fn from_json(bytes: &[u8]) -> Result<NewTask, RequestError> {
        let req: TaskRequest = serde_json::from_slice(bytes)
            .map_err(|e| bad("body", format!("not a task request: {e}")))?;
        req.into_task()
    }

    pub fn into_task(self) -> Result<NewTask, RequestError> {
        if self.name.trim().is_empty() {
            return Err(bad("name", "must not be empty"));
        }
        if self.name.len() > 255 {
            return Err(bad("name", "at most 255 bytes"));
        }
        validate_queue(&self.queue).map_err(|e| bad("queue", e))?;
        if let Some(id) = &self.id {
            validate_id(id).map_err(|e| bad("id", e.to_string()))?;
        }
        if self.priority > MAX_PRIORITY {
            return Err(bad("priority", format!("0 to {MAX_PRIORITY}")));
        }
        if self.timeout_ms == Some(0) {
            return Err(bad("timeout_ms", "must be positive"));
        }
        let mut task = NewTask::new(self.name)
            .queue(self.queue)
            .priority(self.priority);
        task = match (self.body, self.body_text) {
            (Some(_), Some(_)) => return Err(bad("body", "give body or body_text, not both")),
            (Some(json), None) => task.json(&json).map_err(|e| bad("body", e.to_string()))?,
            (None, Some(text)) => task.body(text.into_bytes()),
            (None, None) => task,
        };
        if let Some(id) = self.id {
            task = task.id(id);
        }
        if let Some(at) = self.run_at {
            task = task.run_at(at);
        }
        if let Some(ms) = self.delay_ms {
            task = task.delay_ms(ms);
        }
        if let Some(n) = self.max_retries {
            task = task.max_retries(n);
        }
        if let Some(ms) = self.timeout_ms {
            task = task.timeout_ms(ms);
        }
        for (name, value) in self.headers {
            // A header name is an AMQP short string.
            crate::short::header_name(&name).map_err(|e| bad("headers", e.to_string()))?;
            // The contract's own headers may be given here too (as schedule
            // templates allow); they set the same thing as their fields.
            let as_int = |v: &Value| {
                v.as_i64()
                    .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                    .ok_or_else(|| bad("headers", format!("{name}: {v} is not an integer")))
            };
            match name.as_str() {
                H_RUN_AT => task = task.run_at(as_int(&value)?),
                H_DELAY_MS => task = task.delay_ms(as_int(&value)?),
                H_MAX_RETRIES => {
                    let n = u32::try_from(as_int(&value)?)
                        .map_err(|_| bad("headers", format!("{name}: not a retry count")))?;
                    task = task.max_retries(n);
                }
                H_TIMEOUT_MS => {
                    let n = u64::try_from(as_int(&value)?)
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("headers", format!("{name}: must be positive")))?;
                    task = task.timeout_ms(n);
                }
                H_ATTEMPT | H_ERROR | H_FAILED_AT | H_ORIGIN_QUEUE | H_SCHEDULE_ID => {
                    return Err(bad("headers", format!("{name} is set by Kairos")));
                }
                _ => {
                    let value = match value {
                        Value::String(s) => AMQPValue::LongString(LongString::from(s)),
                        Value::Bool(b) => AMQPValue::Boolean(b),
                        Value::Number(n) => match n.as_i64() {
                            Some(i) => AMQPValue::LongLongInt(i),
                            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
                        },
                        other => {
                            return Err(bad(
                                "headers",
                                format!("{name}: {other} is not a string, number or boolean"),
                            ))
                        }
                    };
                    task = task.header(&name, value);
                }
            }
        }
        // Given as a field or a header: either way the contract's cap.
        if let Some(n) = task.max_retries.filter(|n| *n > MAX_RETRIES_CAP) {
            return Err(bad(
                "max_retries",
                format!("{n} exceeds the cap of {MAX_RETRIES_CAP} retries"),
            ));
        }
        Ok(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_request_becomes_a_task() {
        let t = TaskRequest::from_json(
            br#"{"name":"email.send","queue":"emails","id":"w-1","priority":5,"body":{"to":"a"},
                "delay_ms":5000,"max_retries":2,"timeout_ms":100,"headers":{"tenant":"acme","n":3}}"#,
        )
        .unwrap();
        assert_eq!(t.name, "email.send");
        assert_eq!(t.queue, "emails");
        assert_eq!(t.id.as_deref(), Some("w-1"));
        assert_eq!(t.priority, 5);
        assert_eq!(t.body, br#"{"to":"a"}"#);
        assert_eq!(t.content_type.as_deref(), Some("application/json"));
        assert_eq!(t.delay_ms, Some(5000));
        assert_eq!(t.max_retries, Some(2));
        assert_eq!(t.timeout_ms, Some(100));
        assert_eq!(t.headers.inner().get("n"), Some(&AMQPValue::LongLongInt(3)));
    }

    #[test]
    fn contract_headers_set_their_fields() {
        let t = TaskRequest::from_json(
            br#"{"name":"a","headers":{"x-max-retries":3,"x-delay-ms":"250","x-timeout-ms":9}}"#,
        )
        .unwrap();
        assert_eq!(t.max_retries, Some(3));
        assert_eq!(t.delay_ms, Some(250));
        assert_eq!(t.timeout_ms, Some(9));
        assert!(t.headers.inner().is_empty(), "set through the fields, once");
    }

    #[test]
    fn defaults_are_the_default_queue_and_priority_zero() {
        let t = TaskRequest::from_json(br#"{"name":"kairos.noop"}"#).unwrap();
        assert_eq!(t.queue, "default");
        assert_eq!(t.priority, 0);
        assert!(t.body.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        let long_header = format!(r#"{{"name":"a","headers":{{"{}":1}}}}"#, "h".repeat(256));
        let long_queue = format!(r#"{{"name":"a","queue":"{}"}}"#, "q".repeat(201));
        for (json, field) in [(long_header, "headers"), (long_queue, "queue")] {
            let err = TaskRequest::from_json(json.as_bytes()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
        let cases: [(&[u8], &str); 10] = [
            (br#"{"name":"a","max_retries":1001}"#, "max_retries"),
            (
                br#"{"name":"a","headers":{"x-max-retries":1099511627776}}"#,
                "headers",
            ),
            (br#"{"name":""}"#, "name"),
            (br#"{"name":"a","priority":10}"#, "priority"),
            (br#"{"name":"a","id":""}"#, "id"),
            (br#"{"name":"a","queue":""}"#, "queue"),
            (br#"{"name":"a","headers":{"x-attempt":1}}"#, "headers"),
            (br#"{"name":"a","headers":{"h":[1]}}"#, "headers"),
            (br#"{"name":"a","body":1,"body_text":"x"}"#, "body"),
            (br#"{"nam":"a"}"#, "body"),
        ];
        for (json, field) in cases {
            let err = TaskRequest::from_json(json).unwrap_err();
            assert_eq!(err.field, field, "{}", String::from_utf8_lossy(json));
        }
    }
}
