//! The due-soon gauges on the scheduler's `/metrics`: delayed tasks and
//! schedule ticks held in Redis and due within `KAIROS_DUE_SOON_S` are
//! counted (per queue for tasks); later ones are not.

use kairos_tests::*;
use serde_json::json;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The window of the test: not the default (60 s), so the setting is seen
/// to be used.
const WINDOW_S: u64 = 120;

/// The value of the sample named exactly `series` (name and labels) in a
/// Prometheus text exposition.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_tasks_and_ticks_due_within_the_window_are_gauged() {
    let env = TestEnv::new("due-soon").await;
    let mut sc = env.scheduler_config();
    let addr = free_addr();
    sc.http_addr = addr;
    sc.due_soon_s = WINDOW_S;
    let scheduler = InProcess::scheduler(sc);
    let api = ScheduleApi::new(addr);
    api.wait_ready(Duration::from_secs(30)).await;

    // Within the window: 3 on `default`, 1 on `reports`; outside it: 2 on
    // `default` (10 minutes).
    for (i, (queue, delay_ms)) in [
        ("default", 90_000),
        ("default", 90_000),
        ("default", 100_000),
        ("reports", 60_000),
        ("default", 600_000),
        ("default", 600_000),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("due-{i}");
        let props = delayed_props("kairos.noop", &id, delay_ms);
        env.publish(&env.names.delay(), queue, props, b"{}").await;
    }
    // One schedule ticks within the window, one in an hour.
    let soon = json!({"at": now_ms() + 90_000, "task": {"name": "kairos.noop"}});
    let later = json!({"at": now_ms() + 3_600_000, "task": {"name": "kairos.noop"}});
    assert_eq!(api.put("soon", soon).await.status, 201);
    assert_eq!(api.put("later", later).await.status, 201);

    let want = [
        ("kairos_tasks_due_soon{queue=\"default\"}", 3.0),
        ("kairos_tasks_due_soon{queue=\"reports\"}", 1.0),
        ("kairos_schedules_due_soon", 1.0),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let port = addr.port();
    loop {
        let scraped = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
            .await
            .expect("scrape task");
        let body = scraped.map(|(_, b)| b).unwrap_or_default();
        let seen: Vec<Option<f64>> = want.iter().map(|(s, _)| sample(&body, s)).collect();
        if want.iter().zip(&seen).all(|((_, v), s)| *s == Some(*v)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gauges never reached {want:?}: saw {seen:?} in\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_task_status_only_schedules_are_gauged() {
    // A process of its own: the metrics recorder is one per process.
    let env = TestEnv::new("due-soon-nostatus").await;
    let port = free_port();
    let mut penv: Vec<(String, String)> = env
        .process_env()
        .into_iter()
        .filter(|(k, _)| k != "KAIROS_HTTP_ADDR")
        .collect();
    penv.push(("KAIROS_HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
    penv.push(("KAIROS_STATUS".into(), "false".into()));
    let _scheduler = Proc::spawn("kairos-scheduler", &penv);
    let api = ScheduleApi::new(([127, 0, 0, 1], port).into());
    api.wait_ready(Duration::from_secs(30)).await;

    let props = delayed_props("kairos.noop", "held-1", 30_000);
    env.publish(&env.names.delay(), "default", props, b"{}")
        .await;
    let soon = json!({"at": now_ms() + 30_000, "task": {"name": "kairos.noop"}});
    assert_eq!(api.put("soon", soon).await.status, 201);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let scraped = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
            .await
            .expect("scrape task");
        let body = scraped.map(|(_, b)| b).unwrap_or_default();
        if sample(&body, "kairos_schedules_due_soon") == Some(1.0) {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "kairos_schedules_due_soon never reached 1 in\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        !body.contains("kairos_tasks_due_soon"),
        "no wait sets without the status, so no per-queue gauge:\n{body}"
    );
}
