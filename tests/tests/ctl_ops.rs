//! kairosctl's operating subcommands through the real binary, against the
//! real servers: `task add --file` (good and bad lines, the summary, what
//! arrived), `task show|cancel|abort|list`, `queues`, `queue pause|resume`,
//! `--json` outputs that parse, and the exit codes of docs/KAIROSCTL.md
//! (0 ok, 1 the server said no, 2 usage or configuration, 3 no answer).
//!
//! Which need which routes: the `task add --file` and exit-code tests run
//! on what main has; `task_show_cancel_and_list_a_delayed_task` needs the
//! status routes (`GET`/`DELETE /v1/tasks/{id}`, `GET /v1/tasks`);
//! `queues_pause_and_resume` and `abort_a_running_task` the control routes
//! (`/v1/queues`, `POST /v1/tasks/{id}/abort`) and, for the abort, the
//! status routes too.

use kairos_shared::secrets::Secret;
use kairos_tests::*;
use kairos_worker::{TaskContext, Worker};
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// What one run of kairosctl did.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Its stdout as JSON; panics (showing both streams) when it is not.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// How to run kairosctl: over HTTP to one scheduler, or in process.
#[derive(Clone)]
struct Ctl {
    vars: Vec<(String, String)>,
}

impl Ctl {
    /// Against the scheduler at `addr`.
    fn http(addr: impl ToString) -> Self {
        Ctl {
            vars: vec![("KAIROS_HTTP_ADDR".into(), addr.to_string())],
        }
    }

    /// In process on the test's namespace (no scheduler).
    fn direct(env: &TestEnv) -> Self {
        Ctl {
            vars: vec![
                ("KAIROS_NAMESPACE".into(), env.ns.clone()),
                ("KAIROS_REDIS_URL".into(), REDIS_URL.into()),
                ("KAIROS_AMQP_URL".into(), env.amqp_url.clone()),
            ],
        }
    }

    /// One more variable.
    fn var(mut self, k: &str, v: &str) -> Self {
        self.vars.push((k.into(), v.into()));
        self
    }

    async fn run(&self, args: &[&str]) -> Out {
        self.run_with_stdin(args, None).await
    }

    /// Runs kairosctl on the blocking pool (the test's runtime keeps
    /// serving the in-process scheduler and worker meanwhile).
    async fn run_with_stdin(&self, args: &[&str], stdin: Option<Vec<u8>>) -> Out {
        let mut cmd = Command::new(binary("kairosctl"));
        cmd.args(args)
            .env_remove("KAIROS_HTTP_ADDR")
            .env_remove("KAIROS_API_TOKEN")
            .env_remove("KAIROS_API_TOKEN_FILE")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().expect("run kairosctl");
            if let Some(input) = stdin {
                let mut pipe = child.stdin.take().expect("stdin");
                pipe.write_all(&input).expect("write stdin");
            }
            let out = child.wait_with_output().expect("kairosctl output");
            Out {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        })
        .await
        .expect("kairosctl ran")
    }

    /// Polls `task show ID --json` until the task is in `state` (the
    /// status is written in the background, and no event says when).
    async fn wait_state(&self, id: &str, state: &str, within: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let out = self.run(&["task", "show", id, "--json"]).await;
            if out.code == Some(0) && out.json()["state"] == state {
                return out.json();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {id} not {state} within {within:?}: {out:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A JSON-lines file in the system's temp folder, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(tag: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "kairosctl-{tag}-{}.jsonl",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::write(&path, text).expect("write the tasks file");
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A scheduler with its HTTP API on a free port, ready.
async fn scheduler(env: &TestEnv) -> (InProcess, std::net::SocketAddr) {
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    ScheduleApi::new(addr)
        .wait_ready(Duration::from_secs(20))
        .await;
    (scheduler, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_add_file_sends_the_good_lines_and_reports_the_bad_ones_by_number() {
    let env = TestEnv::new("ctl-bulk").await;
    let (scheduler, addr) = scheduler(&env).await;
    let log = RunLog::default();
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.record", log.handler(0)));
    let ctl = Ctl::http(addr);

    let mut lines = vec![
        r#"{"name":"test.record","id":"bulk-a","body":{"n":1}}"#.to_string(),
        r#"{"name":"test.record","id":"bulk-b","delay_ms":50}"#.into(),
        "{not json".into(),
        "".into(),
        "[1,2]".into(),
        r#"{"name":"test.record","priority":12}"#.into(),
        // The same delayed id twice: one is held, the other is a duplicate
        // (whichever comes first wins).
        r#"{"name":"test.record","id":"bulk-dup","delay_ms":600000}"#.into(),
        r#"{"name":"test.record","id":"bulk-dup","delay_ms":600000}"#.into(),
    ];
    for i in 0..40 {
        lines.push(format!(r#"{{"name":"test.record","id":"bulk-{i}"}}"#));
    }
    let file = TempFile::new("bulk", &(lines.join("\n") + "\n"));
    let failed = TempFile::new("bulk-failed", "");
    let out = ctl
        .run(&[
            "task",
            "add",
            "--file",
            file.path(),
            "--concurrency",
            "8",
            "--failed-out",
            failed.path(),
        ])
        .await;
    // Bad lines make the run fail (1), but every good line was sent.
    assert_eq!(out.code, Some(1), "{out:?}");
    let summary: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        summary[0], "sent 43, duplicates 1, failed 3 (of 47 lines)",
        "{out:?}"
    );
    assert!(summary[1].starts_with("  line 3: not JSON"), "{out:?}");
    assert!(
        summary[2].starts_with("  line 5: not a JSON object"),
        "{out:?}"
    );
    assert!(
        summary[3].starts_with("  line 6: HTTP 400 (priority): "),
        "{out:?}"
    );
    // No progress bar when stderr is not a terminal.
    assert!(out.stderr.is_empty(), "{out:?}");
    // The lines not accepted, to fix and send again (not the duplicate).
    let mut kept: Vec<String> = std::fs::read_to_string(failed.path())
        .expect("--failed-out written")
        .lines()
        .map(str::to_string)
        .collect();
    kept.sort();
    let mut expected = vec![lines[2].clone(), lines[4].clone(), lines[5].clone()];
    expected.sort();
    assert_eq!(kept, expected);
    // One more of the pending id: 409, exit 1, the answer as JSON.
    let out = ctl
        .run(&[
            "task",
            "add",
            "--name",
            "test.record",
            "--id",
            "bulk-dup",
            "--delay-ms",
            "600000",
            "--json",
        ])
        .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.json()["id"], "bulk-dup", "{out:?}");
    assert!(out.stderr.contains("HTTP 409"), "{out:?}");
    // 42 run now (bulk-dup is due in 10 minutes), each once.
    log.wait_distinct(42, Duration::from_secs(30)).await;
    for id in ["bulk-a", "bulk-b", "bulk-0", "bulk-39"] {
        assert_eq!(log.runs_of(id), 1, "{id}");
    }

    // From stdin, summary as JSON: only good lines (and a blank) -> 0.
    let input = b"{\"name\":\"test.record\",\"id\":\"stdin-1\"}\n\n\
                  {\"name\":\"test.record\",\"id\":\"stdin-2\"}\r\n"
        .to_vec();
    let out = ctl
        .run_with_stdin(&["task", "add", "--file", "-", "--json"], Some(input))
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let s = out.json();
    assert_eq!(
        (&s["lines"], &s["sent"], &s["duplicates"], &s["failed"]),
        (&json!(2), &json!(2), &json!(0), &json!(0)),
        "{s}"
    );
    assert_eq!(s["failures"], json!([]));
    assert_eq!(s["stopped"], Value::Null);
    log.wait_distinct(44, Duration::from_secs(20)).await;

    // --json lists every failure with its line, status and field.
    let file = TempFile::new(
        "bulk-json",
        "{\"name\":\"test.record\",\"id\":\"json-1\"}\nnope\n{\"name\":\"\"}\n",
    );
    let out = ctl
        .run(&["task", "add", "--file", file.path(), "--json"])
        .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    let s = out.json();
    assert_eq!(s["sent"], 1, "{s}");
    assert_eq!(s["failed"], 2, "{s}");
    assert_eq!(s["failures"][0]["line"], 2, "{s}");
    assert_eq!(s["failures"][0]["status"], Value::Null, "{s}");
    assert_eq!(s["failures"][1]["line"], 3, "{s}");
    assert_eq!(s["failures"][1]["status"], 400, "{s}");
    assert_eq!(s["failures"][1]["field"], "name", "{s}");
    log.wait_distinct(45, Duration::from_secs(20)).await;
    worker.stop().await;
    scheduler.stop().await;
}

/// Without a scheduler, `task add --file` runs the same route in process,
/// with the same bounded concurrency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_add_file_works_without_a_scheduler() {
    let env = TestEnv::new("ctl-bulk-direct").await;
    let log = RunLog::default();
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.record", log.handler(0)));
    let text: String = (0..30)
        .map(|i| format!("{{\"name\":\"test.record\",\"id\":\"direct-{i}\"}}\n"))
        .collect();
    let file = TempFile::new("direct", &text);
    let out = Ctl::direct(&env)
        .run(&["task", "add", "--file", file.path(), "--concurrency", "4"])
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout, "sent 30, duplicates 0, failed 0 (of 30 lines)\n",
        "{out:?}"
    );
    log.wait_distinct(30, Duration::from_secs(30)).await;
    assert_eq!(log.total(), 30);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_scripts_can_use() {
    let env = TestEnv::new("ctl-exit").await;
    // Nobody listens here.
    let nobody = Ctl::http(free_addr());

    // 2: usage and configuration.
    for args in [
        &["task", "show"][..],
        &["task", "list", "--limit", "0"],
        &["task", "add"],
        &["task", "add", "--file", "x.jsonl", "--name", "y"],
        &["queue", "pause"],
        &["no-such-command"],
        &["task", "add", "--file", "/nonexistent/tasks.jsonl"],
    ] {
        let out = nobody.run(args).await;
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
    }
    let bad_addr = Ctl::http("http://");
    let out = bad_addr.run(&["task", "show", "x"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("KAIROS_HTTP_ADDR"), "{out:?}");

    // 3: no answer, over HTTP and in process.
    for args in [
        &["task", "show", "x"][..],
        &["task", "cancel", "x", "--json"],
        &["task", "list"],
        &["queues"],
        &["queue", "resume", "default"],
        &["schedule", "list"],
        &["dead", "list"],
        &["task", "add", "--name", "test.record"],
    ] {
        let out = nobody.run(args).await;
        assert_eq!(out.code, Some(3), "{args:?}: {out:?}");
        assert!(out.stderr.contains("cannot reach"), "{args:?}: {out:?}");
    }
    let no_redis = Ctl::direct(&env).var("KAIROS_REDIS_URL", "redis://127.0.0.1:1/0");
    let out = no_redis.run(&["task", "show", "x"]).await;
    assert_eq!(out.code, Some(3), "{out:?}");
    // A file against a server that is gone: the run stops after a few
    // requests in a row got no answer, and says where.
    let text: String = (0..50)
        .map(|i| format!("{{\"name\":\"test.record\",\"id\":\"gone-{i}\"}}\n"))
        .collect();
    let file = TempFile::new("gone", &text);
    let failed = TempFile::new("gone-failed", "");
    let out = nobody
        .run(&[
            "task",
            "add",
            "--file",
            file.path(),
            "--concurrency",
            "1",
            "--failed-out",
            failed.path(),
        ])
        .await;
    assert_eq!(out.code, Some(3), "{out:?}");
    // Every line is kept to send later: those that failed and the rest.
    assert_eq!(
        std::fs::read_to_string(failed.path()).expect("--failed-out"),
        text
    );
    assert!(
        out.stdout.starts_with("sent 0, duplicates 0, failed "),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains("stopped: 8 requests in a row got no answer"),
        "{out:?}"
    );
    assert!(out.stdout.contains("on were not sent"), "{out:?}");
    // The file itself is never overwritten.
    let out = nobody
        .run(&[
            "task",
            "add",
            "--file",
            file.path(),
            "--failed-out",
            file.path(),
        ])
        .await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert_eq!(std::fs::read_to_string(file.path()).expect("file"), text);

    // 2: a scheduler that wants a token nobody gave (401).
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    sc.api_token = Some(Secret::new("ctl-token-0123456789abcdef"));
    let scheduler = InProcess::scheduler(sc);
    let ctl = Ctl::http(addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = ctl.run(&["schedule", "list"]).await;
        if out.code != Some(3) || tokio::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(out.code, Some(2), "{out:?}");
    let out = ctl
        .clone()
        .var("KAIROS_API_TOKEN", "ctl-token-0123456789abcdef")
        .run(&["schedule", "list", "--json"])
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.json()["schedules"].is_array(), "{out:?}");
    scheduler.stop().await;
}

/// Needs the status routes (h/status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_show_cancel_and_list_a_delayed_task() {
    let env = TestEnv::new("ctl-task").await;
    let (scheduler, addr) = scheduler(&env).await;
    let ctl = Ctl::http(addr);
    let out = ctl
        .run(&[
            "task",
            "add",
            "--name",
            "test.record",
            "--id",
            "later-1",
            "--delay-ms",
            "600000",
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout.trim(), "later-1");

    let task = ctl
        .wait_state("later-1", "scheduled", Duration::from_secs(20))
        .await;
    assert_eq!(task["id"], "later-1");
    assert_eq!(task["name"], "test.record");
    assert_eq!(task["queue"], "default");
    assert!(task["due_at"].is_number(), "{task}");
    assert!(
        task.get("started_at").is_some(),
        "absent fields are null: {task}"
    );
    let out = ctl.run(&["task", "show", "later-1"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("state     scheduled\n"), "{out:?}");
    assert!(out.stdout.contains("  due       "), "{out:?}");
    assert!(out.stdout.contains("(in 9m"), "{out:?}");

    let out = ctl.run(&["task", "list", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let page = out.json();
    assert!(
        page["tasks"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["id"] == "later-1")),
        "{page}"
    );
    assert!(page.get("next_cursor").is_some(), "{page}");
    let out = ctl
        .run(&[
            "task",
            "list",
            "--state",
            "scheduled",
            "--queue",
            "default",
            "--limit",
            "10",
        ])
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("ID "), "{out:?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("later-1") && l.contains("scheduled") && l.contains("due in")),
        "{out:?}"
    );

    let out = ctl.run(&["task", "cancel", "later-1"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("cancelled task later-1"), "{out:?}");
    // Again: 409 with the state, exit 1; --json prints the answer.
    let out = ctl.run(&["task", "cancel", "later-1", "--json"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.json()["state"], "cancelled", "{out:?}");
    assert!(out.stderr.contains("it is already cancelled"), "{out:?}");
    let out = ctl.run(&["task", "show", "later-1", "--json"]).await;
    assert_eq!(out.json()["state"], "cancelled", "{out:?}");
    // In process (no scheduler address): the same answers.
    let direct = Ctl::direct(&env);
    let out = direct.run(&["task", "show", "later-1", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.json()["state"], "cancelled", "{out:?}");
    let out = direct.run(&["task", "list", "--state", "cancelled"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.lines().any(|l| l.starts_with("later-1")),
        "{out:?}"
    );
    let out = direct.run(&["task", "cancel", "later-1"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");

    // Unknown: 404, exit 1, in words or as JSON.
    let out = ctl.run(&["task", "show", "nobody-knows"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("task nobody-knows not found"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");
    let out = ctl.run(&["task", "show", "nobody-knows", "--json"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.json()["error"].is_string(), "{out:?}");
    let out = ctl.run(&["task", "cancel", "nobody-knows"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    scheduler.stop().await;
}

/// Needs the control routes (h/control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_pause_and_resume() {
    let env = TestEnv::new("ctl-queues").await;
    let (scheduler, addr) = scheduler(&env).await;
    let worker = InProcess::worker(Worker::new(env.worker_config()).with_builtins());
    let ctl = Ctl::http(addr);
    let default_queue = |body: &Value| -> Value {
        body["queues"]
            .as_array()
            .and_then(|q| q.iter().find(|q| q["name"] == "default"))
            .cloned()
            .unwrap_or_else(|| panic!("no queue default in {body}"))
    };

    // Paused, the queue is listed (the paused set names it).
    let out = ctl.run(&["queue", "pause", "default"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(
        out.stdout,
        "queue default paused: workers stop taking from it\n"
    );
    let out = ctl.run(&["queues", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let body = out.json();
    let q = default_queue(&body);
    for k in ["ready", "consumers", "delayed", "due", "dead"] {
        assert!(q[k].is_number(), "{k}: {q}");
    }
    assert_eq!(q["paused"], true, "{q}");
    assert!(q["rates"].is_object(), "{q}");
    assert!(body["delay_queue"]["waiting"].is_number(), "{body}");
    let out = ctl.run(&["queues"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("NAME "), "{out:?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("default ") && l.contains("paused")),
        "{out:?}"
    );
    assert!(out.stdout.contains("delay queue: "), "{out:?}");

    let out = ctl.run(&["queue", "resume", "default", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.json(), json!({"name": "default", "paused": false}));
    // Resumed: no longer paused (listed or not: a queue is listed once a
    // worker or the status writer saw it).
    let out = ctl.run(&["queues", "--json"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let listed = out.json()["queues"]
        .as_array()
        .and_then(|q| q.iter().find(|q| q["name"] == "default").cloned());
    assert!(listed.is_none_or(|q| q["paused"] == false), "{out:?}");
    // A name no queue can have: 400, exit 1.
    let out = ctl.run(&["queue", "pause", "bad\u{1}name"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("cannot pause queue"), "{out:?}");
    worker.stop().await;
    scheduler.stop().await;
}

/// Needs the control and status routes (h/control, h/status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_a_running_task() {
    let env = TestEnv::new("ctl-abort").await;
    let (scheduler, addr) = scheduler(&env).await;
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let handler = {
        let started = started.clone();
        move |_ctx: TaskContext, _body: Vec<u8>| {
            let started = started.clone();
            async move {
                started.notify_one();
                // Ignores the abort: it is dropped at this await.
                tokio::time::sleep(Duration::from_secs(600)).await;
                Ok(())
            }
        }
    };
    let worker = InProcess::worker(Worker::new(env.worker_config()).handler("test.long", handler));
    let ctl = Ctl::http(addr);
    let out = ctl
        .run(&["task", "add", "--name", "test.long", "--id", "long-1"])
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    tokio::time::timeout(Duration::from_secs(20), started.notified())
        .await
        .expect("the task started");
    ctl.wait_state("long-1", "running", Duration::from_secs(20))
        .await;
    let out = ctl.run(&["task", "abort", "long-1"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with("abort requested for task long-1"),
        "{out:?}"
    );
    let task = ctl
        .wait_state("long-1", "cancelled", Duration::from_secs(20))
        .await;
    assert!(task["finished_at"].is_number(), "{task}");
    // Finished: abort and cancel say so, exit 1.
    let out = ctl.run(&["task", "abort", "long-1", "--json"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.json()["state"], "cancelled", "{out:?}");
    let out = ctl.run(&["task", "show", "long-1"]).await;
    assert!(out.stdout.contains("state     cancelled\n"), "{out:?}");
    assert!(out.stdout.contains("  finished  "), "{out:?}");
    worker.stop().await;
    scheduler.stop().await;
}
