//! `POST /v1/tasks` (and `kairosctl task add`): a JSON
//! [`TaskTemplate`] checked as a one-off task and turned into a
//! [`NewTask`]. The fields and their rules are the template's
//! ([`crate::template`]); this module adds the JSON parsing and the error
//! the HTTP API answers with.
//!
//! `body` is any JSON value, sent as JSON bytes with `content_type:
//! application/json`; `body_text` sends a string as UTF-8 bytes instead.
//! `run_at` (Unix ms) or `delay_ms` make it a delayed task.

use crate::client::NewTask;
use crate::template::{Origin, TaskTemplate, TemplateError};

/// What is wrong with a request, and in which field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RequestError {
    /// The field at fault (`body` when the JSON itself is).
    pub field: &'static str,
    /// Why, for a person.
    pub message: String,
}

impl From<TemplateError> for RequestError {
    /// A header at fault is named in the message: the field is `headers`.
    fn from(e: TemplateError) -> Self {
        let message = match &e.header {
            Some(header) => format!("{header}: {}", e.message),
            None => e.message,
        };
        RequestError {
            field: e.field,
            message,
        }
    }
}

/// Parses and checks a JSON request.
pub fn from_json(bytes: &[u8]) -> Result<NewTask, RequestError> {
    let template: TaskTemplate = serde_json::from_slice(bytes).map_err(|e| RequestError {
        field: "body",
        message: format!("not a task request: {e}"),
    })?;
    Ok(template.to_new_task(Origin::OneOff)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::AMQPValue;

    #[test]
    fn a_full_request_becomes_a_task() {
        let t = from_json(
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
        let t = from_json(
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
        let t = from_json(br#"{"name":"kairos.noop"}"#).unwrap();
        assert_eq!(t.queue, "default");
        assert_eq!(t.priority, 0);
        assert!(t.body.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        let long_header = format!(r#"{{"name":"a","headers":{{"{}":1}}}}"#, "h".repeat(256));
        let long_queue = format!(r#"{{"name":"a","queue":"{}"}}"#, "q".repeat(201));
        for (json, field) in [(long_header, "headers"), (long_queue, "queue")] {
            let err = from_json(json.as_bytes()).unwrap_err();
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
            let err = from_json(json).unwrap_err();
            assert_eq!(err.field, field, "{}", String::from_utf8_lossy(json));
        }
    }
}
