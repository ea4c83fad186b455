//! Control routes: what reaches every worker through `NS.control`
//! (`kairos_shared::control`), and the state that outlives the message.
//!
//! * `POST /v1/queues/{name}/pause` / `resume`: `SADD`/`SREM NS:paused`,
//!   then the message; 200 `{"name","paused"}`. The set is what counts:
//!   workers read it at start and every 5 s, so a message that reaches no
//!   worker (none is connected, or the publish failed after the set
//!   changed) still takes effect.
//! * `POST /v1/tasks/{id}/abort`: a `running` task gets the message and
//!   202 `{"id","state":"running","abort":"requested"}`; a `scheduled` or
//!   `retrying` one is cancelled as `DELETE /v1/tasks/{id}` does (200
//!   `{"id","state":"cancelled"}`); any other state 409 with it; an
//!   unknown id 404.
//!
//! [`ControlApi`] is shared with `super::queues` (`GET /v1/queues`): one
//! AMQP connection, made on first use and made again after it failed, and
//! the delay queue's Redis.

use super::json_error;
use super::openapi::ErrorBody;
use super::status::StatusApi;
use crate::redis_io::conn::RedisConn;
use crate::redis_io::status_calls::Cancelled;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kairos_shared::amqp::Broker;
use kairos_shared::contract::{validate_queue, Names};
use kairos_shared::control::{self, ControlMessage};
use kairos_shared::status::{ShardCount, StatusStore, TaskState};
use lapin::options::ConfirmSelectOptions;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The longest a control route waits for the broker (connect, publish and
/// confirm) or for Redis before answering 503.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// What the control and queue routes share.
#[derive(Clone)]
pub(crate) struct ControlApi {
    pub(crate) broker: Broker,
    pub(crate) names: Names,
    /// The delay queue's Redis (a connection of its own).
    pub(crate) redis: RedisConn,
    /// The delay queue's shard count (also the status keys' `{S}`).
    pub(crate) shards: usize,
    /// Task statuses: what an abort finds (reads only).
    status: StatusStore,
    /// The cancel of a task waiting in the delay queue (`DELETE
    /// /v1/tasks/{id}`'s).
    cancel: StatusApi,
    conn: Arc<Mutex<Option<Arc<lapin::Connection>>>>,
}

impl ControlApi {
    /// The routes' state over `broker` and `redis` in namespace `names`.
    pub(crate) fn new(
        broker: Broker,
        names: Names,
        redis: RedisConn,
        shards: usize,
        cancel: StatusApi,
    ) -> Self {
        // Reads only: the TTL is not used.
        let status = StatusStore::new(
            redis.clone(),
            names.namespace(),
            ShardCount::known(shards),
            kairos_shared::status::DEFAULT_TTL_S,
        );
        ControlApi {
            broker,
            names,
            redis,
            shards,
            status,
            cancel,
            conn: Arc::default(),
        }
    }

    /// The shared connection, connecting first if there is none or it is
    /// gone.
    pub(crate) async fn connection(&self) -> Result<Arc<lapin::Connection>, ControlError> {
        let mut guard = self.conn.lock().await;
        if let Some(conn) = guard.as_ref() {
            if conn.status().connected() {
                return Ok(conn.clone());
            }
        }
        let conn = kairos_shared::amqp::connect_to(&self.broker, "kairos-http-control")
            .await
            .map_err(|e| ControlError::Broker(e.to_string()))?;
        let conn = Arc::new(conn);
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// A new channel on the shared connection.
    pub(crate) async fn channel(&self) -> Result<lapin::Channel, ControlError> {
        Ok(self.connection().await?.create_channel().await?)
    }

    /// Publishes `message` to `NS.control` and waits for the broker's
    /// confirm.
    async fn publish(&self, message: &ControlMessage) -> Result<(), ControlError> {
        let send = async {
            let channel = self.channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            let confirm = control::publish(&channel, &self.names, message).await?;
            let _ = channel.close(200, "done".into()).await;
            if confirm.is_nack() {
                return Err(ControlError::Broker(
                    "the broker refused the message".into(),
                ));
            }
            Ok(())
        };
        tokio::time::timeout(CONTROL_TIMEOUT, send)
            .await
            .map_err(|_| ControlError::Broker("no confirm in time".into()))?
    }

    /// Runs `pipe` on the Redis connection, within [`CONTROL_TIMEOUT`].
    pub(crate) async fn redis<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, ControlError> {
        let query = async {
            let mut con = self
                .redis
                .get()
                .await
                .map_err(|e| ControlError::Redis(e.to_string()))?;
            self.redis
                .watch(con.query_pipe(pipe).await)
                .map_err(|e| ControlError::Redis(e.to_string()))
        };
        tokio::time::timeout(CONTROL_TIMEOUT, query)
            .await
            .map_err(|_| ControlError::Redis("no reply in time".into()))?
    }
}

/// Why a control or queue route failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    /// Not a queue name (400).
    #[error("{0}")]
    BadQueue(String),
    /// RabbitMQ could not be reached or did not confirm (503).
    #[error("broker: {0}")]
    Broker(String),
    /// Redis could not be reached (503).
    #[error("redis: {0}")]
    Redis(String),
    /// No such task, or its status expired (404).
    #[error("no task {0}")]
    NotFound(String),
    /// The task is in a state that cannot be aborted (409).
    #[error("task {id} is {state}: only a running, scheduled or retrying task can be aborted")]
    Conflict {
        /// The task id.
        id: String,
        /// Its state.
        state: String,
    },
}

impl From<lapin::Error> for ControlError {
    fn from(e: lapin::Error) -> Self {
        ControlError::Broker(e.to_string())
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let (status, detail) = match &self {
            ControlError::BadQueue(_) => (StatusCode::BAD_REQUEST, Some(("field", json!("name")))),
            ControlError::Broker(e) | ControlError::Redis(e) => {
                tracing::warn!(cause = %e, "control API: {}", self);
                (StatusCode::SERVICE_UNAVAILABLE, None)
            }
            ControlError::NotFound(id) => (StatusCode::NOT_FOUND, Some(("id", json!(id)))),
            ControlError::Conflict { id, state } => {
                let (status, Json(mut body)) = json_error(StatusCode::CONFLICT, &self, None);
                body["id"] = json!(id);
                body["state"] = json!(state);
                return (status, Json(body)).into_response();
            }
        };
        json_error(status, &self, detail).into_response()
    }
}

/// The control routes: pause, resume, abort.
pub(crate) fn router(api: ControlApi) -> OpenApiRouter {
    OpenApiRouter::default()
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(abort))
        .with_state(api)
}

/// Pauses a queue: every worker stops taking its tasks (running ones
/// finish); tasks keep arriving and wait. Kept in Redis, so it outlives
/// worker restarts.
#[utoipa::path(
    post,
    path = "/v1/queues/{name}/pause",
    operation_id = "pause_queue",
    tag = "queues",
    params(("name" = String, Path, description = "The logical queue")),
    responses(
        (status = 200, description = "`{\"name\", \"paused\": true}`, also when it was paused already", body = Object),
        (status = 400, description = "Not a queue name (`field`: `name`)", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn pause(
    State(api): State<ControlApi>,
    Path(name): Path<String>,
) -> Result<Response, ControlError> {
    set_paused(&api, name, true).await
}

/// Resumes a paused queue: the workers consume it again.
#[utoipa::path(
    post,
    path = "/v1/queues/{name}/resume",
    operation_id = "resume_queue",
    tag = "queues",
    params(("name" = String, Path, description = "The logical queue")),
    responses(
        (status = 200, description = "`{\"name\", \"paused\": false}`, also when it was not paused", body = Object),
        (status = 400, description = "Not a queue name (`field`: `name`)", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn resume(
    State(api): State<ControlApi>,
    Path(name): Path<String>,
) -> Result<Response, ControlError> {
    set_paused(&api, name, false).await
}

/// Records the pause (or its end) in `NS:paused`, then tells the workers.
/// A failed publish is logged, not answered: the workers' next read of the
/// set (within 5 s) takes the change.
async fn set_paused(
    api: &ControlApi,
    name: String,
    paused: bool,
) -> Result<Response, ControlError> {
    validate_queue(&name).map_err(ControlError::BadQueue)?;
    let mut pipe = redis::pipe();
    let key = control::paused_key(&api.names);
    if paused {
        pipe.cmd("SADD").arg(&key).arg(&name).ignore();
    } else {
        pipe.cmd("SREM").arg(&key).arg(&name).ignore();
    }
    api.redis::<()>(&pipe).await?;
    let message = if paused {
        ControlMessage::Pause {
            queue: name.clone(),
        }
    } else {
        ControlMessage::Resume {
            queue: name.clone(),
        }
    };
    if let Err(e) = api.publish(&message).await {
        tracing::warn!(queue = %name, cause = %e, "control message not sent; workers see the change at their next read of the paused set");
    }
    tracing::info!(queue = %name, paused, "queue {}", if paused { "paused" } else { "resumed" });
    metrics::counter!("kairos_scheduler_queue_pause_changes_total", "op" => if paused { "pause" } else { "resume" })
        .increment(1);
    Ok(Json(json!({"name": name, "paused": paused})).into_response())
}

/// Aborts task `id` by its state: a running one through `NS.control`, a
/// waiting one by cancelling it in the delay queue.
/// Stops a task by its state: a running one through `NS.control` (it ends
/// `cancelled`), a `scheduled` or `retrying` one cancelled in the delay
/// queue as `DELETE /v1/tasks/{id}` does.
#[utoipa::path(
    post,
    path = "/v1/tasks/{id}/abort",
    operation_id = "abort_task",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id")),
    responses(
        (status = 202, description = "Running: `{\"id\", \"state\": \"running\", \"abort\": \"requested\"}`", body = Object),
        (status = 200, description = "Was waiting, now cancelled: `{\"id\", \"state\": \"cancelled\"}`", body = Object),
        (status = 404, description = "Unknown or expired id", body = ErrorBody),
        (status = 409, description = "Ready or finished: cannot be aborted; `state` says which", body = ErrorBody),
        (status = 503, description = "Redis or the broker cannot be reached", body = ErrorBody),
    )
)]
async fn abort(
    State(api): State<ControlApi>,
    Path(id): Path<String>,
) -> Result<Response, ControlError> {
    let status = tokio::time::timeout(CONTROL_TIMEOUT, api.status.get(&id))
        .await
        .map_err(|_| ControlError::Redis("no reply in time".into()))?
        .map_err(|e| ControlError::Redis(e.to_string()))?
        .ok_or_else(|| ControlError::NotFound(id.clone()))?;
    match status.state {
        Some(TaskState::Running) => request_abort(&api, id).await,
        Some(TaskState::Scheduled | TaskState::Retrying) => cancel_waiting(&api, id).await,
        state => Err(ControlError::Conflict {
            id,
            state: state.map_or("unknown", TaskState::as_str).to_string(),
        }),
    }
}

/// Tells the workers to abort running task `id`: 202.
async fn request_abort(api: &ControlApi, id: String) -> Result<Response, ControlError> {
    api.publish(&ControlMessage::Abort { id: id.clone() })
        .await?;
    tracing::info!(task_id = %id, "abort requested");
    metrics::counter!("kairos_scheduler_aborts_requested_total").increment(1);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "state": TaskState::Running, "abort": "requested"})),
    )
        .into_response())
}

/// Cancels task `id` waiting in the delay queue, as `DELETE
/// /v1/tasks/{id}` does (one atomic script). Promoted and started
/// meanwhile, it is aborted as a running one.
async fn cancel_waiting(api: &ControlApi, id: String) -> Result<Response, ControlError> {
    let cancelled = tokio::time::timeout(CONTROL_TIMEOUT, api.cancel.cancel(&id))
        .await
        .map_err(|_| ControlError::Redis("no reply in time".into()))?
        .map_err(|e| ControlError::Redis(e.to_string()))?;
    let state = match cancelled {
        Cancelled::Withdrawn => {
            tracing::info!(task_id = %id, "task cancelled (abort of a waiting task)");
            metrics::counter!("kairos_scheduler_cancelled_total").increment(1);
            return Ok(Json(json!({"id": id, "state": TaskState::Cancelled})).into_response());
        }
        Cancelled::Absent(Some(TaskState::Running)) => return request_abort(api, id).await,
        // Being published, or published with its `ready` on its way.
        Cancelled::Leased(_)
        | Cancelled::Absent(Some(TaskState::Scheduled | TaskState::Retrying)) => TaskState::Ready,
        Cancelled::Absent(Some(state)) => state,
        Cancelled::Absent(None) => return Err(ControlError::NotFound(id)),
    };
    Err(ControlError::Conflict {
        id,
        state: state.as_str().to_string(),
    })
}
