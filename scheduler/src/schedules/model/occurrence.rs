//! The task an occurrence becomes: the template, with a derived id, the
//! tick as `x-run-at` and the schedule id as `x-schedule-id`.

use super::Schedule;
use kairos_shared::contract::{text, ProtocolError, Task, H_SCHEDULE_ID};
use kairos_shared::record;
use kairos_shared::template::Origin;

/// The task id of one tick: the same on every scheduler, so a repeated or
/// concurrent fire of one tick is one task.
pub(crate) fn occurrence_id(schedule_id: &str, tick: i64) -> String {
    format!("{schedule_id}@{tick}")
}

/// The schedule id and tick of a task id, if a schedule fired it.
pub(crate) fn parse_occurrence_id(task_id: &str) -> Option<(&str, i64)> {
    let (id, tick) = task_id.rsplit_once('@')?;
    Some((id, tick.parse().ok()?))
}

/// The task `schedule` fires at `tick`: its template, checked and
/// converted as every template is, under the occurrence's id, due at the
/// tick and marked with the schedule id.
pub(crate) fn task(schedule: &Schedule, tick: i64) -> Result<Task, ProtocolError> {
    let new = schedule
        .spec
        .task
        .to_new_task(Origin::Schedule)?
        .id(occurrence_id(&schedule.id, tick))
        .run_at(tick)
        .header(H_SCHEDULE_ID, text(&schedule.id));
    let (_, properties) = new.to_message()?;
    Task::decode(&new.queue, &properties, &new.body)
}

/// What the delay queue stores for an occurrence of `schedule` at `tick`.
/// A record keeps neither the task id (it is the member) nor `x-run-at`
/// (the due time is), so every tick of one definition stores the same
/// bytes and the ticker builds them once per definition.
pub(crate) fn record(schedule: &Schedule, tick: i64) -> Result<Vec<u8>, ProtocolError> {
    task(schedule, tick).and_then(|t| record::encode(&t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedules::model::ScheduleSpec;
    use kairos_shared::contract::value_to_string;
    use serde_json::Value;

    /// Schedule `rep`: every second, a template with every kind of field.
    fn report_schedule() -> Schedule {
        ScheduleSpec::from_json(
            br#"{"every_ms":1000,"task":{"name":"report.build","queue":"q","priority":5,"body":{"a":1},"headers":{"x-max-retries":3,"h":"v"}}}"#,
        )
        .unwrap()
        .validate("rep")
        .unwrap()
    }

    #[test]
    fn occurrence_carries_template_tick_and_schedule() {
        let s = report_schedule();
        let t = task(&s, 1_764_000_000_000).unwrap();
        assert_eq!(t.id, "rep@1764000000000");
        assert_eq!(t.name, "report.build");
        assert_eq!(t.queue, "q");
        assert_eq!(t.priority, 5);
        assert_eq!(t.run_at, Some(1_764_000_000_000));
        assert_eq!(t.max_retries, Some(3));
        assert_eq!(t.body, br#"{"a":1}"#);
        assert_eq!(value_to_string(t.header(H_SCHEDULE_ID).unwrap()), "rep");
        assert_eq!(parse_occurrence_id(&t.id), Some(("rep", 1_764_000_000_000)));
        assert_eq!(parse_occurrence_id("plain-task"), None);
    }

    #[test]
    fn a_stored_definition_with_names_too_long_is_an_error_not_a_panic() {
        // Built without validation, as a definition written by hand or by
        // an older version arrives.
        let mut s = report_schedule();
        s.spec
            .task
            .headers
            .insert("h".repeat(300), Value::Bool(true));
        let err = task(&s, 1_000).unwrap_err();
        assert!(err.to_string().contains("header name"), "{err}");
        let mut s = report_schedule();
        s.spec.task.name = "n".repeat(256);
        assert!(task(&s, 1_000).is_err());
        let mut s = report_schedule();
        s.spec.task.queue = "q".repeat(250);
        assert!(record(&s, 1_000).is_err());
    }

    #[test]
    fn every_tick_of_a_definition_stores_the_same_record() {
        let s = report_schedule();
        let (a, b) = (1_764_000_000_000, 1_764_000_001_000);
        let shared = record(&s, a).unwrap();
        assert_eq!(shared, record(&s, b).unwrap());
        // And the shared record, read back under a tick's id, is that
        // tick's task (the pump sets `x-run-at` from the due time).
        let back = record::decode(&occurrence_id("rep", b), &shared).unwrap();
        let want = task(&s, b).unwrap();
        assert_eq!(back.id, want.id);
        assert_eq!(back.name, want.name);
        assert_eq!(back.queue, want.queue);
        assert_eq!(back.priority, want.priority);
        assert_eq!(back.max_retries, want.max_retries);
        assert_eq!(back.body, want.body);
        assert_eq!(value_to_string(back.header(H_SCHEDULE_ID).unwrap()), "rep");
    }
}
