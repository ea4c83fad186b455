//! The tasks part of the HTTP API, for clients that would rather speak
//! HTTP than AMQP (docs/HTTP.md):
//!
//! * `POST /v1/tasks`: enqueue one task (JSON, see `kairos_shared::request`);
//!   202 with its id once the broker confirmed it (a delayed task: once it
//!   is in the delay queue, see `crate::delay::hold`); 409 when a delayed task's
//!   id is already pending; 413 when the body is over its limit. The
//!   request's own `traceparent` (and `tracestate`) HTTP header is taken
//!   when the task's `headers` have none
//! * the dead-letter routes of `super::dead`, over the same broker
//! * `GET /healthz`: 200 while the process runs
//!
//! Errors are JSON `{"error": "...", "field": "..."}`: 400 for bad input, 503
//! when the broker cannot be reached, blocks publishing (a resource alarm),
//! or does not confirm within [`ENQUEUE_TIMEOUT`].
//!
//! Enqueues share one connection and channel, and only taking (or making)
//! that connection is serialized: publish and confirm run outside the lock,
//! so concurrent requests have their confirms outstanding together instead
//! of queueing behind one another's round trip.

use super::json_error;
use super::openapi::ErrorBody;
use crate::delay::hold::{Held, HoldError, Holder};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use kairos_shared::amqp::{Blocked, Broker};
use kairos_shared::client::{Client, ClientError};
use kairos_shared::contract::{Names, ProtocolError};
use kairos_shared::limits::Limits;
use kairos_shared::request::{self, RequestError};
use kairos_shared::template::TaskTemplate;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

/// The longest an enqueue waits for the broker (connect, publish and
/// confirm) before answering 503. A blocked broker (resource alarm) takes
/// publishes without confirming them until the alarm clears.
pub const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// Shared by the handlers: one broker connection, made on first use and
/// made again after it failed.
#[derive(Clone)]
pub struct TaskApi {
    broker: Broker,
    names: Names,
    /// Held only to take a clone of the connected client or to connect.
    client: Arc<Mutex<Option<Connected>>>,
    limits: Limits,
    /// Where delayed tasks go when set: straight into the delay queue.
    holder: Option<Holder>,
}

#[derive(Clone)]
struct Connected {
    client: Arc<Client>,
    blocked: Blocked,
}

impl TaskApi {
    /// The API over `broker` in namespace `names`, with default limits and
    /// no holder (delayed tasks go to `NS.delay`).
    pub fn new(broker: Broker, names: Names) -> Self {
        TaskApi {
            broker,
            names,
            client: Arc::new(Mutex::new(None)),
            limits: Limits::default(),
            holder: None,
        }
    }

    /// The limits requests are checked against (the scheduler's settings).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Holds delayed tasks in the delay queue directly, so a duplicate id
    /// can be answered with 409.
    pub(crate) fn with_holder(mut self, holder: Holder) -> Self {
        self.holder = Some(holder);
        self
    }

    /// Largest request accepted: a body at its cap, JSON-escaped, and room
    /// for the rest of the request.
    fn request_limit(&self) -> usize {
        self.limits
            .max_body_bytes
            .saturating_mul(2)
            .saturating_add(64 * 1024)
    }
}

/// The task routes: enqueue (`POST /v1/tasks`), the dead letters (see
/// `super::dead`) and `/healthz`, over `api`.
pub(crate) fn routes(api: TaskApi) -> OpenApiRouter {
    let dead = super::dead::router(super::dead::DeadApi::new(
        api.broker.clone(),
        api.names.clone(),
    ));
    let limit = DefaultBodyLimit::max(api.request_limit());
    OpenApiRouter::default()
        .routes(routes!(enqueue).layer(limit))
        .routes(routes!(healthz))
        .with_state(api)
        .merge(dead)
}

/// [`routes`] as a plain axum router, without the OpenAPI document (the
/// benchmark serves it alone).
pub fn router(api: TaskApi) -> Router {
    routes(api).split_for_parts().0
}

/// Liveness: answers while the process runs.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "probes",
    security(()),
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Object))
)]
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Why a task route failed; each maps to one HTTP status (see
/// `IntoResponse`).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is not a valid task (400).
    #[error("{0}")]
    Invalid(#[from] RequestError),
    /// RabbitMQ or the delay queue could not take it now (503). The text
    /// says which and why; it never holds a URL or secret.
    #[error("broker: {0}")]
    Broker(String),
    /// RabbitMQ blocks publishers (a memory or disk alarm) (503).
    #[error("broker: RabbitMQ blocks publishing (memory or disk alarm); retry later")]
    Blocked,
    /// A size limit was exceeded (413).
    #[error("{message}")]
    TooLarge {
        /// The request field over its limit.
        field: &'static str,
        /// What the limit is and by how much it was exceeded.
        message: String,
    },
    /// A task with this id is already pending (409).
    #[error("task {0} is already pending: the first submission wins")]
    Duplicate(String),
}

impl From<HoldError> for ApiError {
    fn from(e: HoldError) -> Self {
        match e {
            HoldError::Invalid(ProtocolError::OverLimit(message)) => ApiError::TooLarge {
                field: if message.contains("KAIROS_MAX_HEADER_BYTES") {
                    "headers"
                } else {
                    "body"
                },
                message,
            },
            HoldError::Invalid(p) => ApiError::Invalid(RequestError {
                field: "task",
                message: p.to_string(),
            }),
            HoldError::Client(c) => c.into(),
            HoldError::Queue(q) => ApiError::Broker(format!("delay queue: {q}")),
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Invalid(p) => ApiError::Invalid(RequestError {
                field: "task",
                message: p.to_string(),
            }),
            other => ApiError::Broker(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, detail) = match &self {
            ApiError::Invalid(e) => (StatusCode::BAD_REQUEST, Some(("field", json!(e.field)))),
            ApiError::TooLarge { field, .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, Some(("field", json!(field))))
            }
            ApiError::Duplicate(id) => (StatusCode::CONFLICT, Some(("id", json!(id)))),
            ApiError::Broker(e) => {
                tracing::warn!(cause = %e, "task API: broker failed");
                (StatusCode::SERVICE_UNAVAILABLE, None)
            }
            ApiError::Blocked => {
                let (status, body) = json_error(StatusCode::SERVICE_UNAVAILABLE, &self, None);
                return (status, [(axum::http::header::RETRY_AFTER, "5")], body).into_response();
            }
        };
        json_error(status, &self, detail).into_response()
    }
}

/// Runs `f` with the shared client, within [`ENQUEUE_TIMEOUT`]; a broker
/// failure drops the connection so the next request connects again.
///
/// A timeout keeps the connection: lapin may still hold the publish and
/// send it when the broker unblocks, so the task may yet be enqueued (the
/// 503 says the outcome is unknown; a client retries with the same `id`).
async fn with_client<T>(
    api: &TaskApi,
    f: impl AsyncFnOnce(&Client) -> Result<T, ClientError>,
) -> Result<T, ApiError> {
    let connected = tokio::time::timeout(ENQUEUE_TIMEOUT, connected(api))
        .await
        .map_err(|_| ApiError::Broker("cannot connect in time".into()))??;
    if connected.blocked.is_blocked() {
        return Err(ApiError::Blocked);
    }
    match tokio::time::timeout(ENQUEUE_TIMEOUT, f(&connected.client)).await {
        Err(_) if connected.blocked.is_blocked() => Err(ApiError::Blocked),
        Err(_) => Err(ApiError::Broker(format!(
            "not confirmed within {} ms; the task may still be enqueued (retry with the same id)",
            ENQUEUE_TIMEOUT.as_millis()
        ))),
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e @ ClientError::Invalid(_))) => Err(e.into()),
        Ok(Err(e)) => {
            // Only the client that failed is dropped: another request may
            // have replaced it already.
            let mut guard = api.client.lock().await;
            if guard
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(&c.client, &connected.client))
            {
                *guard = None;
            }
            Err(e.into())
        }
    }
}

/// The shared client, connecting first if there is none.
async fn connected(api: &TaskApi) -> Result<Connected, ApiError> {
    let mut guard = api.client.lock().await;
    if let Some(c) = guard.as_ref() {
        return Ok(c.clone());
    }
    // The scheduler's own names carry its queue orders (`KAIROS_QUEUE_ORDER`).
    let client = Client::connect_with(&api.broker, api.names.clone()).await?;
    let c = Connected {
        blocked: Blocked::watch(client.connection()),
        client: Arc::new(client),
    };
    *guard = Some(c.clone());
    Ok(c)
}

/// Enqueues one task, as if published per the wire contract; with
/// `run_at` or `delay_ms` it goes into the delay queue. Answers once the
/// broker confirmed it (or it is durable in Redis).
#[utoipa::path(
    post,
    path = "/v1/tasks",
    tag = "tasks",
    request_body = TaskTemplate,
    params(
        ("traceparent" = Option<String>, Header, description = "W3C trace context for the task when its `headers` carry none"),
        ("tracestate" = Option<String>, Header, description = "W3C trace state, taken with `traceparent`"),
    ),
    responses(
        (status = 202, description = "Accepted: `{\"id\", \"queue\", \"delayed\"}`", body = Enqueued),
        (status = 400, description = "Not a valid task; `field` names the fault", body = ErrorBody),
        (status = 409, description = "A delayed task with this id is already pending; `id` names it", body = ErrorBody),
        (status = 413, description = "The body (`field`: `body`) or headers are over their limit", body = ErrorBody),
        (status = 503, description = "The broker cannot be reached, blocks publishing (with `Retry-After`), or did not confirm in time", body = ErrorBody),
    )
)]
async fn enqueue(
    State(api): State<TaskApi>,
    http_headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| body_rejection(e, &api))?;
    let task = kairos_shared::trace::adopt_http_traceparent(
        request::from_json(&body)?,
        header_text(&http_headers, "traceparent"),
        header_text(&http_headers, "tracestate"),
    );
    api.limits
        .check_body(task.body.len())
        .map_err(|e| ApiError::TooLarge {
            field: "body",
            message: e.to_string(),
        })?;
    let now = kairos_shared::amqp::now_ms();
    if let Err(e) = api.limits.check_due(task.run_at, task.delay_ms, now) {
        let field = if task.run_at.is_some() {
            "run_at"
        } else {
            "delay_ms"
        };
        return Err(RequestError {
            field,
            message: e.to_string(),
        }
        .into());
    }
    let queue = task.queue.clone();
    let delayed = task.run_at.is_some() || task.delay_ms.is_some();
    let id = match (&api.holder, delayed) {
        (Some(holder), true) => match holder.hold(&task).await? {
            Held::Added { id, .. } => id,
            Held::Duplicate { id } => return Err(ApiError::Duplicate(id)),
        },
        _ => with_client(&api, async |c: &Client| c.enqueue(task).await).await?,
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "queue": queue, "delayed": delayed})),
    )
        .into_response())
}

/// An HTTP header's value as text, when it is one.
fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A request body that could not be read: over the size limit (413, JSON
/// like every other error) or broken.
fn body_rejection(e: BytesRejection, api: &TaskApi) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge {
            field: "body",
            message: format!(
                "request larger than {} bytes (twice KAIROS_MAX_BODY_BYTES, {} bytes, and 64 KiB)",
                api.request_limit(),
                api.limits.max_body_bytes
            ),
        }
    } else {
        ApiError::Invalid(RequestError {
            field: "body",
            message: e.body_text(),
        })
    }
}

/// The answer of `POST /v1/tasks`.
#[derive(utoipa::ToSchema)]
// Only describes the JSON that `enqueue` builds: never constructed.
#[allow(dead_code)]
struct Enqueued {
    /// The task id: the one given, or a new UUIDv7.
    id: String,
    /// Its logical queue.
    queue: String,
    /// Whether it went into the delay queue (`run_at` or `delay_ms`).
    delayed: bool,
}
