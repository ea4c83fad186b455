//! The schedule file (`KAIROS_SCHEDULE_FILE`, TOML), loaded at start and
//! synced idempotently, like Celery's `beat_schedule`:
//!
//! ```toml
//! [[schedule]]
//! id = "report.hourly"
//! cron = "0 * * * *"
//! timezone = "Europe/Berlin"
//! task = { name = "report.build", priority = 5, body = { kind = "hourly" } }
//! ```
//!
//! Each entry is a schedule as the HTTP API takes it, plus its `id`. An
//! entry equal to the stored schedule changes nothing (its next tick stays);
//! a different one replaces it; a schedule paused through the API stays
//! paused. A bad entry is logged with its reason and skipped: the others
//! load, and the scheduler runs. Schedules missing from the file are left
//! alone (delete them through the API or `kairosctl`).

use crate::schedules::admin::{Admin, Put};
use crate::schedules::model::{ScheduleSpec, SpecError};
use serde::Deserialize;
use std::path::Path;
use thiserror::Error;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    schedule: Vec<toml::Value>,
}

/// Parsed entries, and why each of the others is not a schedule.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Valid entries: id and definition.
    pub(crate) schedules: Vec<(String, ScheduleSpec)>,
    /// One error per invalid entry, naming it.
    pub(crate) errors: Vec<EntryError>,
}

/// Why one `[[schedule]]` entry was skipped; `label` names it
/// (`schedule #2 ("report.hourly")`).
#[derive(Debug, Error)]
pub(crate) enum EntryError {
    /// Not the shape of a schedule (an unknown field, a wrong type).
    #[error("{label}: {source}")]
    Shape {
        /// The entry.
        label: String,
        /// What serde refused.
        #[source]
        source: serde_json::Error,
    },
    /// No `id`.
    #[error("{label}: id is required")]
    NoId {
        /// The entry.
        label: String,
    },
    /// A schedule that does not validate.
    #[error("{label}: {source}")]
    Invalid {
        /// The entry.
        label: String,
        /// The field at fault and why.
        #[source]
        source: SpecError,
    },
}

/// Parses the file's text. A file that is not TOML at all is one error.
pub(crate) fn parse(text: &str) -> Result<Loaded, toml::de::Error> {
    let file: File = toml::from_str(text)?;
    let mut out = Loaded::default();
    for (i, entry) in file.schedule.into_iter().enumerate() {
        let label = match entry.get("id").and_then(|v| v.as_str()) {
            Some(id) => format!("schedule #{} ({id:?})", i + 1),
            None => format!("schedule #{}", i + 1),
        };
        match entry_schedule(&entry, label) {
            Ok(schedule) => out.schedules.push(schedule),
            Err(e) => out.errors.push(e),
        }
    }
    Ok(out)
}

/// One entry as an id and a validated definition.
fn entry_schedule(
    entry: &toml::Value,
    label: String,
) -> Result<(String, ScheduleSpec), EntryError> {
    let spec = serde_json::to_value(entry)
        .and_then(serde_json::from_value::<ScheduleSpec>)
        .map_err(|source| EntryError::Shape {
            label: label.clone(),
            source,
        })?;
    let Some(id) = spec.id.clone() else {
        return Err(EntryError::NoId { label });
    };
    match spec.validate(&id) {
        Ok(s) => Ok((id, s.spec)),
        Err(source) => Err(EntryError::Invalid { label, source }),
    }
}

/// Loads and syncs the file; every problem is logged, none is fatal.
pub(crate) async fn sync(admin: &Admin, path: &Path) -> Loaded {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(file = %path.display(), cause = %e, "KAIROS_SCHEDULE_FILE: cannot read; no schedules loaded from it");
            return Loaded::default();
        }
    };
    let loaded = match parse(&text) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(file = %path.display(), cause = %e, "KAIROS_SCHEDULE_FILE: not a schedule file; no schedules loaded from it");
            return Loaded::default();
        }
    };
    for e in &loaded.errors {
        tracing::error!(file = %path.display(), "KAIROS_SCHEDULE_FILE: {e}; skipped");
    }
    for (id, spec) in &loaded.schedules {
        match admin.put(id, spec.clone(), true).await {
            Ok((Put::Unchanged, _)) => tracing::debug!(schedule = %id, "schedule file: unchanged"),
            Ok((put, _)) => tracing::info!(schedule = %id, ?put, "schedule file: synced"),
            Err(e) => tracing::error!(schedule = %id, cause = %e, "schedule file: cannot sync"),
        }
    }
    loaded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_entries_load_and_bad_ones_say_why() {
        let text = r#"
[[schedule]]
id = "a"
every_ms = 5000
task = { name = "job.a", priority = 1, body = { resources = 1 } }

[[schedule]]
id = "b"
cron = "99 * * * *"
task = { name = "job.b" }

[[schedule]]
id = "c"
cron = "* * * * *"
timezone = "Nowhere/Land"
task = { name = "job.c" }

[[schedule]]
every_ms = 1000
task = { name = "job.d" }

[[schedule]]
id = "e"
every_ms = 1000
task = { name = "job.e", colour = "red" }
"#;
        let l = parse(text).unwrap();
        assert_eq!(l.schedules.len(), 1);
        assert_eq!(l.schedules[0].0, "a");
        assert_eq!(l.errors.len(), 4, "{:?}", l.errors);
        let expected: [&[&str]; 4] = [
            &["\"b\"", "cron"],
            &["Nowhere/Land"],
            &["id is required"],
            &["colour"],
        ];
        for (error, needles) in l.errors.iter().zip(expected) {
            let text = error.to_string();
            assert!(needles.iter().all(|n| text.contains(n)), "{text}");
        }
        assert!(parse("not toml [").is_err());
    }

    #[test]
    fn a_header_name_too_long_for_amqp_fails_naming_schedule_and_field() {
        let text = format!(
            "[[schedule]]\nid = \"long\"\nevery_ms = 1000\ntask = {{ name = \"t\", headers = {{ {} = 1 }} }}\n",
            "h".repeat(300)
        );
        let l = parse(&text).unwrap();
        assert!(l.schedules.is_empty());
        assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
        let e = l.errors[0].to_string();
        assert!(e.contains("\"long\"") && e.contains("task.headers"), "{e}");
    }

    #[test]
    fn the_seed_example_file_loads() {
        let text = include_str!("../../../examples/seed/schedules.toml");
        let l = parse(text).unwrap();
        assert!(l.errors.is_empty(), "{:?}", l.errors);
        assert_eq!(l.schedules.len(), 3);
    }
}
