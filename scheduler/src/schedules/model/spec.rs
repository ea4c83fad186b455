//! The schedule a user declares, and its validation. A [`ScheduleSpec`] is
//! the stored form too (JSON in Redis): it is validated on every way in
//! (HTTP, file) and again, cheaply, when the ticker reads it.

use super::trigger::Trigger;
use chrono_tz::Tz;
use kairos_shared::template::{Origin, TaskTemplate, TemplateError};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

/// Longest schedule id: with `@` and a 13-digit tick the task id stays well
/// inside the contract's 128 characters.
pub const MAX_SCHEDULE_ID_LEN: usize = 80;
/// Shortest interval: below this a schedule is a busy loop, not a timer.
pub const MIN_EVERY_MS: u64 = 100;
/// Default for how long an occurrence may count as running for overlap
/// `skip` when its outcome never arrives (one hour).
pub const DEFAULT_MAX_RUN_MS: u64 = 3_600_000;

/// What is wrong with a schedule, and in which field.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The offending field, as the user wrote it (`cron`, `task.priority`...).
    pub field: String,
    /// Why, for a person.
    pub message: String,
}

impl From<TemplateError> for SpecError {
    /// The template's field under `task.` (`task.headers.x-max-retries`).
    fn from(e: TemplateError) -> Self {
        SpecError {
            field: format!("task.{}", e.path()),
            message: e.message,
        }
    }
}

fn err(field: &str, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.to_string(),
        message: message.into(),
    }
}

/// What to do with ticks that fell due while no scheduler ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// One catch-up run for all missed ticks (the latest of them).
    #[default]
    FireOnce,
    /// No catch-up: the schedule resumes at its next tick.
    Skip,
    /// One run per missed tick, the latest `MAX_CATCH_UP` (100).
    FireAll,
}

/// Whether a tick fires while the previous occurrence still runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Every tick fires.
    #[default]
    Allow,
    /// A tick is skipped while the previous occurrence has no outcome yet
    /// (for at most `max_run_ms`).
    Skip,
}

/// The task each occurrence becomes: a template without the fields a
/// schedule sets itself (id and due time). They are refused as unknown
/// fields, so a stored schedule never holds them.
fn schedule_task<'de, D: Deserializer<'de>>(d: D) -> Result<TaskTemplate, D::Error> {
    let task = TaskTemplate::deserialize(d)?;
    match task.one_off_field() {
        Some(field) => Err(D::Error::unknown_field(field, SCHEDULE_TASK_FIELDS)),
        None => Ok(task),
    }
}

/// The fields a schedule's task template takes.
const SCHEDULE_TASK_FIELDS: &[&str] = &[
    "name",
    "queue",
    "priority",
    "body",
    "headers",
    "max_retries",
    "timeout_ms",
    "cost",
    "estimate_ms",
];

fn default_timezone() -> String {
    "UTC".into()
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_utc(tz: &String) -> bool {
    tz == "UTC"
}

/// A schedule as declared. Exactly one of `cron`, `every_ms` and `at`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Set from the URL for HTTP; required in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Cron expression: 5 fields, or 6 with seconds first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Fixed interval in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// First tick of an `every_ms` schedule (Unix ms); ticks fall at
    /// `start_at + k * every_ms`. Default 0, so intervals align to the epoch
    /// (every 5 s fires at :00, :05, ...), the same on every scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<i64>,
    /// One-shot time, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<i64>,
    /// IANA zone for `cron`.
    #[serde(default = "default_timezone", skip_serializing_if = "is_utc")]
    pub timezone: String,
    /// The task each occurrence becomes.
    #[serde(deserialize_with = "schedule_task")]
    pub task: TaskTemplate,
    /// What to do with ticks missed while no scheduler ran.
    #[serde(default)]
    pub misfire: Misfire,
    /// Whether a tick fires while the previous occurrence runs.
    #[serde(default)]
    pub overlap: Overlap,
    /// False while paused.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// Overlap `skip`: after this long an occurrence whose outcome never
    /// arrived stops blocking the schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_run_ms: Option<u64>,
}

/// A validated schedule, ready for tick arithmetic.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// The schedule id.
    pub id: String,
    /// When it fires.
    pub trigger: Trigger,
    /// The definition, with `id` set.
    pub spec: ScheduleSpec,
}

impl Schedule {
    /// How long an occurrence without an outcome blocks overlap `skip`.
    pub fn max_run_ms(&self) -> u64 {
        self.spec.max_run_ms.unwrap_or(DEFAULT_MAX_RUN_MS)
    }
}

/// Schedule ids become part of task ids and Redis hash fields: keep them to
/// a safe alphabet (no `@`, which separates id and tick in task ids).
pub fn validate_schedule_id(id: &str) -> Result<(), SpecError> {
    if id.is_empty() || id.len() > MAX_SCHEDULE_ID_LEN {
        return Err(err(
            "id",
            format!("must be 1 to {MAX_SCHEDULE_ID_LEN} characters"),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(err(
            "id",
            format!("character {c:?} is not allowed (use A-Z a-z 0-9 . _ : -)"),
        ));
    }
    Ok(())
}

impl ScheduleSpec {
    /// Parses a JSON body, naming the first problem.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        serde_json::from_slice(bytes).map_err(|e| err("body", e.to_string()))
    }

    /// Validates under `id` (the URL's, or the file entry's).
    pub fn validate(mut self, id: &str) -> Result<Schedule, SpecError> {
        validate_schedule_id(id)?;
        if let Some(own) = &self.id {
            if own != id {
                return Err(err(
                    "id",
                    format!("{own:?} in the body differs from {id:?} in the URL"),
                ));
            }
        }
        self.id = Some(id.to_string());
        let tz: Tz = self.timezone.parse().map_err(|_| {
            err(
                "timezone",
                format!(
                    "unknown time zone {:?} (use an IANA name such as Europe/Berlin)",
                    self.timezone
                ),
            )
        })?;
        let trigger = match (&self.cron, self.every_ms, self.at) {
            (Some(expr), None, None) => Trigger::cron(expr, tz).map_err(|m| err("cron", m))?,
            (None, Some(every), None) => {
                if every < MIN_EVERY_MS {
                    return Err(err(
                        "every_ms",
                        format!("{every} is below the minimum of {MIN_EVERY_MS}"),
                    ));
                }
                // Tick arithmetic is in i64 Unix ms: a larger interval
                // would wrap to a negative one.
                let every_ms = i64::try_from(every).map_err(|_| {
                    err(
                        "every_ms",
                        format!("{every} exceeds the largest interval, {} ms", i64::MAX),
                    )
                })?;
                Trigger::Every {
                    every_ms,
                    start_at: self.start_at.unwrap_or(0),
                }
            }
            (None, None, Some(at)) => Trigger::At(at),
            (None, None, None) => {
                return Err(err("trigger", "one of cron, every_ms or at is required"))
            }
            _ => return Err(err("trigger", "give only one of cron, every_ms and at")),
        };
        if self.start_at.is_some() && self.every_ms.is_none() {
            return Err(err("start_at", "only applies to every_ms"));
        }
        if self.at.is_some_and(|a| a < 0) || self.start_at.is_some_and(|a| a < 0) {
            return Err(err("at", "times are Unix milliseconds, not negative"));
        }
        if self.max_run_ms == Some(0) {
            return Err(err("max_run_ms", "must be positive"));
        }
        self.task.to_new_task(Origin::Schedule)?;
        Ok(Schedule {
            id: id.to_string(),
            trigger,
            spec: self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

    fn spec(v: Value) -> Result<Schedule, SpecError> {
        ScheduleSpec::from_json(v.to_string().as_bytes())?.validate("s1")
    }

    #[test]
    fn the_issue_example_is_accepted() {
        let s = spec(json!({"cron": "*/2 * * * * *", "timezone": "Europe/Berlin",
            "task": {"name": "report.build", "queue": "default", "priority": 5,
                     "body": {"any": "json"}, "headers": {"x-max-retries": 3}},
            "misfire": "fire_once", "overlap": "allow"}))
        .unwrap();
        assert_eq!(s.id, "s1");
        assert_eq!(s.spec.misfire, Misfire::FireOnce);
    }

    #[test]
    fn bad_input_names_the_field() {
        let field = |v: Value| spec(v).unwrap_err().field;
        let task = json!({"name": "t"});
        assert_eq!(field(json!({"cron": "61 * * * *", "task": task})), "cron");
        assert_eq!(
            field(json!({"cron": "* * * * *", "timezone": "Mars/Base", "task": task})),
            "timezone"
        );
        assert_eq!(field(json!({"every_ms": 5, "task": task})), "every_ms");
        assert_eq!(
            field(json!({"every_ms": u64::MAX, "task": task})),
            "every_ms"
        );
        assert_eq!(
            field(json!({"every_ms": i64::MAX as u64 + 1, "task": task})),
            "every_ms"
        );
        assert_eq!(field(json!({"task": task})), "trigger");
        assert_eq!(
            field(json!({"every_ms": 1000, "at": 5, "task": task})),
            "trigger"
        );
        assert_eq!(
            field(json!({"every_ms": 1000, "task": {"name": ""}})),
            "task.name"
        );
        assert_eq!(
            field(json!({"every_ms": 1000, "task": {"name": "t", "priority": 12}})),
            "task.priority"
        );
        assert_eq!(
            field(
                json!({"every_ms": 1000, "task": {"name": "t", "headers": {"x-max-retries": "x"}}})
            ),
            "task.headers.x-max-retries"
        );
        assert_eq!(
            field(json!({"every_ms": 1000, "task": {"name": "t", "headers": {"h": [1]}}})),
            "task.headers.h"
        );
        assert_eq!(
            field(json!({"every_ms": 1000, "task": task, "misfire": "sometimes"})),
            "body"
        );
        assert_eq!(
            field(json!({"every_ms": 1000, "task": task, "colour": 1})),
            "body"
        );
        let e =
            spec(json!({"cron": "* * * * *", "timezone": "Mars/Base", "task": task})).unwrap_err();
        assert!(e.to_string().contains("Mars/Base"), "{e}");
    }

    #[test]
    fn names_too_long_for_amqp_are_refused_naming_the_field() {
        let field = |v: Value| spec(v).unwrap_err().field;
        let long = "h".repeat(256);
        let mut headers = Map::new();
        headers.insert(long.clone(), json!("v"));
        assert_eq!(
            field(json!({"every_ms": 1000, "task": {"name": "t", "headers": headers}})),
            "task.headers"
        );
        assert_eq!(
            field(json!({"every_ms": 1000, "task": {"name": "t", "queue": "q".repeat(201)}})),
            "task.queue"
        );
        assert_eq!(
            field(json!({"every_ms": 1000, "task": {"name": long}})),
            "task.name"
        );
        let mut ok = Map::new();
        ok.insert("h".repeat(255), json!(1));
        assert!(spec(json!({"every_ms": 1000, "task": {"name": "t", "headers": ok}})).is_ok());
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_schedule_id("report.daily:eu-1_x").is_ok());
        assert!(validate_schedule_id("").is_err());
        assert!(validate_schedule_id("a@b").is_err());
        assert!(validate_schedule_id(&"x".repeat(81)).is_err());
        let body =
            ScheduleSpec::from_json(br#"{"id":"other","every_ms":1000,"task":{"name":"t"}}"#)
                .unwrap();
        assert_eq!(body.validate("s1").unwrap_err().field, "id");
    }

    #[test]
    fn a_stored_definition_with_every_task_field_loads_unchanged() {
        let stored = r#"{"id":"s1","every_ms":1000,"start_at":5,"timezone":"Europe/Berlin","task":{"name":"t","queue":"q","priority":3,"body":{"a":[1,"x"]},"headers":{"b":true,"h":"v","n":-2,"x-max-retries":4},"max_retries":2,"timeout_ms":900},"misfire":"fire_all","overlap":"skip","enabled":false,"max_run_ms":60000}"#;
        let spec: ScheduleSpec = serde_json::from_str(stored).unwrap();
        let schedule = spec.validate("s1").unwrap();
        assert_eq!(serde_json::to_string(&schedule.spec).unwrap(), stored);
    }

    #[test]
    fn one_off_fields_are_unknown_in_a_schedule_task() {
        for field in ["id", "body_text", "run_at", "delay_ms"] {
            let value = if field == "id" || field == "body_text" {
                json!("x")
            } else {
                json!(5)
            };
            let mut task = Map::new();
            task.insert("name".into(), json!("t"));
            task.insert(field.into(), value);
            let err = spec(json!({"every_ms": 1000, "task": task})).unwrap_err();
            assert_eq!(err.field, "body", "{field}");
            assert!(err.message.contains(field), "{err}");
        }
    }

    #[test]
    fn stored_form_round_trips_and_omits_defaults() {
        let s = spec(json!({"every_ms": 1000, "task": {"name": "t"}})).unwrap();
        let text = serde_json::to_string(&s.spec).unwrap();
        assert_eq!(
            text,
            r#"{"id":"s1","every_ms":1000,"task":{"name":"t","queue":"default","priority":0},"misfire":"fire_once","overlap":"allow"}"#
        );
        let back: ScheduleSpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s.spec);
    }
}
