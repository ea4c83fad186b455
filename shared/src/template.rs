//! One task as a user describes it: the fields `POST /v1/tasks`, a
//! schedule's `task` (HTTP, the schedule file, Redis) and `kairosctl` share,
//! their one check and their one conversion to a [`NewTask`] (and from
//! there, [`NewTask::to_message`], to the contract's AMQP properties).
//!
//! ```json
//! {"name": "email.send", "queue": "emails", "id": "welcome-42", "priority": 5,
//!  "body": {"to": "a@b.c"}, "delay_ms": 5000, "max_retries": 3,
//!  "timeout_ms": 10000, "headers": {"tenant": "acme"}}
//! ```
//!
//! Where a task comes from ([`Origin`]) decides the few rules that differ:
//! a schedule sets the id and due time of each occurrence itself, so its
//! template may not, and its headers are integers rather than any number.

use crate::client::NewTask;
use crate::contract::{
    cost_in_range, estimate_in_range, max_retries_in_range, timeout_in_range, validate_id,
    validate_queue, H_ATTEMPT, H_COST, H_DELAY_MS, H_ERROR, H_ESTIMATE_MS, H_FAILED_AT,
    H_MAX_RETRIES, H_ORIGIN_QUEUE, H_RUN_AT, H_SCHEDULE_ID, H_TIMEOUT_MS, MAX_PRIORITY,
};
use crate::short::{header_name, MAX_SHORT_STRING};
use lapin::types::{AMQPValue, LongString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The queue of a task that names none.
pub const DEFAULT_QUEUE: &str = "default";

/// The fields only a one-off task may set: a schedule's occurrences get
/// their id and due time from the schedule. Named as serde names them.
const ONE_OFF_FIELDS: [&str; 4] = ["id", "body_text", "run_at", "delay_ms"];

/// Headers Kairos writes itself (attempts, dead letters, schedules).
const KAIROS_HEADERS: [&str; 5] = [
    H_ATTEMPT,
    H_ERROR,
    H_FAILED_AT,
    H_ORIGIN_QUEUE,
    H_SCHEDULE_ID,
];

/// Headers the scheduler writes on every occurrence of a schedule.
const SCHEDULER_HEADERS: [&str; 4] = [H_RUN_AT, H_DELAY_MS, H_ATTEMPT, H_SCHEDULE_ID];

/// A task as a user gives it. The field order is the stored order of a
/// schedule's template; every optional field is left out when unset, so a
/// stored template holds what its author wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskTemplate {
    /// Task name (AMQP `type`).
    pub name: String,
    /// Logical queue (the routing key on `NS.tasks`).
    #[serde(default = "default_queue")]
    pub queue: String,
    /// 0 to [`MAX_PRIORITY`].
    #[serde(default)]
    pub priority: u8,
    /// Any JSON; sent JSON-encoded with content type `application/json`.
    /// Absent (or `null`) means an empty body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// More AMQP headers: strings, numbers, booleans. The contract's
    /// `x-max-retries` and `x-timeout-ms` (and, for a one-off task,
    /// `x-run-at` and `x-delay-ms`) mean what their fields mean.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub headers: Map<String, Value>,
    /// Retries after the first attempt (`x-max-retries`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Time limit of one attempt (`x-timeout-ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Resource units the task occupies while it runs (`x-cost`, 1 to
    /// 1,000,000; 1 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u32>,
    /// Expected run time in ms (`x-estimate-ms`), for `shortest-first`
    /// queues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_ms: Option<u64>,
    /// Task id (one-off tasks; default: a new UUIDv7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A string sent as UTF-8 bytes instead of `body` (one-off tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_text: Option<String>,
    /// Due time, Unix ms (`x-run-at`; one-off tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<i64>,
    /// Due this long after the scheduler accepts it (`x-delay-ms`; one-off
    /// tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<i64>,
}

fn default_queue() -> String {
    DEFAULT_QUEUE.to_string()
}

/// Where a template comes from: the rules that differ between the two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// One task, now or later (`POST /v1/tasks`, `kairosctl task add`).
    OneOff,
    /// The template of a schedule's occurrences: no id or due time of its
    /// own, and headers are strings, integers or booleans.
    Schedule,
}

/// What is wrong with a template: the field (as serde names it), the
/// header when one is at fault, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", self.path())]
pub struct TemplateError {
    /// The field at fault (`name`, `headers`, `max_retries`...).
    pub field: &'static str,
    /// The header at fault, when `field` is `headers` and the name is
    /// usable in a message.
    pub header: Option<String>,
    /// Why, for a person.
    pub message: String,
}

impl TemplateError {
    fn new(field: &'static str, message: impl Into<String>) -> Self {
        TemplateError {
            field,
            header: None,
            message: message.into(),
        }
    }

    fn header(name: &str, message: impl Into<String>) -> Self {
        TemplateError {
            field: "headers",
            header: Some(name.to_string()),
            message: message.into(),
        }
    }

    /// `field`, or `headers.NAME` for a header.
    pub fn path(&self) -> String {
        match &self.header {
            Some(h) => format!("{}.{h}", self.field),
            None => self.field.to_string(),
        }
    }
}

impl TaskTemplate {
    /// A template with only a name: the default queue, priority 0, no body.
    pub fn new(name: impl Into<String>) -> Self {
        TaskTemplate {
            name: name.into(),
            queue: default_queue(),
            priority: 0,
            body: None,
            headers: Map::new(),
            max_retries: None,
            timeout_ms: None,
            cost: None,
            estimate_ms: None,
            id: None,
            body_text: None,
            run_at: None,
            delay_ms: None,
        }
    }

    /// The first field set that only a one-off task may set.
    pub fn one_off_field(&self) -> Option<&'static str> {
        let set = [
            self.id.is_some(),
            self.body_text.is_some(),
            self.run_at.is_some(),
            self.delay_ms.is_some(),
        ];
        ONE_OFF_FIELDS
            .into_iter()
            .zip(set)
            .find_map(|(field, set)| set.then_some(field))
    }

    /// Checks the template against the contract and builds the task it
    /// describes. The contract's own headers set their fields; a field
    /// given as well wins over its header.
    pub fn to_new_task(&self, origin: Origin) -> Result<NewTask, TemplateError> {
        self.check_fields(origin)?;
        let mut task = NewTask::new(self.name.as_str())
            .queue(self.queue.as_str())
            .priority(self.priority);
        task = match (&self.body, &self.body_text) {
            (Some(_), Some(_)) => {
                return Err(TemplateError::new(
                    "body",
                    "give body or body_text, not both",
                ))
            }
            (Some(json), None) => task
                .json(json)
                .map_err(|e| TemplateError::new("body", e.to_string()))?,
            (None, Some(text)) => task.body(text.as_bytes()),
            (None, None) => task,
        };
        for (name, value) in &self.headers {
            task = apply_header(task, name, value, origin)?;
        }
        if let Some(id) = &self.id {
            task = task.id(id.as_str());
        }
        task.run_at = self.run_at.or(task.run_at);
        task.delay_ms = self.delay_ms.or(task.delay_ms);
        task.max_retries = self.max_retries.or(task.max_retries);
        task.timeout_ms = self.timeout_ms.or(task.timeout_ms);
        task.cost = self.cost.or(task.cost);
        task.estimate_ms = self.estimate_ms.or(task.estimate_ms);
        if let Some(n) = task.max_retries {
            max_retries_in_range(i64::from(n))
                .map_err(|message| TemplateError::new("max_retries", message))?;
        }
        Ok(task)
    }

    /// The checks of the fields themselves (headers are checked as they
    /// are applied).
    fn check_fields(&self, origin: Origin) -> Result<(), TemplateError> {
        if origin == Origin::Schedule {
            if let Some(field) = self.one_off_field() {
                return Err(TemplateError::new(
                    field,
                    "is set by the scheduler for each occurrence",
                ));
            }
        }
        if self.name.trim().is_empty() {
            return Err(TemplateError::new(
                "name",
                "is required and must not be empty",
            ));
        }
        if self.name.len() > MAX_SHORT_STRING {
            return Err(TemplateError::new(
                "name",
                format!(
                    "is {} bytes; at most {MAX_SHORT_STRING} (an AMQP short string)",
                    self.name.len()
                ),
            ));
        }
        validate_queue(&self.queue).map_err(|e| TemplateError::new("queue", e))?;
        if let Some(id) = &self.id {
            validate_id(id).map_err(|e| TemplateError::new("id", e.to_string()))?;
        }
        if self.priority > MAX_PRIORITY {
            return Err(TemplateError::new(
                "priority",
                format!("{} is not 0 to {MAX_PRIORITY}", self.priority),
            ));
        }
        if let Some(ms) = self.timeout_ms {
            timeout_in_range(i64::try_from(ms).unwrap_or(i64::MAX))
                .map_err(|message| TemplateError::new("timeout_ms", message))?;
        }
        if let Some(units) = self.cost {
            cost_in_range(i64::from(units))
                .map_err(|message| TemplateError::new("cost", message))?;
        }
        Ok(())
    }
}

/// Adds one header of a template to `task`: a contract header sets its
/// field, a header Kairos writes itself is refused, any other becomes an
/// AMQP header.
fn apply_header(
    mut task: NewTask,
    name: &str,
    value: &Value,
    origin: Origin,
) -> Result<NewTask, TemplateError> {
    // A header name is an AMQP short string: refused here, or the task
    // (every occurrence of a schedule) would fail to build.
    header_name(name).map_err(|e| TemplateError::new("headers", e.to_string()))?;
    let reserved = match origin {
        Origin::OneOff => KAIROS_HEADERS.as_slice(),
        Origin::Schedule => SCHEDULER_HEADERS.as_slice(),
    };
    if reserved.contains(&name) {
        return Err(TemplateError::header(name, "is set by Kairos"));
    }
    let int = || {
        header_int(value)
            .ok_or_else(|| TemplateError::header(name, format!("{value} is not an integer")))
    };
    match name {
        H_RUN_AT => task.run_at = Some(int()?),
        H_DELAY_MS => task.delay_ms = Some(int()?),
        H_MAX_RETRIES => {
            let n = max_retries_in_range(int()?).map_err(|m| TemplateError::header(name, m))?;
            task.max_retries = Some(n);
        }
        H_TIMEOUT_MS => {
            let n = timeout_in_range(int()?).map_err(|m| TemplateError::header(name, m))?;
            task.timeout_ms = Some(n);
        }
        H_COST => {
            let n = cost_in_range(int()?).map_err(|m| TemplateError::header(name, m))?;
            task.cost = Some(n);
        }
        H_ESTIMATE_MS => {
            let n = estimate_in_range(int()?).map_err(|m| TemplateError::header(name, m))?;
            task.estimate_ms = Some(n);
        }
        _ => task = task.header(name, header_value(name, value, origin)?),
    }
    Ok(task)
}

/// An integer header given as a JSON integer or a decimal string.
fn header_int(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
}

/// A JSON header value as AMQP: strings, booleans, integers (as 64-bit),
/// and for a one-off task other numbers as doubles.
fn header_value(name: &str, value: &Value, origin: Origin) -> Result<AMQPValue, TemplateError> {
    match value {
        Value::String(s) => Ok(AMQPValue::LongString(LongString::from(s.as_str()))),
        Value::Bool(b) => Ok(AMQPValue::Boolean(*b)),
        Value::Number(n) => match (n.as_i64(), origin) {
            (Some(i), _) => Ok(AMQPValue::LongLongInt(i)),
            (None, Origin::OneOff) => Ok(AMQPValue::Double(n.as_f64().unwrap_or_default())),
            (None, Origin::Schedule) if n.is_u64() => Err(TemplateError::header(
                name,
                format!("{n} does not fit a signed 64-bit integer"),
            )),
            (None, Origin::Schedule) => Err(TemplateError::header(
                name,
                format!("{n} is not a string, an integer or a boolean"),
            )),
        },
        other => Err(TemplateError::header(
            name,
            format!("{other} is not a string, number or boolean"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(v: Value) -> TaskTemplate {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_full_template_becomes_a_task() {
        let t = template(json!({"name": "email.send", "queue": "emails", "id": "w-1",
            "priority": 5, "body": {"to": "a"}, "delay_ms": 5000, "max_retries": 2,
            "timeout_ms": 100, "headers": {"tenant": "acme", "n": 3, "f": 1.5}}))
        .to_new_task(Origin::OneOff)
        .unwrap();
        assert_eq!(
            (t.name.as_str(), t.queue.as_str()),
            ("email.send", "emails")
        );
        assert_eq!(t.id.as_deref(), Some("w-1"));
        assert_eq!(t.priority, 5);
        assert_eq!(t.body, br#"{"to":"a"}"#);
        assert_eq!(t.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            (t.delay_ms, t.max_retries, t.timeout_ms),
            (Some(5000), Some(2), Some(100))
        );
        assert_eq!(t.headers.inner().get("n"), Some(&AMQPValue::LongLongInt(3)));
        assert_eq!(t.headers.inner().get("f"), Some(&AMQPValue::Double(1.5)));
    }

    #[test]
    fn contract_headers_set_their_fields_and_fields_win() {
        let t = template(json!({"name": "a", "max_retries": 1,
            "headers": {"x-max-retries": 3, "x-delay-ms": "250", "x-timeout-ms": 9}}))
        .to_new_task(Origin::OneOff)
        .unwrap();
        assert_eq!(
            (t.max_retries, t.delay_ms, t.timeout_ms),
            (Some(1), Some(250), Some(9))
        );
        assert!(t.headers.inner().is_empty(), "set through the fields, once");
    }

    #[test]
    fn the_origin_decides_the_rules_that_differ() {
        let check = |v: Value, origin| {
            template(v)
                .to_new_task(origin)
                .map(|_| ())
                .map_err(|e| e.path())
        };
        let due = json!({"name": "a", "headers": {"x-run-at": 5}});
        assert_eq!(check(due.clone(), Origin::OneOff), Ok(()));
        assert_eq!(check(due, Origin::Schedule), Err("headers.x-run-at".into()));
        let dead = json!({"name": "a", "headers": {"x-error": "e"}});
        assert_eq!(
            check(dead.clone(), Origin::OneOff),
            Err("headers.x-error".into())
        );
        assert_eq!(check(dead, Origin::Schedule), Ok(()));
        let float = json!({"name": "a", "headers": {"h": 1.5}});
        assert_eq!(check(float, Origin::Schedule), Err("headers.h".into()));
        let id = json!({"name": "a", "id": "x"});
        assert_eq!(check(id, Origin::Schedule), Err("id".into()));
    }

    #[test]
    fn cost_and_estimate_reach_the_message() {
        let t = template(json!({"name": "a", "cost": 3, "headers": {"x-estimate-ms": "40"}}))
            .to_new_task(Origin::Schedule)
            .unwrap();
        let (_, props) = t.to_message().unwrap();
        let task = crate::contract::Task::decode("default", &props, b"").unwrap();
        assert_eq!((task.cost, task.estimate_ms), (3, Some(40)));
    }

    #[test]
    fn ranges_are_the_contract_s() {
        let field = |v: Value| template(v).to_new_task(Origin::OneOff).unwrap_err().path();
        assert_eq!(
            field(json!({"name": "a", "max_retries": 1001})),
            "max_retries"
        );
        assert_eq!(
            field(json!({"name": "a", "headers": {"x-max-retries": 1_099_511_627_776_i64}})),
            "headers.x-max-retries"
        );
        assert_eq!(
            field(json!({"name": "a", "headers": {"x-max-retries": -1}})),
            "headers.x-max-retries"
        );
        assert_eq!(field(json!({"name": "a", "timeout_ms": 0})), "timeout_ms");
        assert_eq!(field(json!({"name": "a", "cost": 0})), "cost");
        assert_eq!(field(json!({"name": "a", "cost": 1_000_001})), "cost");
        assert_eq!(
            field(json!({"name": "a", "headers": {"x-cost": "0"}})),
            "headers.x-cost"
        );
        assert_eq!(
            field(json!({"name": "a", "headers": {"x-estimate-ms": -1}})),
            "headers.x-estimate-ms"
        );
        assert_eq!(field(json!({"name": "a", "priority": 10})), "priority");
        assert_eq!(field(json!({"name": " "})), "name");
        assert_eq!(field(json!({"name": "n".repeat(256)})), "name");
        assert_eq!(field(json!({"name": "a", "queue": ""})), "queue");
        assert_eq!(
            field(json!({"name": "a", "headers": {"h".repeat(256): 1}})),
            "headers"
        );
    }

    #[test]
    fn a_template_serializes_what_was_set_only() {
        let t = TaskTemplate::new("t");
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"name":"t","queue":"default","priority":0}"#
        );
        assert_eq!(template(json!({"name": "t", "body": null})), t);
        assert_eq!(t.one_off_field(), None);
        let later = TaskTemplate {
            run_at: Some(1),
            ..t
        };
        assert_eq!(later.one_off_field(), Some("run_at"));
    }
}
