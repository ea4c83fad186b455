//! Readiness and metrics on `KAIROS_HTTP_ADDR`:
//!
//! * `GET /readyz` (no token): 200 when Redis and RabbitMQ answer and every
//!   background loop runs; else 503 with a JSON body naming what does not.
//!   The Redis and RabbitMQ checks are cheap (`PING`; a channel opened and
//!   closed on a connection kept for the purpose), bounded by
//!   [`CHECK_TIMEOUT`], and their result is reused for [`CACHE_FOR`], so a
//!   probe storm costs the servers nothing.
//! * `GET /metrics` (behind the token like the rest of the API): the
//!   process's metrics in the Prometheus text format.
//!
//! `/healthz` (liveness) is in the task API.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kairos_shared::amqp::{close_connection, connect_to, Broker};
use kairos_shared::redis::RedisPool;
use kairos_shared::supervise::Health;
use lapin::Connection;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The longest one check of Redis or RabbitMQ may take.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a check's result is reused.
pub(crate) const CACHE_FOR: Duration = Duration::from_secs(1);

/// Loops that must have started (connected) before the scheduler is ready:
/// until then they are not in the health map at all.
const EXPECTED_LOOPS: [&str; 1] = ["amqp_session"];

/// What `/readyz` looks at. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Probes {
    health: Health,
    checks: Arc<Checks>,
}

struct Checks {
    redis: RedisPool,
    broker: Broker,
    /// The connection RabbitMQ checks open their channel on; made again
    /// when it is gone.
    amqp: Mutex<Option<Connection>>,
    /// The last result and when it was taken.
    last: Mutex<Option<(Instant, Servers)>>,
}

/// The outcome of one round of checks.
#[derive(Clone)]
struct Servers {
    redis: Check,
    rabbitmq: Check,
}

#[derive(Clone)]
struct Check {
    error: Option<String>,
    ms: u128,
}

impl Check {
    fn json(&self) -> Value {
        match &self.error {
            None => json!({"ok": true, "ms": self.ms}),
            Some(e) => json!({"ok": false, "ms": self.ms, "error": e}),
        }
    }
}

impl Probes {
    /// Probes of the loops in `health`, Redis behind `redis` and the broker.
    /// The probe's RabbitMQ connection is closed when `stop` fires.
    pub(crate) fn new(
        health: Health,
        redis: RedisPool,
        broker: Broker,
        stop: CancellationToken,
    ) -> Self {
        let checks = Arc::new(Checks {
            redis,
            broker,
            amqp: Mutex::new(None),
            last: Mutex::new(None),
        });
        let closing = checks.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            if let Some(conn) = closing.amqp.lock().await.take() {
                close_connection(&conn, "shutdown", CHECK_TIMEOUT).await;
            }
        });
        Probes { health, checks }
    }
}

/// `/readyz` and `/metrics` over `probes`.
pub(crate) fn router(probes: Probes) -> OpenApiRouter {
    OpenApiRouter::default()
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .with_state(probes)
}

/// Readiness: whether Redis and RabbitMQ answer and every background
/// loop of the scheduler runs. Needs no token.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "probes",
    security(()),
    responses(
        (status = 200, description = "Ready: `{\"status\": \"ready\", \"checks\": {\"redis\", \"rabbitmq\"}, \"loops\": {...}}`", body = Object),
        (status = 503, description = "Not ready: `{\"status\": \"unavailable\", \"error\", \"failing\": [...], \"checks\", \"loops\"}`", body = Object),
    )
)]
async fn readyz(State(probes): State<Probes>) -> Response {
    let servers = probes.checks.servers().await;
    let loops = probes.health.snapshot();
    let mut failing: Vec<String> = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    for (name, check) in [("redis", &servers.redis), ("rabbitmq", &servers.rabbitmq)] {
        if let Some(e) = &check.error {
            failing.push(name.to_string());
            reasons.push(format!("{name}: {e}"));
        }
    }
    let mut down = probes.health.failing();
    for expected in EXPECTED_LOOPS {
        if !loops.contains_key(expected) {
            down.push(expected.to_string());
        }
    }
    if !down.is_empty() {
        reasons.push(format!("background loops not running: {}", down.join(", ")));
        failing.extend(down);
    }
    let checks = json!({"redis": servers.redis.json(), "rabbitmq": servers.rabbitmq.json()});
    if failing.is_empty() {
        let body = json!({"status": "ready", "checks": checks, "loops": loops});
        (StatusCode::OK, Json(body)).into_response()
    } else {
        let body = json!({
            "status": "unavailable",
            "error": format!("not ready: {}", reasons.join("; ")),
            "failing": failing,
            "checks": checks,
            "loops": loops,
        });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// The process's metrics in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "probes",
    responses(
        (status = 200, description = "Prometheus text exposition", content_type = "text/plain; version=0.0.4", body = String),
        (status = 404, description = "Metrics go to the recorder of a program embedding Kairos", body = super::openapi::ErrorBody),
    )
)]
async fn metrics() -> Response {
    match kairos_shared::metrics::render() {
        Some(text) => (
            [(header::CONTENT_TYPE, kairos_shared::metrics::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        None => super::json_error(
            StatusCode::NOT_FOUND,
            "metrics go to the recorder of the program embedding Kairos",
            None,
        )
        .into_response(),
    }
}

impl Checks {
    /// The last result when fresh, else a new round (one at a time: other
    /// probes wait for it and share it).
    async fn servers(&self) -> Servers {
        let mut last = self.last.lock().await;
        if let Some((at, servers)) = last.as_ref() {
            if at.elapsed() < CACHE_FOR {
                return servers.clone();
            }
        }
        let (redis, rabbitmq) =
            tokio::join!(timed(self.check_redis()), timed(self.check_rabbitmq()));
        let servers = Servers { redis, rabbitmq };
        *last = Some((Instant::now(), servers.clone()));
        servers
    }

    async fn check_redis(&self) -> Result<(), String> {
        let mut conn = self.redis.get().await.map_err(|e| e.to_string())?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(format!("PING answered {pong:?}"))
        }
    }

    /// Opens and closes a channel: a round trip to the broker, on a
    /// connection kept between checks.
    async fn check_rabbitmq(&self) -> Result<(), String> {
        let mut kept = self.amqp.lock().await;
        let outcome = tokio::time::timeout(CHECK_TIMEOUT, async {
            if !kept.as_ref().is_some_and(|c| c.status().connected()) {
                *kept = Some(connect_to(&self.broker, "kairos-scheduler-readyz").await?);
            }
            match kept.as_ref() {
                Some(conn) => {
                    let channel = conn.create_channel().await?;
                    channel.close(200, "readyz".into()).await
                }
                None => Ok(()),
            }
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                kept.take();
                Err(e.to_string())
            }
            Err(_) => {
                // A connection that does not answer is not kept.
                kept.take();
                Err(format!("no answer within {} ms", CHECK_TIMEOUT.as_millis()))
            }
        }
    }
}

/// Runs one check within [`CHECK_TIMEOUT`], timing it.
async fn timed(check: impl Future<Output = Result<(), String>>) -> Check {
    let started = Instant::now();
    let error = match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!("no answer within {} ms", CHECK_TIMEOUT.as_millis())),
    };
    Check {
        error,
        ms: started.elapsed().as_millis(),
    }
}
