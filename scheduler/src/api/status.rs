//! The task status routes (docs/HTTP.md, "Task status"):
//!
//! * `GET /v1/tasks/{id}`: the task's status with its result; 404 for an
//!   unknown or expired id
//! * `DELETE /v1/tasks/{id}`: cancels a task waiting in the delay queue
//!   (`scheduled` or `retrying`): 200 `{"id","state":"cancelled"}` and it
//!   never runs; 409 `{"error","id","state"}` for one already published,
//!   running or finished; 404 for an unknown one. One atomic script
//!   (`redis_io/scripts/cancel.lua`): a cancel racing the pump's promotion
//!   either wins or gets 409, never both
//! * `GET /v1/tasks?state=&queue=&name=&limit=&cursor=`: recent tasks,
//!   newest first, a page at a time
//!
//! Errors are JSON `{"error": ..., "field"?: ...}`: 400 for a bad query,
//! 503 when Redis cannot be reached.

use super::json_error;
use super::openapi::ErrorBody;
use crate::delay::store::QueueError;
use crate::redis_io::keys::Keys;
use crate::redis_io::scripts;
use crate::redis_io::status_calls::{CancelArgs, Cancelled};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kairos_shared::contract::validate_id;
use kairos_shared::redis::{shard_of, RedisConn, RedisPool};
use kairos_shared::status::{
    ListFilter, Page, ShardCount, StatusError, StatusKeys, StatusSettings, StatusStore, TaskState,
    TaskStatus,
};
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Tasks a list page shows by default.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Tasks a list page shows at most.
pub const MAX_LIST_LIMIT: usize = 1_000;

/// What the status routes share: the store and the cancel script's keys.
#[derive(Clone)]
pub struct StatusApi {
    store: StatusStore,
    redis: RedisConn,
    dq: Keys,
    keys: StatusKeys,
    shards: usize,
    settings: StatusSettings,
}

impl StatusApi {
    /// The routes' state over `pool` in `namespace`, whose delay queue has
    /// `shards` shards.
    pub(crate) fn new(
        pool: RedisPool,
        namespace: &str,
        shards: usize,
        settings: &StatusSettings,
    ) -> Self {
        let redis = RedisConn::new(pool);
        StatusApi {
            store: StatusStore::new(
                redis.clone(),
                namespace,
                ShardCount::known(shards),
                settings.status_ttl_s,
            ),
            redis,
            dq: Keys::new(namespace),
            keys: StatusKeys::new(namespace),
            shards: shards.max(1),
            settings: settings.clone(),
        }
    }

    /// Runs the cancel script for `id`: withdraws it from the delay queue
    /// and marks it cancelled when it waits there.
    pub(crate) async fn cancel(&self, id: &str) -> Result<Cancelled, QueueError> {
        let shard = shard_of(id, self.shards);
        let dq = self.dq.delay_shard(shard, "api");
        let call = CancelArgs {
            dq: &dq,
            status: &self.keys,
            shard,
            id,
            ttl_s: self.settings.status_ttl_s,
            status_on: self.settings.status,
        };
        let mut pipe = redis::pipe();
        pipe.add_command(call.command());
        let (reply,): (redis::Value,) = scripts::run(&self.redis, &pipe, None).await?;
        Ok(CancelArgs::decode(reply)?)
    }
}

/// The task status routes over `api`.
pub(crate) fn router(api: StatusApi) -> OpenApiRouter {
    OpenApiRouter::default()
        .routes(routes!(list_tasks))
        .routes(routes!(get_task, cancel_task))
        .with_state(api)
}

/// Redis could not answer (503).
fn unavailable(err: impl std::fmt::Display) -> Response {
    json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("task status unavailable: {err}"),
        None,
    )
    .into_response()
}

/// An id no task can have (the contract's 1 to 128 printable ASCII
/// characters): 400. Checked before any key is built from it, since the
/// cancel script also tries `ID<TAB>N`, and an id that carried its own tab
/// would name another task's retry.
/// A path that is not text (invalid UTF-8 after decoding) is refused the
/// same way, as JSON.
fn checked_id(id: Result<Path<String>, PathRejection>) -> Result<String, Box<Response>> {
    let refuse = |e: &dyn std::fmt::Display| {
        Box::new(
            json_error(
                StatusCode::BAD_REQUEST,
                format!("not a task id: {e}"),
                Some(("field", json!("id"))),
            )
            .into_response(),
        )
    };
    let Path(id) = id.map_err(|e| refuse(&e.body_text()))?;
    validate_id(&id).map_err(|e| refuse(&e))?;
    Ok(id)
}

fn not_found(id: &str) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        format!("no task {id:?} (unknown, or its status expired)"),
        Some(("id", json!(id))),
    )
    .into_response()
}

/// A task's status, with its result; absent fields are null.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id")),
    responses(
        (status = 200, description = "The status", body = TaskStatus),
        (status = 400, description = "Not a task id (1 to 128 printable ASCII characters)", body = ErrorBody),
        (status = 404, description = "Unknown id, or its status expired (or status is off)", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn get_task(
    State(api): State<StatusApi>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match checked_id(id) {
        Ok(id) => id,
        Err(bad) => return *bad,
    };
    match api.store.get(&id).await {
        Ok(Some(status)) => Json(status).into_response(),
        Ok(None) => not_found(&id),
        Err(err) => unavailable(err),
    }
}

/// Cancels a task waiting in the delay queue (`scheduled` or
/// `retrying`): it never runs.
#[utoipa::path(
    delete,
    path = "/v1/tasks/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id")),
    responses(
        (status = 200, description = "Cancelled: `{\"id\", \"state\": \"cancelled\"}`", body = Object),
        (status = 400, description = "Not a task id (1 to 128 printable ASCII characters)", body = ErrorBody),
        (status = 404, description = "Unknown id", body = ErrorBody),
        (status = 409, description = "Ready, running or finished: cannot be cancelled; `state` says which", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn cancel_task(
    State(api): State<StatusApi>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match checked_id(id) {
        Ok(id) => id,
        Err(bad) => return *bad,
    };
    let state = match api.cancel(&id).await {
        Ok(Cancelled::Withdrawn) => {
            tracing::info!(task_id = %id, "task cancelled");
            metrics::counter!("kairos_scheduler_cancelled_total").increment(1);
            return Json(json!({"id": id, "state": TaskState::Cancelled})).into_response();
        }
        // Claimed by a pump (it is being published), or gone from the
        // delay queue although its status says it waits (published, its
        // `ready` on its way): ready, unless its status is further on (a
        // worker ran it before the pump had its confirm).
        Ok(Cancelled::Leased(None)) => TaskState::Ready,
        Ok(Cancelled::Leased(Some(state)) | Cancelled::Absent(Some(state))) => match state {
            TaskState::Scheduled | TaskState::Retrying => TaskState::Ready,
            other => other,
        },
        Ok(Cancelled::Absent(None)) => return not_found(&id),
        Err(err) => return unavailable(err),
    };
    let mut body = json!({
        "error": format!("task {id:?} is {state}: only a task waiting in the delay queue (scheduled or retrying) can be cancelled"),
        "state": state,
    });
    body["id"] = json!(id);
    (StatusCode::CONFLICT, Json(body)).into_response()
}

/// `GET /v1/tasks` query: read as text, so each bad value is answered
/// with its field.
#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    state: Option<String>,
    queue: Option<String>,
    name: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

fn bad(field: &str, message: String) -> Response {
    json_error(
        StatusCode::BAD_REQUEST,
        message,
        Some(("field", json!(field))),
    )
    .into_response()
}

/// Recent tasks, newest change first, a page at a time (each without its
/// result).
#[utoipa::path(
    get,
    path = "/v1/tasks",
    tag = "tasks",
    params(
        ("state" = Option<TaskState>, Query, description = "Only tasks in this state"),
        ("queue" = Option<String>, Query, description = "Only tasks of this logical queue"),
        ("name" = Option<String>, Query, description = "Only tasks of this name"),
        ("limit" = Option<usize>, Query, description = "Tasks per page, 1 to 1000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page; keep going while `next_cursor` is not null", body = Page),
        (status = 400, description = "An unknown state, a limit out of range, or a cursor this API did not hand out; `field` names it", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn list_tasks(
    State(api): State<StatusApi>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return bad("query", "the query string cannot be read".into());
    };
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match TaskState::parse(s) {
            Some(state) => Some(state),
            None => {
                let known: Vec<&str> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
                return bad(
                    "state",
                    format!("unknown state {s:?}; one of {}", known.join(", ")),
                );
            }
        },
    };
    let limit = match q.limit.as_deref() {
        None | Some("") => DEFAULT_LIST_LIMIT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => n,
            _ => {
                return bad(
                    "limit",
                    format!("limit must be a whole number from 1 to {MAX_LIST_LIMIT}"),
                )
            }
        },
    };
    let filter = ListFilter {
        state,
        queue: q.queue.filter(|s| !s.is_empty()),
        name: q.name.filter(|s| !s.is_empty()),
    };
    let cursor = q.cursor.filter(|c| !c.is_empty());
    match api.store.list(&filter, limit, cursor.as_deref()).await {
        Ok(page) => Json(page).into_response(),
        Err(StatusError::BadCursor(_)) => bad(
            "cursor",
            "not a cursor of this list: pass a page's next_cursor unchanged".into(),
        ),
        Err(err) => unavailable(err),
    }
}
