//! `kairosctl task add --file tasks.jsonl`: one `POST /v1/tasks` body per
//! line, sent with at most `--concurrency` requests in flight, and a
//! summary: how many were sent, how many were already pending
//! (duplicates: 409), and which lines failed and why.
//!
//! A bad line (not UTF-8, not a JSON object, refused by the server) is
//! counted with its line number and the rest go on. Only a server that
//! stops answering stops the run: after [`GIVE_UP_AFTER`] answers in a
//! row that did not come (or were 503), no more lines are read, and the
//! summary says from which line on nothing was sent. With a `failed_out`
//! writer, every line that was not accepted (bad, refused, unanswered, or
//! never sent because the run stopped) is copied there, to send again.

use crate::{exit, Api, CallError, Reply};
use serde::Serialize;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Requests in flight unless told (`--concurrency`).
pub const DEFAULT_CONCURRENCY: u16 = 16;
/// No answer (or 503) this many times in a row: the server is taken as
/// gone and the run stops.
pub const GIVE_UP_AFTER: usize = 8;
/// Failures listed in the human summary (`--json` lists all).
pub const LISTED_FAILURES: usize = 20;

/// One line that did not make it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Failure {
    /// 1-based line number in the input.
    pub line: u64,
    /// The HTTP status, when the server answered.
    pub status: Option<u16>,
    /// The field the server named, when it did.
    pub field: Option<String>,
    /// Why.
    pub error: String,
}

/// What a run did; printed as the summary (`--json`: as JSON).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    /// Lines holding something (blank lines are skipped, not counted).
    pub lines: u64,
    /// Accepted (202).
    pub sent: u64,
    /// Already pending with the same id (409): the first submission wins.
    pub duplicates: u64,
    /// Lines that failed: bad lines and refusals.
    pub failed: u64,
    /// Each failed line, by line number.
    pub failures: Vec<Failure>,
    /// Why the run stopped before the end of the input, if it did.
    pub stopped: Option<String>,
    /// The first line not read because the run stopped.
    pub not_sent_from_line: Option<u64>,
    /// Whether some failure was for want of an answer (exit code 3).
    #[serde(skip)]
    pub unreachable: bool,
    /// Why the lines not accepted could not all be copied, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_error: Option<String>,
}

impl Summary {
    /// The exit code: 3 when the server could not be reached (for some
    /// lines or from some line on), 2 when the lines not accepted could
    /// not be copied, 1 when a line failed, else 0.
    pub fn exit_code(&self) -> u8 {
        if self.unreachable || self.stopped.is_some() {
            exit::UNREACHABLE
        } else if self.write_error.is_some() {
            exit::USAGE
        } else if self.failed > 0 {
            exit::ANSWERED_ERROR
        } else {
            exit::OK
        }
    }

    /// The human summary: the counts, then up to [`LISTED_FAILURES`]
    /// failed lines.
    pub fn render(&self) -> String {
        let mut out = format!(
            "sent {}, duplicates {}, failed {} (of {} lines)\n",
            self.sent, self.duplicates, self.failed, self.lines
        );
        let mut failures = self.failures.clone();
        failures.sort_by_key(|f| f.line);
        for f in failures.iter().take(LISTED_FAILURES) {
            let what = match (f.status, &f.field) {
                (Some(s), Some(field)) => format!("HTTP {s} ({field}): "),
                (Some(s), None) => format!("HTTP {s}: "),
                _ => String::new(),
            };
            out.push_str(&format!("  line {}: {what}{}\n", f.line, f.error));
        }
        if failures.len() > LISTED_FAILURES {
            out.push_str(&format!(
                "  ... and {} more (--json lists them all)\n",
                failures.len() - LISTED_FAILURES
            ));
        }
        if let Some(why) = &self.stopped {
            out.push_str(&format!("stopped: {why}\n"));
            if let Some(line) = self.not_sent_from_line {
                out.push_str(&format!("lines from {line} on were not sent\n"));
            }
        }
        if let Some(e) = &self.write_error {
            out.push_str(&format!("{e}\n"));
        }
        out
    }

    /// Takes in one answer (or why none came) for `line`.
    fn record(&mut self, line: u64, outcome: Result<Reply, CallError>) -> Outcome {
        match outcome {
            Ok(r) if r.ok() => {
                self.sent += 1;
                Outcome::Answered
            }
            Ok(r) if r.status == 409 => {
                self.duplicates += 1;
                Outcome::Answered
            }
            Ok(r) => {
                let gone = r.status == 503;
                self.unreachable |= gone;
                self.fail(Failure {
                    line,
                    status: Some(r.status),
                    field: r.body["field"].as_str().map(str::to_string),
                    error: r.error_text(),
                });
                if gone {
                    Outcome::NoAnswer
                } else {
                    Outcome::Answered
                }
            }
            Err(e) => {
                self.unreachable |= matches!(e, CallError::Unreachable(_));
                self.fail(Failure {
                    line,
                    status: None,
                    field: None,
                    error: e.to_string(),
                });
                Outcome::NoAnswer
            }
        }
    }

    fn fail(&mut self, f: Failure) {
        self.failed += 1;
        self.failures.push(f);
    }
}

/// Whether the server answered (whatever it said).
#[derive(PartialEq)]
enum Outcome {
    Answered,
    NoAnswer,
}

/// Reads lines as they are needed; bad ones go to `bad`, good ones are
/// yielded with their line number (and a copy of the line when lines not
/// accepted are kept).
struct Lines<'s, 'a, R> {
    input: R,
    line: u64,
    shared: &'s Shared<'a>,
}

/// What the reading side and the answering side share.
struct Shared<'a> {
    bad: Mutex<Vec<Failure>>,
    /// Lines holding something, read so far.
    lines: AtomicU64,
    /// The last line number read.
    last_line: AtomicU64,
    /// Why reading stopped (an I/O error), if it did.
    read_error: Mutex<Option<String>>,
    /// Where lines not accepted are copied, if anywhere.
    failed_out: Option<Mutex<&'a mut (dyn Write + Send)>>,
    /// The first error writing there.
    write_error: Mutex<Option<String>>,
    /// No-answers in a row.
    no_answer_run: AtomicUsize,
    give_up: AtomicBool,
    /// Called for each bad line (the progress bar).
    on_bad: Box<dyn Fn() + Send + Sync>,
}

impl Shared<'_> {
    /// Copies a line that was not accepted to `failed_out`.
    fn keep(&self, line: &[u8]) {
        let Some(out) = &self.failed_out else { return };
        let written = match out.lock() {
            Ok(mut out) => out.write_all(line).and_then(|()| out.write_all(b"\n")),
            Err(_) => return,
        };
        if let Err(e) = written {
            if let Ok(mut slot) = self.write_error.lock() {
                slot.get_or_insert_with(|| format!("writing the lines not accepted: {e}"));
            }
        }
    }
}

/// A line read: its number, and its text again when it may have to be
/// kept.
type LineKey = (u64, Vec<u8>);

impl<R: BufRead> Lines<'_, '_, R> {
    /// The next line and its number, without its line break; `None` at
    /// the end or on a read error (kept in `read_error`).
    fn next_raw(&mut self) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        match self.input.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) => {
                self.line += 1;
                while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    buf.pop();
                }
                if self.line == 1 && buf.starts_with(UTF8_BOM) {
                    buf.drain(..UTF8_BOM.len());
                }
                Some(buf)
            }
            Err(e) => {
                if let Ok(mut slot) = self.shared.read_error.lock() {
                    *slot = Some(format!("reading line {}: {e}", self.line + 1));
                }
                None
            }
        }
    }
}

/// A byte-order mark some editors put first: not part of the JSON.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

impl<R: BufRead> Iterator for Lines<'_, '_, R> {
    type Item = (LineKey, Vec<u8>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let buf = self.next_raw()?;
            self.shared.last_line.store(self.line, Ordering::Relaxed);
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            self.shared.lines.fetch_add(1, Ordering::Relaxed);
            match check_line(&buf) {
                Ok(()) => {
                    let copy = if self.shared.failed_out.is_some() {
                        buf.clone()
                    } else {
                        Vec::new()
                    };
                    return Some(((self.line, copy), buf));
                }
                Err(error) => {
                    self.shared.keep(&buf);
                    if let Ok(mut bad) = self.shared.bad.lock() {
                        bad.push(Failure {
                            line: self.line,
                            status: None,
                            field: None,
                            error,
                        });
                    }
                    (self.shared.on_bad)();
                }
            }
        }
    }
}

/// A line must be one JSON object in UTF-8; the server checks the rest.
pub fn check_line(line: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(line)
        .map_err(|e| format!("not UTF-8 (byte {})", e.valid_up_to() + 1))?;
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err("not a JSON object (one POST /v1/tasks body per line)".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// Sends every task of `input` through `api`, at most `concurrency` at
/// once. `on_line` is called once per line that holds something, when its
/// outcome is known (for a progress bar). Lines not accepted are copied to
/// `failed_out` when given (in the order they failed; a duplicate is not a
/// failure and is not copied), and so is the rest of the input when the
/// run stops.
pub fn send(
    api: &Api,
    input: impl BufRead + Send,
    concurrency: usize,
    failed_out: Option<&mut (dyn Write + Send)>,
    on_line: impl Fn() + Send + Sync + 'static,
) -> Summary {
    let on_line = std::sync::Arc::new(on_line);
    let on_bad = {
        let on_line = on_line.clone();
        Box::new(move || on_line())
    };
    let shared = Shared {
        bad: Mutex::new(Vec::new()),
        lines: AtomicU64::new(0),
        last_line: AtomicU64::new(0),
        read_error: Mutex::new(None),
        failed_out: failed_out.map(Mutex::new),
        write_error: Mutex::new(None),
        no_answer_run: AtomicUsize::new(0),
        give_up: AtomicBool::new(false),
        on_bad,
    };
    let mut lines = Lines {
        input,
        line: 0,
        shared: &shared,
    };
    let mut summary = Summary::default();
    let mut last_no_answer = None;
    api.send_many(
        "POST",
        "/v1/tasks",
        lines.by_ref(),
        concurrency,
        |(line, text): LineKey, outcome| {
            let failed = summary.failed;
            let what = summary.record(line, outcome);
            if summary.failed > failed {
                shared.keep(&text);
            }
            if what == Outcome::NoAnswer {
                last_no_answer = summary.failures.last().map(|f| f.error.clone());
                let run = shared.no_answer_run.fetch_add(1, Ordering::Relaxed) + 1;
                if run >= GIVE_UP_AFTER {
                    shared.give_up.store(true, Ordering::Relaxed);
                }
            } else {
                shared.no_answer_run.store(0, Ordering::Relaxed);
            }
            on_line();
        },
        || shared.give_up.load(Ordering::Relaxed),
    );
    let bad = shared
        .bad
        .lock()
        .map(|mut b| std::mem::take(&mut *b))
        .unwrap_or_default();
    summary.failed += bad.len() as u64;
    summary.failures.extend(bad);
    summary.failures.sort_by_key(|f| f.line);
    summary.lines = shared.lines.load(Ordering::Relaxed);
    if shared.give_up.load(Ordering::Relaxed) {
        summary.stopped = Some(format!(
            "{GIVE_UP_AFTER} requests in a row got no answer (last: {})",
            last_no_answer.unwrap_or_default()
        ));
        summary.not_sent_from_line = Some(lines.line + 1);
        if shared.failed_out.is_some() {
            // The rest was never read: copied as it is, to send later.
            while let Some(rest) = lines.next_raw() {
                if !rest.iter().all(u8::is_ascii_whitespace) {
                    shared.keep(&rest);
                }
            }
        }
    }
    let read_error = shared.read_error.lock().ok().and_then(|mut e| e.take());
    if let (None, Some(e)) = (&summary.stopped, read_error) {
        summary.stopped = Some(e);
        summary.not_sent_from_line = Some(shared.last_line.load(Ordering::Relaxed) + 1);
    }
    summary.write_error = shared.write_error.lock().ok().and_then(|mut e| e.take());
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_must_be_json_objects_in_utf8() {
        assert!(check_line(br#"{"name":"a"}"#).is_ok());
        assert!(check_line(b"[1]")
            .unwrap_err()
            .contains("not a JSON object"));
        assert!(check_line(b"{nope").unwrap_err().starts_with("not JSON"));
        assert!(check_line(b"{\"name\":\"\xff\"}")
            .unwrap_err()
            .contains("UTF-8"));
    }

    #[test]
    fn lines_skip_blanks_and_a_bom_and_keep_the_bad_ones() {
        let mut kept: Vec<u8> = Vec::new();
        let shared = Shared {
            bad: Mutex::new(Vec::new()),
            lines: AtomicU64::new(0),
            last_line: AtomicU64::new(0),
            read_error: Mutex::new(None),
            failed_out: Some(Mutex::new(&mut kept)),
            write_error: Mutex::new(None),
            no_answer_run: AtomicUsize::new(0),
            give_up: AtomicBool::new(false),
            on_bad: Box::new(|| {}),
        };
        let input = b"\xEF\xBB\xBF{\"name\":\"a\"}\r\n\n  \nnope\n{\"name\":\"b\"}";
        let lines = Lines {
            input: &input[..],
            line: 0,
            shared: &shared,
        };
        let got: Vec<(u64, Vec<u8>)> = lines.map(|((n, _), body)| (n, body)).collect();
        assert_eq!(
            got,
            vec![
                (1, br#"{"name":"a"}"#.to_vec()),
                (5, br#"{"name":"b"}"#.to_vec())
            ]
        );
        assert_eq!(shared.lines.load(Ordering::Relaxed), 3);
        let bad = shared.bad.lock().map(|b| b.clone()).unwrap_or_default();
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].line, 4);
        drop(shared);
        assert_eq!(kept, b"nope\n");
    }

    #[test]
    fn the_summary_counts_and_lists_failures_by_line() {
        let mut s = Summary::default();
        let ok = Reply {
            status: 202,
            body: serde_json::json!({"id": "a"}),
        };
        let dup = Reply {
            status: 409,
            body: serde_json::json!({"error": "pending", "id": "b"}),
        };
        let bad = Reply {
            status: 400,
            body: serde_json::json!({"error": "priority must be 0 to 9", "field": "priority"}),
        };
        assert!(s.record(1, Ok(ok)) == Outcome::Answered);
        assert!(s.record(3, Ok(bad)) == Outcome::Answered);
        assert!(s.record(2, Ok(dup)) == Outcome::Answered);
        s.lines = 3;
        assert_eq!(s.exit_code(), exit::ANSWERED_ERROR);
        assert_eq!(
            s.render(),
            "sent 1, duplicates 1, failed 1 (of 3 lines)\n  line 3: HTTP 400 (priority): priority must be 0 to 9\n"
        );
        assert!(s.record(4, Err(CallError::Unreachable("refused".into()))) == Outcome::NoAnswer);
        assert_eq!(s.exit_code(), exit::UNREACHABLE);
    }
}
