//! `kairosctl dead list|show|replay|purge`: the dead letters through
//! `/v1/dead` (docs/HTTP.md, "Dead letters"). Human output by default,
//! `--json` for scripts. Exit status: 0 done, 1 when the API refused, a
//! letter was not found or some were refused, 2 for a usage error or an
//! unreachable scheduler.

use crate::{encode, to_json, Api, Reply};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::{json, Value};
use std::process::ExitCode;

/// How many dead letters `dead list` shows unless told.
pub const DEFAULT_LIST_LIMIT: u64 = 100;
/// Letters asked for per request while `dead list` follows the pages.
const PAGE: usize = 1_000;

/// Which dead letters: every option given must match.
#[derive(Args, Debug, Default, Clone, Serialize)]
pub struct DeadFilter {
    /// Only letters meant for this queue (exact).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Only tasks of this name (exact).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Only letters whose error contains this text (any case).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DeadFilter {
    /// The query parameters (`queue=..&name=..`), percent-encoded.
    fn pairs(&self) -> Vec<String> {
        [
            ("queue", &self.queue),
            ("name", &self.name),
            ("error", &self.error),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect()
    }

    fn is_empty(&self) -> bool {
        self.queue.is_none() && self.name.is_none() && self.error.is_none()
    }
}

/// `kairosctl dead ...`.
#[derive(Subcommand, Debug)]
pub enum DeadCmd {
    /// Show dead letters, oldest first (nothing is removed).
    List {
        /// Which letters.
        #[command(flatten)]
        filter: DeadFilter,
        /// Show at most this many (following the pages).
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        /// Start where a previous listing stopped (its next_cursor).
        #[arg(long)]
        cursor: Option<String>,
        /// Print the JSON: {"dead": [...], "next_cursor", "truncated"}.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its headers and body.
    Show {
        /// Task id.
        id: String,
        /// Print the JSON as the API answers it.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their queues with fresh retries: the ids
    /// given and/or those the filter selects; all when neither is given.
    Replay {
        /// Task ids.
        ids: Vec<String>,
        /// Which letters.
        #[command(flatten)]
        filter: DeadFilter,
        /// Print the JSON as the API answers it.
        #[arg(long)]
        json: bool,
    },
    /// Delete the dead letters the filter selects; every one without a
    /// filter.
    Purge {
        /// Which letters.
        #[command(flatten)]
        filter: DeadFilter,
        /// Print the JSON as the API answers it.
        #[arg(long)]
        json: bool,
    },
}

/// The body of `POST /v1/dead/replay`.
#[derive(Serialize)]
struct ReplayRequest<'a> {
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    ids: &'a [String],
    #[serde(flatten)]
    filter: &'a DeadFilter,
}

impl Api {
    /// One page of dead letters (`GET /v1/dead`): at most `limit` that
    /// `filter` selects, after `cursor`.
    pub fn dead_page(
        &self,
        filter: &DeadFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Reply, String> {
        let mut pairs = filter.pairs();
        pairs.push(format!("limit={limit}"));
        if let Some(c) = cursor {
            pairs.push(format!("cursor={}", encode(c)));
        }
        self.send("GET", &format!("/v1/dead?{}", pairs.join("&")), None)
    }

    /// One dead letter with its body (`GET /v1/dead/{id}`).
    pub fn dead_show(&self, id: &str) -> Result<Reply, String> {
        self.send("GET", &format!("/v1/dead/{}", encode(id)), None)
    }

    /// Replays the letters with these ids that `filter` also selects (all
    /// when both are empty).
    pub fn dead_replay_matching(
        &self,
        ids: &[String],
        filter: &DeadFilter,
    ) -> Result<Reply, String> {
        let body = to_json(&ReplayRequest { ids, filter })?;
        self.send("POST", "/v1/dead/replay", Some(&body))
    }

    /// Deletes the letters `filter` selects (all when empty).
    pub fn dead_purge_matching(&self, filter: &DeadFilter) -> Result<Reply, String> {
        let pairs = filter.pairs();
        if pairs.is_empty() {
            self.send("DELETE", "/v1/dead", None)
        } else {
            self.send("DELETE", &format!("/v1/dead?{}", pairs.join("&")), None)
        }
    }
}

/// Runs one `kairosctl dead` subcommand; the error is for the caller to
/// print: no answer came (exit status 3, `crate::exit::UNREACHABLE`).
pub fn run(api: &Api, cmd: DeadCmd) -> Result<ExitCode, String> {
    match cmd {
        DeadCmd::List {
            filter,
            limit,
            cursor,
            json,
        } => list(
            api,
            &filter,
            usize::try_from(limit).unwrap_or(usize::MAX),
            cursor,
            json,
        ),
        DeadCmd::Show { id, json } => {
            let r = api.dead_show(&id)?;
            if !r.ok() {
                return Ok(failed(&r));
            }
            if json {
                print_json(&r.body);
            } else {
                print_letter(&r.body);
            }
            Ok(ExitCode::SUCCESS)
        }
        DeadCmd::Replay { ids, filter, json } => {
            let r = api.dead_replay_matching(&ids, &filter)?;
            if !r.ok() {
                return Ok(failed(&r));
            }
            let refused = r.body["refused"].as_array().map_or(0, Vec::len);
            let missing = r.body["not_found"].as_array().map_or(0, Vec::len);
            if json {
                print_json(&r.body);
            } else {
                print_replayed(&r.body);
            }
            Ok(if refused + missing > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        DeadCmd::Purge { filter, json } => {
            let r = api.dead_purge_matching(&filter)?;
            if !r.ok() {
                return Ok(failed(&r));
            }
            if json {
                print_json(&r.body);
            } else {
                let n = r.body["purged"].as_u64().unwrap_or(0);
                let which = if filter.is_empty() { "" } else { " matching" };
                println!("purged {n}{which} dead letter(s)");
                if r.body["truncated"].as_bool() == Some(true) {
                    eprintln!(
                        "kairosctl: the scan stopped at its bound: run it again for the rest"
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `dead list`: follows the pages until `limit` letters or the end.
fn list(
    api: &Api,
    filter: &DeadFilter,
    limit: usize,
    mut cursor: Option<String>,
    json: bool,
) -> Result<ExitCode, String> {
    let mut letters: Vec<Value> = Vec::new();
    let mut truncated = false;
    loop {
        let want = (limit - letters.len()).min(PAGE);
        let r = api.dead_page(filter, want, cursor.as_deref())?;
        if !r.ok() {
            return Ok(failed(&r));
        }
        if let Some(page) = r.body["dead"].as_array() {
            letters.extend(page.iter().cloned());
        }
        truncated |= r.body["truncated"].as_bool() == Some(true);
        cursor = r.body["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() || letters.len() >= limit {
            break;
        }
    }
    if json {
        print_json(&json!({"dead": letters, "next_cursor": cursor, "truncated": truncated}));
        return Ok(ExitCode::SUCCESS);
    }
    print_table(&letters);
    if let Some(c) = cursor {
        eprintln!("kairosctl: more dead letters: add --cursor {c}");
    }
    if truncated {
        eprintln!(
            "kairosctl: the listing reads at most the first {} letters of the queue",
            kairos_shared::dead::MAX_SCAN
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// An error answer: its message on stderr, exit status per
/// `crate::exit::for_status` (1; 2 for a 401, 3 for a 503).
fn failed(r: &Reply) -> ExitCode {
    let msg = r
        .body
        .get("error")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| r.body.to_string());
    eprintln!("kairosctl: HTTP {}: {msg}", r.status);
    ExitCode::from(r.exit_code())
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A text field, `-` when absent, on one line.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.replace(['\n', '\r'], " "),
        other => other.to_string(),
    }
}

fn print_table(rows: &[Value]) {
    println!(
        "{:<38} {:<20} {:<12} {:<7} {:<24} ERROR",
        "ID", "NAME", "QUEUE", "ATTEMPT", "FAILED_AT"
    );
    for d in rows {
        println!(
            "{:<38} {:<20} {:<12} {:<7} {:<24} {}",
            text(&d["id"]),
            text(&d["name"]),
            text(&d["queue"]),
            text(&d["attempt"]),
            when(&d["failed_at"]),
            text(&d["error"])
        );
    }
}

fn print_letter(d: &Value) {
    for key in ["id", "name", "queue", "attempt"] {
        println!("{:<12} {}", format!("{key}:"), text(&d[key]));
    }
    println!("{:<12} {}", "failed_at:", when(&d["failed_at"]));
    println!("{:<12} {}", "error:", text(&d["error"]));
    println!("{:<12} {}", "routing_key:", text(&d["routing_key"]));
    if let Some(props) = d["properties"].as_object() {
        let set: Vec<String> = props
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect();
        println!("{:<12} {}", "properties:", set.join(" "));
    }
    println!("headers:");
    if let Some(headers) = d["headers"].as_object() {
        for (k, v) in headers {
            println!("  {k}: {v}");
        }
    }
    let encoding = d["body_encoding"].as_str().unwrap_or("?");
    println!("body ({encoding}, {} bytes):", d["body_bytes"]);
    match encoding {
        "json" => print_json(&d["body"]),
        "text" => println!("{}", d["body"].as_str().unwrap_or_default()),
        _ => println!("{}", d["body_base64"].as_str().unwrap_or_default()),
    }
}

fn print_replayed(body: &Value) {
    let empty = Vec::new();
    let replayed = body["replayed"].as_array().unwrap_or(&empty);
    println!("replayed {} dead letter(s)", replayed.len());
    for id in replayed {
        println!("  {}", text(id));
    }
    for r in body["refused"].as_array().unwrap_or(&empty) {
        eprintln!(
            "kairosctl: refused {}: {}",
            text(&r["id"]),
            text(&r["error"])
        );
    }
    for id in body["not_found"].as_array().unwrap_or(&empty) {
        eprintln!("kairosctl: not found: {}", text(id));
    }
    if body["truncated"].as_bool() == Some(true) {
        eprintln!("kairosctl: the scan stopped at its bound: run it again for the rest");
    }
}

/// Unix ms as UTC to the millisecond, `-` when absent.
fn when(v: &Value) -> String {
    v.as_i64()
        .map(|ms| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
                .unwrap_or_else(|| ms.to_string())
        })
        .unwrap_or_else(|| "-".into())
}
