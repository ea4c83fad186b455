//! `/readyz` (Redis, RabbitMQ, background loops) and `/metrics` on the
//! scheduler's HTTP address, with and without the API token.

use kairos_tests::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::time::Duration;

/// A request with `headers` to the scheduler on `port`: (status, headers
/// and body).
fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<(u16, String, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((status, head.to_string(), body.to_string()))
}

/// `/readyz` on `port` as (status, JSON), on the blocking pool.
async fn readyz(port: u16) -> Option<(u16, Value)> {
    let r = tokio::task::spawn_blocking(move || get(port, "/readyz", &[]))
        .await
        .ok()??;
    Some((r.0, serde_json::from_str(&r.2).ok()?))
}

/// Polls `/readyz` until `want(status, body)` holds.
async fn readyz_until(port: u16, what: &str, want: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = readyz(port).await;
        if let Some((status, body)) = &seen {
            if want(*status, body) {
                return body.clone();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never showed {what}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_checks_the_servers_and_metrics_are_served_behind_the_token() {
    let env = TestEnv::new("probes").await;
    let mut tap = EventTap::new(&env).await;
    let mut sc = env.scheduler_config();
    let addr = free_addr();
    sc.http_addr = addr;
    sc.api_token = Some(kairos_shared::secrets::Secret::new("s3cret-token"));
    let scheduler = InProcess::scheduler(sc);
    let port = addr.port();

    let ready = readyz_until(port, "ready", |s, _| s == 200).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["checks"]["redis"]["ok"], true, "{ready}");
    assert_eq!(ready["checks"]["rabbitmq"]["ok"], true, "{ready}");
    assert_eq!(
        ready["loops"]["amqp_session"]["state"], "running",
        "{ready}"
    );

    // A delayed task goes through, so the counters have something to say.
    env.publish(
        &env.names.delay(),
        "default",
        delayed_props("kairos.noop", "probe-1", 10),
        b"{}",
    )
    .await;
    tap.wait_distinct(
        kairos_shared::events::EventKind::Published,
        1,
        Duration::from_secs(20),
    )
    .await;

    let (status, _, _) = get(port, "/metrics", &[]).expect("answers");
    assert_eq!(status, 401, "/metrics needs the token");
    let bearer = [("Authorization", "Bearer s3cret-token")];
    let (status, head, body) = get(port, "/metrics", &bearer).expect("answers");
    assert_eq!(status, 200, "{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    for name in [
        "kairos_scheduler_published_total",
        "kairos_scheduler_held_total",
        "# TYPE kairos_scheduler_publish_lateness_seconds histogram",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_redis_when_it_stops_answering_and_recovers() {
    let env = TestEnv::new("probes-redis").await;
    let redis = OwnRedis::start();
    let mut sc = env.scheduler_config();
    sc.redis_url = redis.url();
    let addr = free_addr();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let port = addr.port();
    readyz_until(port, "ready", |s, _| s == 200).await;

    redis.pause();
    let down = readyz_until(port, "Redis down", |s, b| {
        s == 503 && b["checks"]["redis"]["ok"] == false
    })
    .await;
    let failing: Vec<&str> = down["failing"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(failing.contains(&"redis"), "{down}");
    assert!(!failing.contains(&"rabbitmq"), "{down}");
    let error = down["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("not ready: redis: "), "{down}");

    redis.resume();
    readyz_until(port, "ready again", |s, _| s == 200).await;
    scheduler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_rabbitmq_and_the_session_while_the_broker_is_unreachable() {
    let env = TestEnv::new("probes-amqp").await;
    let mut sc = env.scheduler_config();
    // Nothing listens there: the scheduler serves its API (Redis is fine)
    // while its AMQP session keeps trying to connect.
    sc.common.amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let addr = free_addr();
    sc.http_addr = addr;
    let scheduler = InProcess::scheduler(sc);
    let down = readyz_until(addr.port(), "RabbitMQ down", |s, _| s == 503).await;
    let failing: Vec<&str> = down["failing"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(failing, ["rabbitmq", "amqp_session"], "{down}");
    assert_eq!(down["checks"]["redis"]["ok"], true, "{down}");
    assert!(down["checks"]["rabbitmq"]["error"].is_string(), "{down}");
    scheduler.stop().await;
}

/// The words `kairos_...` of `text`, histogram suffixes removed.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("kairos_") && w.len() > "kairos_".len())
        .map(|w| {
            w.trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
                .to_string()
        })
        .collect()
}

/// The metric names the code records (`counter!("kairos_...")` and the like).
fn recorded_metrics(dir: &std::path::Path, out: &mut std::collections::BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("source dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            recorded_metrics(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("source");
            for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                for part in text.split(macro_name).skip(1) {
                    if let Some(name) = part.trim_start().strip_prefix('"') {
                        if let Some(end) = name.find('"') {
                            out.insert(name[..end].to_string());
                        }
                    }
                }
            }
        }
    }
}

/// The Grafana dashboard uses only metrics the code records, and
/// docs/OPERATIONS.md lists every one of them.
#[test]
fn the_dashboard_and_the_docs_name_real_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let mut recorded = std::collections::BTreeSet::new();
    for krate in ["shared", "scheduler", "worker"] {
        recorded_metrics(&root.join(krate).join("src"), &mut recorded);
    }
    assert!(recorded.len() > 20, "{recorded:?}");
    let dashboard = std::fs::read_to_string(root.join("deploy/grafana/kairos.json"))
        .expect("deploy/grafana/kairos.json");
    let _: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let used = metric_names(&dashboard);
    let unknown: Vec<_> = used.difference(&recorded).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard uses unknown metrics: {unknown:?}"
    );
    let docs = std::fs::read_to_string(root.join("docs/OPERATIONS.md")).expect("docs");
    // The metrics table: rows that start with a metric name.
    let rows: Vec<&str> = docs
        .lines()
        .filter(|l| l.starts_with("| `kairos_"))
        .collect();
    let documented = metric_names(&rows.join("\n"));
    let missing: Vec<_> = recorded.difference(&documented).collect();
    assert!(missing.is_empty(), "docs/OPERATIONS.md misses {missing:?}");
    let stale: Vec<_> = documented.difference(&recorded).collect();
    assert!(
        stale.is_empty(),
        "docs/OPERATIONS.md names unknown metrics {stale:?}"
    );
}
