//! `task show|cancel|abort|list`, `queues`, `queue pause|resume`: one
//! request each, its answer printed for people (the default) or as the
//! API's JSON (`--json`), and an exit code from [`crate::exit`].
//!
//! The renderers take the API's JSON (docs/HTTP.md) and return text, so
//! they are tested without a server; a field that is absent or `null` is
//! left out (or shown as `-` in a table).

use crate::table::Table;
use crate::{Api, CallError, Reply, TaskQuery};
use serde_json::Value;

/// How the answer is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Tables and sentences.
    Human,
    /// The API's JSON, as answered (errors too, on stdout, so a script can
    /// read the `state` of a 409).
    Json,
}

impl Output {
    /// `--json` given or not.
    pub fn from_flag(json: bool) -> Self {
        if json {
            Output::Json
        } else {
            Output::Human
        }
    }
}

/// `kairosctl task show ID`.
pub fn task_show(api: &Api, id: &str, out: Output) -> u8 {
    answer(
        api.task_get(id),
        out,
        |reply| render_task(&reply.body, now_ms()),
        |reply| refusal("show", id, reply),
    )
}

/// `kairosctl task cancel ID`.
pub fn task_cancel(api: &Api, id: &str, out: Output) -> u8 {
    answer(
        api.task_cancel(id),
        out,
        |_| format!("cancelled task {id}: it will not run\n"),
        |reply| refusal("cancel", id, reply),
    )
}

/// `kairosctl task abort ID`.
pub fn task_abort(api: &Api, id: &str, out: Output) -> u8 {
    answer(
        api.task_abort(id),
        out,
        |reply| {
            if reply.body["state"] == "cancelled" {
                format!("cancelled task {id}: it had not started and will not run\n")
            } else {
                format!(
                    "abort requested for task {id}: its worker cancels it (at the handler's next await at the latest); \
                     `kairosctl task show {id}` shows when it is cancelled\n"
                )
            }
        },
        |reply| refusal("abort", id, reply),
    )
}

/// `kairosctl task list`: a table, newest first, and on stderr how to get
/// the next page when there is one.
pub fn task_list(api: &Api, query: &TaskQuery, out: Output) -> u8 {
    answer(
        api.task_list(query),
        out,
        |reply| {
            if let Some(cursor) = reply.body["next_cursor"].as_str() {
                eprintln!("kairosctl: more tasks: add --cursor {cursor}");
            }
            render_task_list(&reply.body, now_ms())
        },
        |reply| {
            format!(
                "listing tasks: HTTP {}: {}",
                reply.status,
                reply.error_text()
            )
        },
    )
}

/// `kairosctl queues`.
pub fn queues(api: &Api, out: Output) -> u8 {
    answer(
        api.queues(),
        out,
        |reply| render_queues(&reply.body),
        |reply| {
            format!(
                "listing queues: HTTP {}: {}",
                reply.status,
                reply.error_text()
            )
        },
    )
}

/// `kairosctl queue pause NAME` (`pause` true) or `queue resume NAME`.
pub fn queue_pause(api: &Api, name: &str, pause: bool, out: Output) -> u8 {
    let (call, done, verb) = if pause {
        (
            api.queue_pause(name),
            "paused: workers stop taking from it",
            "pause",
        )
    } else {
        (
            api.queue_resume(name),
            "resumed: workers take from it again",
            "resume",
        )
    };
    answer(
        call,
        out,
        |_| format!("queue {name} {done}\n"),
        |reply| {
            format!(
                "cannot {verb} queue {name}: HTTP {}: {}",
                reply.status,
                reply.error_text()
            )
        },
    )
}

/// Prints an answer (or why none came) and gives the exit code: a 2xx as
/// `human` says (or its JSON), another status as `refused` says on stderr
/// (with the JSON on stdout when asked for).
fn answer(
    call: Result<Reply, CallError>,
    out: Output,
    human: impl FnOnce(&Reply) -> String,
    refused: impl FnOnce(&Reply) -> String,
) -> u8 {
    let reply = match call {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kairosctl: {e}");
            return e.exit_code();
        }
    };
    if out == Output::Json && !reply.body.is_null() {
        println!(
            "{}",
            serde_json::to_string_pretty(&reply.body).unwrap_or_default()
        );
    }
    if reply.ok() {
        if out == Output::Human {
            print!("{}", human(&reply));
        }
    } else {
        eprintln!("kairosctl: {}", refused(&reply));
    }
    reply.exit_code()
}

/// Why a task route said no, in words.
fn refusal(verb: &str, id: &str, reply: &Reply) -> String {
    let state = reply.body["state"].as_str();
    match (reply.status, state) {
        // The route's own 404 is JSON; an empty one is a server without it.
        (404, _) if reply.body.is_null() => format!(
            "cannot {verb} task {id}: HTTP 404 without a body: this scheduler does not serve the route (an older version?)"
        ),
        (404, _) => format!("task {id} not found (unknown, or its status expired)"),
        (409, Some("cancelled")) => format!("cannot {verb} task {id}: it is already cancelled"),
        (409, Some(state)) => {
            let hint = match (verb, state) {
                ("cancel", "ready" | "running") => {
                    ": only a task waiting in the delay queue (scheduled or retrying) can be cancelled; \
                     abort a running one with `kairosctl task abort`"
                }
                ("abort", "ready") => {
                    ": it is published and not started yet; try again once it runs"
                }
                (_, "succeeded" | "dead") => ": it has finished",
                _ => "",
            };
            format!("cannot {verb} task {id}: it is {state}{hint}")
        }
        (status, _) => format!(
            "cannot {verb} task {id}: HTTP {status}: {}",
            reply.error_text()
        ),
    }
}

/// Now, Unix ms.
fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A time field: Unix ms as a number (or a string of digits).
fn ms(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A field as text: strings as they are, numbers and the rest as JSON;
/// `None` when absent, null or empty.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Unix ms as UTC, to the millisecond.
pub fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// A duration for people: `340ms`, `5.2s`, `3m12s`, `2h05m`, `3d04h`.
pub fn span(ms: i64) -> String {
    let ms = ms.unsigned_abs();
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}.{}s", s, (ms % 1000) / 100),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// `t` against `now`: `in 3.0s` or `2m10s ago`.
fn relative(t: i64, now: i64) -> String {
    if t > now {
        format!("in {}", span(t - now))
    } else {
        format!("{} ago", span(now - t))
    }
}

/// `task show`: the task's fields, its timeline in UTC (with how long it
/// waited and ran), progress, error and result.
pub fn render_task(task: &Value, now: i64) -> String {
    let mut rows: Vec<(&str, String)> = Vec::new();
    let mut field = |key: &'static str, value: Option<String>| {
        if let Some(v) = value {
            rows.push((key, v));
        }
    };
    field("id", text(&task["id"]));
    let state = text(&task["state"]).unwrap_or_else(|| "-".into());
    field("state", Some(state));
    field("name", text(&task["name"]));
    field("queue", text(&task["queue"]));
    field("priority", text(&task["priority"]));
    field("attempt", text(&task["attempt"]));
    field("schedule", text(&task["schedule_id"]));
    field("worker", text(&task["worker"]));
    let progress = match (text(&task["progress"]), text(&task["progress_message"])) {
        (Some(p), Some(m)) => Some(format!("{p}%  {m}")),
        (Some(p), None) => Some(format!("{p}%")),
        (None, Some(m)) => Some(m),
        (None, None) => None,
    };
    field("progress", progress);

    let enqueued = ms(&task["enqueued_at"]);
    let due = ms(&task["due_at"]);
    let started = ms(&task["started_at"]);
    let finished = ms(&task["finished_at"]);
    let mut timeline: Vec<(&str, i64, String)> = Vec::new();
    if let Some(t) = enqueued {
        timeline.push(("enqueued", t, relative(t, now)));
    }
    if let Some(t) = due {
        let note = match enqueued {
            Some(e) if t > e => format!("{}, {} after enqueued", relative(t, now), span(t - e)),
            _ => relative(t, now),
        };
        timeline.push(("due", t, note));
    }
    if let Some(t) = started {
        let note = match due.or(enqueued) {
            Some(d) if t >= d => format!("{}, {} after due", relative(t, now), span(t - d)),
            _ => relative(t, now),
        };
        timeline.push(("started", t, note));
    }
    if let Some(t) = finished {
        let note = match started {
            Some(s) if t >= s => format!("{}, ran {}", relative(t, now), span(t - s)),
            _ => relative(t, now),
        };
        timeline.push(("finished", t, note));
    }
    let key_width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0).max(8);
    let mut out = String::new();
    for (k, v) in &rows {
        out.push_str(&format!("{k:<key_width$}  {v}\n"));
    }
    if !timeline.is_empty() {
        out.push_str("timeline (UTC)\n");
        for (k, t, note) in timeline {
            out.push_str(&format!("  {k:<8}  {}  ({note})\n", utc(t)));
        }
    }
    if let Some(e) = text(&task["error"]) {
        out.push_str(&format!("{:<key_width$}  {}\n", "error", e.trim_end()));
    }
    match &task["result"] {
        Value::Null => {}
        Value::Object(o) if o.len() == 1 && o.contains_key("base64") => {
            let b64 = o["base64"].as_str().unwrap_or_default();
            let bytes = b64.trim_end_matches('=').len() * 3 / 4;
            out.push_str(&format!(
                "{:<key_width$}  {bytes} bytes, not JSON (base64 in --json)\n",
                "result"
            ));
        }
        result => {
            let compact = result.to_string();
            if compact.len() <= 100 {
                out.push_str(&format!("{:<key_width$}  {compact}\n", "result"));
            } else {
                out.push_str("result\n");
                let pretty = serde_json::to_string_pretty(result).unwrap_or(compact);
                for line in pretty.lines() {
                    out.push_str(&format!("  {line}\n"));
                }
            }
        }
    }
    out
}

/// What a listed task is doing, and since when: `due in 3.0s`, `running
/// 12.0s`, `finished 2m00s ago`.
fn when(task: &Value, now: i64) -> String {
    let state = task["state"].as_str().unwrap_or_default();
    let at = |k: &str| ms(&task[k]);
    let described = match state {
        "scheduled" | "retrying" => at("due_at").map(|t| {
            if t > now {
                format!("due in {}", span(t - now))
            } else {
                format!("due {} ago", span(now - t))
            }
        }),
        "ready" => at("due_at")
            .or(at("enqueued_at"))
            .map(|t| format!("ready {}", relative(t, now))),
        "running" => at("started_at").map(|t| format!("running {}", span(now - t))),
        _ => at("finished_at").map(|t| format!("finished {}", relative(t, now))),
    };
    described
        .or_else(|| at("updated_at").map(|t| format!("updated {}", relative(t, now))))
        .unwrap_or_else(|| "-".into())
}

/// `task list`: one row per task (ids in full, to copy); the error cut to
/// one short line.
pub fn render_task_list(body: &Value, now: i64) -> String {
    let mut t = Table::new(&[
        "ID", "STATE", "NAME", "QUEUE", "ATTEMPT", "PROGRESS", "WHEN", "ERROR",
    ])
    .cap(2, 30)
    .cap(3, 20)
    .cap(7, 60);
    let empty = Vec::new();
    let tasks = body["tasks"].as_array().unwrap_or(&empty);
    for task in tasks {
        let cell = |k: &str| text(&task[k]).unwrap_or_else(|| "-".into());
        let progress = text(&task["progress"])
            .map(|p| format!("{p}%"))
            .unwrap_or_else(|| "-".into());
        t.row(vec![
            cell("id"),
            cell("state"),
            cell("name"),
            cell("queue"),
            cell("attempt"),
            progress,
            when(task, now),
            text(&task["error"]).unwrap_or_default(),
        ]);
    }
    if t.is_empty() {
        return "no tasks\n".into();
    }
    t.render()
}

/// A rate per minute: whole when it is, else one decimal.
fn rate(v: &Value) -> String {
    match v.as_f64() {
        Some(r) if r.fract() == 0.0 => format!("{r:.0}"),
        Some(r) => format!("{r:.1}"),
        None => "-".into(),
    }
}

/// `queues`: one row per logical queue, then the delay queue's totals.
pub fn render_queues(body: &Value) -> String {
    let mut t = Table::new(&[
        "NAME",
        "READY",
        "CONSUMERS",
        "DELAYED",
        "DUE",
        "DEAD",
        "PAUSED",
        "IN/MIN",
        "OK/MIN",
        "FAILED/MIN",
        "DEAD/MIN",
    ])
    .cap(0, 40);
    let empty = Vec::new();
    for q in body["queues"].as_array().unwrap_or(&empty) {
        let n = |k: &str| text(&q[k]).unwrap_or_else(|| "-".into());
        let paused = if q["paused"].as_bool().unwrap_or(false) {
            "paused"
        } else {
            "-"
        };
        let rates = &q["rates"];
        t.row(vec![
            n("name"),
            n("ready"),
            n("consumers"),
            n("delayed"),
            n("due"),
            n("dead"),
            paused.into(),
            rate(&rates["enqueued"]),
            rate(&rates["succeeded"]),
            rate(&rates["failed"]),
            rate(&rates["dead"]),
        ]);
    }
    let mut out = if t.is_empty() {
        "no queues seen yet\n".to_string()
    } else {
        t.render()
    };
    let dq = &body["delay_queue"];
    if dq.is_object() {
        out.push_str(&format!(
            "delay queue: {} waiting, {} due\n",
            text(&dq["waiting"]).unwrap_or_else(|| "-".into()),
            text(&dq["due"]).unwrap_or_else(|| "-".into())
        ));
    }
    let dead = &body["dead_letters"];
    if let Some(total) = dead["total"].as_u64() {
        match dead["counted"].as_u64() {
            Some(counted) if counted < total => out.push_str(&format!(
                "dead letters: {total} (the per-queue DEAD counts the first {counted})\n"
            )),
            _ => out.push_str(&format!("dead letters: {total}\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_764_000_100_000;

    #[test]
    fn a_finished_task_shows_its_timeline_and_result() {
        let task = json!({
            "id": "t-1", "state": "succeeded", "name": "email.send", "queue": "default",
            "priority": 3, "attempt": 2, "due_at": 1_764_000_005_000i64,
            "enqueued_at": 1_764_000_000_000i64, "started_at": 1_764_000_005_012i64,
            "finished_at": 1_764_000_005_352i64, "error": null, "worker": "host:42",
            "schedule_id": null, "progress": 100, "progress_message": "done",
            "result": {"sent": true}
        });
        let text = render_task(&task, NOW);
        assert!(
            text.starts_with("id        t-1\nstate     succeeded\n"),
            "{text}"
        );
        assert!(text.contains("worker    host:42\n"), "{text}");
        assert!(text.contains("progress  100%  done\n"), "{text}");
        assert!(!text.contains("schedule"), "{text}");
        assert!(
            text.contains(
                "  due       2025-11-24T16:00:05.000Z  (1m35s ago, 5.0s after enqueued)\n"
            ),
            "{text}"
        );
        assert!(text.contains("(1m34s ago, ran 340ms)"), "{text}");
        assert!(text.contains("result    {\"sent\":true}\n"), "{text}");
    }

    #[test]
    fn a_waiting_task_says_when_it_is_due_and_bytes_results_are_sized() {
        let task = json!({"id": "w", "state": "retrying", "due_at": NOW + 3_000,
            "error": "boom\n", "result": {"base64": "AAAA"}});
        let text = render_task(&task, NOW);
        assert!(text.contains("(in 3.0s)"), "{text}");
        assert!(text.contains("error     boom\n"), "{text}");
        assert!(text.contains("result    3 bytes, not JSON"), "{text}");
    }

    #[test]
    fn the_list_is_a_table_with_what_each_task_does() {
        let body = json!({"tasks": [
            {"id": "a", "state": "running", "name": "n", "queue": "q", "attempt": 1,
             "started_at": NOW - 12_000, "progress": 40},
            {"id": "b", "state": "dead", "name": "n", "queue": "q", "attempt": 3,
             "finished_at": NOW - 120_000, "error": "no handler for n"},
        ], "next_cursor": null});
        let text = render_task_list(&body, NOW);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID  STATE"), "{text}");
        assert!(lines[1].starts_with("a   running"), "{text}");
        assert!(
            lines[1].contains("40%") && lines[1].contains("running 12.0s"),
            "{text}"
        );
        assert!(lines[2].contains("finished 2m00s ago") && lines[2].ends_with("no handler for n"));
        assert_eq!(render_task_list(&json!({"tasks": []}), NOW), "no tasks\n");
    }

    #[test]
    fn queues_show_depths_rates_and_the_delay_queue() {
        let body = json!({"queues": [
            {"name": "default", "ready": 12, "consumers": 2, "delayed": 5, "due": 1, "dead": 0,
             "paused": true, "rates": {"enqueued": 60, "succeeded": 58.5, "failed": 0, "dead": 0}}
        ], "delay_queue": {"waiting": 5, "due": 1}, "dead_letters": {"total": 7, "counted": 7}});
        let text = render_queues(&body);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME     READY  CONSUMERS"), "{text}");
        assert!(lines[1].starts_with("default  12     2"), "{text}");
        assert!(lines[1].contains("paused  60      58.5"), "{text}");
        assert_eq!(lines[2], "delay queue: 5 waiting, 1 due");
        assert_eq!(lines[3], "dead letters: 7");
    }

    #[test]
    fn refusals_name_the_state() {
        let r = Reply {
            status: 409,
            body: json!({"error": "x", "id": "t", "state": "running"}),
        };
        let msg = refusal("cancel", "t", &r);
        assert!(
            msg.contains("it is running") && msg.contains("task abort"),
            "{msg}"
        );
        let r = Reply {
            status: 404,
            body: json!({"error": "unknown"}),
        };
        assert!(refusal("show", "t", &r).contains("not found"));
        let r = Reply {
            status: 404,
            body: Value::Null,
        };
        assert!(refusal("show", "t", &r).contains("does not serve the route"));
        let r = Reply {
            status: 409,
            body: json!({"error": "x", "id": "t", "state": "cancelled"}),
        };
        assert_eq!(
            refusal("abort", "t", &r),
            "cannot abort task t: it is already cancelled"
        );
    }

    #[test]
    fn spans_read_well() {
        assert_eq!(span(340), "340ms");
        assert_eq!(span(5_250), "5.2s");
        assert_eq!(span(192_000), "3m12s");
        assert_eq!(span(7_500_000), "2h05m");
        assert_eq!(span(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
    }
}
