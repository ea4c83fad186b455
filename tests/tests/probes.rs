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
