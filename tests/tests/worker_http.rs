//! The worker's `/healthz`, `/readyz` and `/metrics` on
//! `KAIROS_WORKER_HTTP_ADDR`, and the `worker` its events and metrics carry.

use kairos_shared::events::EventKind;
use kairos_tests::*;
use serde_json::Value;
use std::time::Duration;

/// How long a worker process may take to answer, or to become ready.
const WITHIN: Duration = Duration::from_secs(30);
/// Between two polls of an HTTP probe (nothing to await: the probe is the
/// signal).
const POLL: Duration = Duration::from_millis(50);

/// `GET PATH` on `port`, on the blocking pool.
async fn get(port: u16, path: &'static str) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || http_get(port, path))
        .await
        .ok()?
}

/// Polls `path` until it answers `status`; returns the body.
async fn wait_for(port: u16, path: &'static str, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let seen = get(port, path).await;
        if let Some((s, body)) = &seen {
            if *s == status {
                return body.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never answered {status}: last {seen:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A `kairos-worker` process in `env` with its probes on a free port.
fn worker(env: &TestEnv, id: &str, extra: &[(&str, &str)]) -> (Proc, u16) {
    Proc::worker_with_probes(env, id, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics_of_a_running_worker() {
    let env = TestEnv::new("whttp").await;
    let mut tap = EventTap::new(&env).await;
    let (_w, port) = worker(&env, "http-w1", &[]);

    let ready: Value = serde_json::from_str(&wait_for(port, "/readyz", 200).await).unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["queues"]["default"], "consuming", "{ready}");
    assert_eq!(
        ready["loops"]["amqp_session"]["state"], "running",
        "{ready}"
    );
    let (status, body) = get(port, "/healthz").await.expect("healthz");
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    assert_eq!(get(port, "/nope").await.map(|r| r.0), Some(404));

    env.publish(
        &env.names.tasks_exchange(),
        "default",
        task_props("kairos.noop", "h-1"),
        b"{}",
    )
    .await;
    tap.wait_distinct(EventKind::Succeeded, 1, WITHIN).await;
    for e in &tap.seen {
        assert_eq!(
            e.raw["worker"], "http-w1",
            "every worker event names it: {:?}",
            e.raw
        );
    }

    let metrics = wait_for(port, "/metrics", 200).await;
    let started = metrics
        .lines()
        .find(|l| l.starts_with("kairos_worker_started_total"))
        .unwrap_or_else(|| panic!("no kairos_worker_started_total in\n{metrics}"));
    assert!(started.contains(r#"worker="http-w1""#), "{started}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kairos_worker_prefetch") && l.contains(r#"queue="default""#)),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_rabbitmq_cannot_be_reached() {
    let env = TestEnv::new("whttpdown").await;
    let closed = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let (_w, port) = worker(&env, "http-down", &[("KAIROS_AMQP_URL", &closed)]);

    // Alive, but not ready: it keeps trying to connect.
    assert_eq!(wait_for(port, "/healthz", 200).await, r#"{"status":"ok"}"#);
    let body: Value = serde_json::from_str(&wait_for(port, "/readyz", 503).await).unwrap();
    assert_eq!(body["status"], "unavailable");
    let failing = body["failing"].as_array().expect("failing").clone();
    assert!(failing.contains(&Value::from("amqp_session")), "{body}");
    assert!(failing.contains(&Value::from("queue:default")), "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("RabbitMQ"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_address_fails_at_start_naming_the_setting() {
    let env = TestEnv::new("whttpbind").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let log = std::env::temp_dir().join(format!("{}-worker.log", env.ns));
    let mut penv = env.process_env();
    penv.push((
        "KAIROS_WORKER_HTTP_ADDR".into(),
        format!("127.0.0.1:{port}"),
    ));
    let mut w = Proc::spawn_logged("kairos-worker", &penv, &log);

    let deadline = std::time::Instant::now() + WITHIN;
    let status = loop {
        if let Some(status) = w.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker kept running"
        );
        tokio::time::sleep(POLL).await;
    };
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(!status.success());
    assert!(out.contains("KAIROS_WORKER_HTTP_ADDR"), "{out}");
}
