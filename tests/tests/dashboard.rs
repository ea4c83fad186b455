//! The dashboard end to end in a real browser: the real `kairos-scheduler`
//! (with a token) and `kairos-worker` binaries, and headless Chromium
//! driven by `tests/browser/dashboard.mjs` (playwright-core). The page asks
//! for the token, shows the queue this test filled, follows a task until it
//! succeeded, pauses and resumes a schedule and replays a dead letter.
//! A second test runs the page against a stand-in of the documented API
//! (`tests/browser/dashboard-spec.mjs`): every route it uses, even those a
//! scheduler may not have yet, and markup in every field.
//!
//! Needs Debian's `chromium` and playwright-core in `target/node`:
//! `scripts/browser-test.sh --install-only` installs both, and this test
//! runs it when one is missing. Only when that fails too does the test
//! skip, loudly; with `CI` or `KAIROS_BROWSER_TEST=required` set (as
//! scripts/test.sh does) it fails instead.
//!
//! `KAIROS_UI_SCREENSHOTS=docs` saves the screenshots of docs/DASHBOARD.md
//! (`scripts/browser-test.sh --screenshots`).

use kairos_tests::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TOKEN: &str = "dashboard-token-0123456789abcdef";
/// Tasks put in the queue no worker reads, for the page to count.
const FILLED: usize = 5;
const FILLED_QUEUE: &str = "reports";
/// The queue of the task that dead-letters; its worker is stopped before
/// the replay, so the replayed letter stays in the queue.
const FRAGILE_QUEUE: &str = "fragile";
const DEAD_ID: &str = "ui-dead-1";
const TASK_ID: &str = "ui-task-1";
const SCHEDULE_ID: &str = "ui.report";
/// A task of the filled queue that waits in the delay queue.
const LATER_ID: &str = "ui-later";
const WAIT: Duration = Duration::from_secs(30);

/// The browser binary: `KAIROS_CHROMIUM`, or `chromium` (Debian) or
/// `chromium-browser` on the PATH.
fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KAIROS_CHROMIUM") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|n| dir.join(n)))
        .find(|p| p.is_file())
}

fn node_modules() -> PathBuf {
    workspace_root().join("target/node/node_modules")
}

/// The browser and playwright-core, installing them when one is missing.
fn browser() -> Option<PathBuf> {
    let ready = || {
        find_chromium().filter(|_| {
            node_modules()
                .join("playwright-core/package.json")
                .is_file()
        })
    };
    if let Some(found) = ready() {
        return Some(found);
    }
    eprintln!("[dashboard] chromium or playwright-core missing: running scripts/browser-test.sh --install-only");
    let installed = Command::new(workspace_root().join("scripts/browser-test.sh"))
        .arg("--install-only")
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("[dashboard] scripts/browser-test.sh --install-only failed");
    }
    ready()
}

/// Skips `test` loudly, or fails it where the browser test must run.
fn skip(test: &str) {
    let message = "chromium (Debian's package) or playwright-core (npm, in target/node) \
                   is missing and could not be installed: scripts/browser-test.sh --install-only";
    assert!(!required(), "{message}");
    let bar = "!".repeat(72);
    eprintln!("\n{bar}\nSKIPPED {test}: {message}\n{bar}\n");
}

fn required() -> bool {
    std::env::var_os("CI").is_some()
        || std::env::var("KAIROS_BROWSER_TEST").is_ok_and(|v| v == "required")
}

/// A kairosctl client of the scheduler at `addr` with the token.
async fn call(
    addr: std::net::SocketAddr,
    f: impl FnOnce(&kairosctl::Api) -> Result<kairosctl::Reply, String> + Send + 'static,
) -> kairosctl::Reply {
    tokio::task::spawn_blocking(move || {
        f(&kairosctl::Api::new(&addr.to_string()).with_token(Some(TOKEN.into())))
    })
    .await
    .expect("api task")
    .expect("scheduler HTTP API")
}

async fn enqueue(addr: std::net::SocketAddr, task: Value) {
    let reply = call(addr, move |a| a.enqueue(&task)).await;
    assert_eq!(reply.status, 202, "{:?}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_chromium() {
    let Some(chromium) = browser() else {
        return skip("dashboard_in_chromium");
    };

    let env = TestEnv::new("ui").await;
    env.declare_queue(FILLED_QUEUE).await;
    env.declare_queue(FRAGILE_QUEUE).await;
    let mut tap = EventTap::new(&env).await;
    let addr = free_addr();
    let mut penv = env.process_env();
    penv.push(("KAIROS_HTTP_ADDR".into(), addr.to_string()));
    penv.push(("KAIROS_API_TOKEN".into(), TOKEN.into()));
    let _scheduler = Proc::spawn("kairos-scheduler", &penv);
    let mut wenv = env.process_env();
    wenv.push(("KAIROS_QUEUES".into(), "default".into()));
    let _worker = Proc::spawn("kairos-worker", &wenv);
    let mut fenv = env.process_env();
    fenv.push(("KAIROS_QUEUES".into(), FRAGILE_QUEUE.into()));
    let mut fragile_worker = Proc::spawn("kairos-worker", &fenv);

    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get(addr.port(), "/healthz").is_none_or(|(s, _)| s != 200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the scheduler never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The page itself needs no token, and comes with its security headers;
    // the API behind it does.
    let (status, html) = http_get(addr.port(), "/").expect("GET /");
    assert_eq!(status, 200, "{html}");
    assert!(html.contains("/ui/app.js"), "{html}");
    assert_eq!(http_get(addr.port(), "/ui/app.js").map(|r| r.0), Some(200));
    assert_eq!(http_get(addr.port(), "/v1/dead").map(|r| r.0), Some(401));

    // What the page must show: a filled queue (and one task due later), a
    // schedule and a dead letter.
    for i in 0..FILLED {
        enqueue(
            addr,
            json!({"name": "report.build", "queue": FILLED_QUEUE, "id": format!("ui-report-{i}")}),
        )
        .await;
    }
    enqueue(
        addr,
        json!({"name": "report.build", "queue": FILLED_QUEUE, "id": LATER_ID, "delay_ms": 90_000}),
    )
    .await;
    let spec = json!({"every_ms": 60_000, "task": {"name": "kairos.noop"}});
    let put = call(addr, move |a| a.put(SCHEDULE_ID, &spec)).await;
    assert_eq!(put.status, 201, "{:?}", put.body);
    enqueue(
        addr,
        json!({"name": "kairos.fail", "queue": FRAGILE_QUEUE, "id": DEAD_ID, "max_retries": 0}),
    )
    .await;
    tap.wait_until(WAIT, "the dead letter", |s| {
        s.iter().any(|e| e.id == DEAD_ID && e.kind == "dead")
    })
    .await;
    env.wait_dead_depth(1, WAIT).await;
    // Nothing reads the fragile queue from now on: the replay stays there.
    // A SIGTERM, not a kill: the worker acks the failed delivery before it
    // exits (the dead letter may come before that ack), so it is not
    // delivered again.
    fragile_worker.terminate(WAIT);
    assert_eq!(env.queue_depth(&env.names.queue(FRAGILE_QUEUE)).await, 0);

    let shots = std::env::var_os("KAIROS_UI_SCREENSHOTS").map(|d| workspace_root().join(d));
    let out = run_browser(&chromium, addr, shots.as_deref()).await;
    assert!(
        out.status.success(),
        "the browser test failed (output above)"
    );

    // The replay moved the letter back to its queue.
    let fragile = env.names.queue(FRAGILE_QUEUE);
    env.wait_depth(
        &fragile,
        WAIT,
        "the replayed task is not in its queue",
        |d| d >= 1,
    )
    .await;
    assert_eq!(env.queue_depth(&fragile).await, 1, "one replayed task");
    assert_eq!(env.queue_depth(&env.names.dead()).await, 0);
    tap.wait_until(WAIT, "the task to succeed", |s| {
        s.iter().any(|e| e.id == TASK_ID && e.kind == "succeeded")
    })
    .await;
}

/// Runs tests/browser/dashboard.mjs against the scheduler at `addr`.
async fn run_browser(
    chromium: &Path,
    addr: std::net::SocketAddr,
    shots: Option<&Path>,
) -> std::process::Output {
    let mut cmd = node("dashboard.mjs", chromium);
    cmd.env("KAIROS_UI_URL", format!("http://{addr}/"))
        .env("KAIROS_UI_TOKEN", TOKEN)
        .env("KAIROS_UI_TASK_ID", TASK_ID)
        .env("KAIROS_UI_DEAD_ID", DEAD_ID)
        .env("KAIROS_UI_SCHEDULE_ID", SCHEDULE_ID)
        .env("KAIROS_UI_QUEUE", FILLED_QUEUE)
        .env("KAIROS_UI_QUEUE_READY", FILLED.to_string())
        .env("KAIROS_UI_LATER_ID", LATER_ID)
        .env_remove("KAIROS_UI_SCREENSHOTS");
    if let Some(dir) = shots {
        std::fs::create_dir_all(dir).expect("screenshot directory");
        cmd.env("KAIROS_UI_SCREENSHOTS", dir);
    }
    output(cmd).await
}

/// `node tests/browser/SCRIPT` with the browser and playwright-core.
fn node(script: &str, chromium: &Path) -> Command {
    let mut cmd = Command::new("node");
    cmd.arg(workspace_root().join("tests/browser").join(script))
        .env("KAIROS_CHROMIUM", chromium)
        .env("KAIROS_NODE_MODULES", node_modules());
    cmd
}

/// Runs `cmd` to its end; its output goes to the test's.
async fn output(mut cmd: Command) -> std::process::Output {
    let out = tokio::task::spawn_blocking(move || {
        cmd.output()
            .expect("run node (scripts/browser-test.sh installs it)")
    })
    .await
    .expect("node task");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The page against a stand-in API with every route of docs/HTTP.md it
/// uses, including those a scheduler may not have yet, and markup in the
/// data (tests/browser/dashboard-spec.mjs): it renders everything as text
/// and calls the routes as documented. Needs no servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_against_the_documented_api() {
    let Some(chromium) = browser() else {
        return skip("dashboard_against_the_documented_api");
    };
    let mut cmd = node("dashboard-spec.mjs", &chromium);
    cmd.env(
        "KAIROS_UI_DIR",
        workspace_root().join("scheduler/src/api/ui"),
    );
    let out = output(cmd).await;
    assert!(
        out.status.success(),
        "the page failed against the documented API (output above)"
    );
}
