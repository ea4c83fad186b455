//! What a handler written in another language says about its task over
//! HTTP, as a Rust handler does through its context (docs/HTTP.md,
//! "Handlers in other languages"):
//!
//! * `PUT /v1/tasks/{id}/checkpoint`: `{"checkpoint": JSON}` or
//!   `{"checkpoint_base64": "..."}`; durable when it answers 200.
//! * `GET /v1/tasks/{id}/checkpoint`: the last one, as
//!   `{"id", "checkpoint": JSON or null, "checkpoint_base64"}`; 404 when
//!   there is none.
//! * `PUT /v1/tasks/{id}/progress`: `{"percent": 0..100, "message": "..."}`.
//! * `PUT /v1/tasks/{id}/result`: `{"result": JSON}` or
//!   `{"result_base64": "..."}`.
//!
//! Sizes are bounded by `KAIROS_MAX_CHECKPOINT_BYTES` and
//! `KAIROS_MAX_RESULT_BYTES` (413); progress and results need the task's
//! status (404 without one: they would have nowhere to go), checkpoints
//! do not (a task published straight to its queue has no status until a
//! Kairos worker runs it, and its consumer may still checkpoint). Errors
//! are JSON `{"error", "field"?}`: 400 for bad input, 503 when Redis
//! cannot be reached.

use super::json_error;
use super::openapi::ErrorBody;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use kairos_shared::contract::validate_id;
use kairos_shared::limits::{progress_message, HandlerLimits};
use kairos_shared::status::{StatusError, StatusStore, TaskResultValue};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The status store the routes write to, and the bounds they check.
#[derive(Clone)]
pub(crate) struct HandlerIo {
    pub(crate) store: StatusStore,
    pub(crate) limits: HandlerLimits,
}

impl HandlerIo {
    /// Largest request read: the larger bound, base64- or JSON-escaped
    /// (at most twice the bytes), and room for the rest.
    fn request_limit(&self) -> usize {
        let max = self
            .limits
            .max_result_bytes
            .max(self.limits.max_checkpoint_bytes);
        usize::try_from(max)
            .unwrap_or(usize::MAX)
            .saturating_mul(2)
            .saturating_add(64 * 1024)
    }
}

/// The routes over `io`.
pub(crate) fn router(io: HandlerIo) -> OpenApiRouter {
    let limit = DefaultBodyLimit::max(io.request_limit());
    OpenApiRouter::default()
        .routes(routes!(put_checkpoint, get_checkpoint))
        .routes(routes!(put_progress))
        .routes(routes!(put_result))
        .layer(limit)
        .with_state(io)
}

/// Why a route failed; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
enum IoError {
    /// 400, naming the field.
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// 413, naming the field.
    #[error("{message}")]
    TooLarge {
        field: &'static str,
        message: String,
    },
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 503.
    #[error("redis: {0}")]
    Redis(#[from] StatusError),
}

fn invalid(field: &'static str, message: impl std::fmt::Display) -> IoError {
    IoError::Invalid {
        field,
        message: message.to_string(),
    }
}

impl IntoResponse for IoError {
    fn into_response(self) -> Response {
        let (status, detail) = match &self {
            IoError::Invalid { field, .. } => {
                (StatusCode::BAD_REQUEST, Some(("field", json!(field))))
            }
            IoError::TooLarge { field, .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, Some(("field", json!(field))))
            }
            IoError::NotFound(_) => (StatusCode::NOT_FOUND, None),
            IoError::Redis(e) => {
                tracing::warn!(cause = %e, "handler API: Redis failed");
                (StatusCode::SERVICE_UNAVAILABLE, None)
            }
        };
        json_error(status, &self, detail).into_response()
    }
}

/// The id from the path, checked as the contract checks ids.
fn task_id(id: String) -> Result<String, IoError> {
    validate_id(&id).map_err(|e| invalid("id", e))?;
    Ok(id)
}

/// The request body as a JSON object: over the request limit is 413,
/// anything else unreadable 400.
fn body_json(body: Result<Bytes, BytesRejection>, io: &HandlerIo) -> Result<Value, IoError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            IoError::TooLarge {
                field: "body",
                message: format!("request larger than {} bytes", io.request_limit()),
            }
        } else {
            invalid("body", e.body_text())
        }
    })?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| invalid("body", e))?;
    if !value.is_object() {
        return Err(invalid("body", "expected a JSON object"));
    }
    Ok(value)
}

/// Reads `{"NAME": JSON}` or `{"NAME_base64": "..."}` (exactly one, and
/// nothing else): the JSON value's text or the decoded bytes, and whether
/// it was JSON.
fn json_or_base64(
    body: Value,
    name: &'static str,
    b64: &'static str,
) -> Result<(Vec<u8>, bool), IoError> {
    let Value::Object(mut map) = body else {
        return Err(invalid("body", "expected a JSON object"));
    };
    let json_value = map.remove(name);
    let encoded = map.remove(b64);
    if let Some(other) = map.keys().next() {
        return Err(invalid("body", format!("unknown field {other:?}")));
    }
    match (json_value, encoded) {
        (Some(v), None) => Ok((v.to_string().into_bytes(), true)),
        (None, Some(Value::String(s))) => base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(|b| (b, false))
            .map_err(|e| invalid(b64, format!("not base64: {e}"))),
        (None, Some(_)) => Err(invalid(b64, "must be a base64 string")),
        (Some(_), Some(_)) => Err(invalid("body", format!("give {name} or {b64}, not both"))),
        (None, None) => Err(invalid(
            "body",
            format!("missing {name} (JSON) or {b64} (bytes)"),
        )),
    }
}

/// 404 unless task `id` has a status.
async fn known(io: &HandlerIo, id: &str) -> Result<(), IoError> {
    match io.store.get(id).await? {
        Some(_) => Ok(()),
        None => Err(IoError::NotFound(format!(
            "no status for task {id} (unknown, expired, or status is off)"
        ))),
    }
}

/// Saves the task's checkpoint, replacing the last one: the JSON value of
/// `checkpoint`, or the bytes of `checkpoint_base64` (exactly one).
#[utoipa::path(
    put,
    path = "/v1/tasks/{id}/checkpoint",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id (`message_id`)")),
    request_body(content = CheckpointBody, description = "`{\"checkpoint\": JSON}` or `{\"checkpoint_base64\": \"...\"}`"),
    responses(
        (status = 200, description = "Durable in Redis: `{\"id\", \"bytes\": N}`", body = Object),
        (status = 400, description = "A bad id or body; `field` names it", body = ErrorBody),
        (status = 413, description = "Over `KAIROS_MAX_CHECKPOINT_BYTES` (`field`: `checkpoint`) or the request limit (`body`)", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn put_checkpoint(
    State(io): State<HandlerIo>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IoError> {
    let id = task_id(id)?;
    let (bytes, _) = json_or_base64(body_json(body, &io)?, "checkpoint", "checkpoint_base64")?;
    io.limits
        .check_checkpoint(bytes.len())
        .map_err(|message| IoError::TooLarge {
            field: "checkpoint",
            message,
        })?;
    io.store.save_checkpoint(&id, &bytes).await?;
    Ok(Json(json!({"id": id, "bytes": bytes.len()})).into_response())
}

/// The task's last checkpoint.
#[utoipa::path(
    get,
    path = "/v1/tasks/{id}/checkpoint",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id (`message_id`)")),
    responses(
        (status = 200, description = "`{\"id\", \"checkpoint\": JSON or null, \"checkpoint_base64\"}`: `checkpoint` when the bytes are JSON, `checkpoint_base64` always", body = Object),
        (status = 400, description = "A bad id or body; `field` names it", body = ErrorBody),
        (status = 404, description = "No checkpoint", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn get_checkpoint(
    State(io): State<HandlerIo>,
    Path(id): Path<String>,
) -> Result<Response, IoError> {
    let id = task_id(id)?;
    let Some(bytes) = io.store.load_checkpoint(&id).await? else {
        return Err(IoError::NotFound(format!("no checkpoint for task {id}")));
    };
    let as_json = serde_json::from_slice::<Value>(&bytes).ok();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
    Ok(
        Json(json!({"id": id, "checkpoint": as_json, "checkpoint_base64": encoded}))
            .into_response(),
    )
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Progress {
    /// An integer from 0 to 100.
    #[schema(value_type = u8, maximum = 100)]
    percent: Value,
    /// What the task is doing, cut at 1 KiB.
    #[serde(default)]
    message: Option<String>,
}

/// Sets the progress shown in the task's status.
#[utoipa::path(
    put,
    path = "/v1/tasks/{id}/progress",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id (`message_id`)")),
    request_body = Progress,
    responses(
        (status = 200, description = "`{\"id\", \"progress\", \"progress_message\"}`", body = Object),
        (status = 400, description = "A bad id or body; `field` names it", body = ErrorBody),
        (status = 404, description = "The task has no status (unknown, expired, or status off)", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn put_progress(
    State(io): State<HandlerIo>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IoError> {
    let id = task_id(id)?;
    let p: Progress =
        serde_json::from_value(body_json(body, &io)?).map_err(|e| invalid("body", e))?;
    let percent = p
        .percent
        .as_u64()
        .and_then(|n| u8::try_from(n).ok())
        .filter(|n| *n <= 100)
        .ok_or_else(|| invalid("percent", "must be an integer from 0 to 100"))?;
    let message = p.message.as_deref().map(progress_message);
    known(&io, &id).await?;
    io.store.set_progress(&id, percent, message).await?;
    Ok(Json(json!({"id": id, "progress": percent, "progress_message": message})).into_response())
}

/// Sets the task's result: the JSON value of `result`, or the bytes of
/// `result_base64` (exactly one).
#[utoipa::path(
    put,
    path = "/v1/tasks/{id}/result",
    tag = "tasks",
    params(("id" = String, Path, description = "The task id (`message_id`)")),
    request_body(content = ResultBody, description = "`{\"result\": JSON}` or `{\"result_base64\": \"...\"}`"),
    responses(
        (status = 200, description = "`{\"id\", \"result_type\": \"json\" or \"bytes\"}`", body = Object),
        (status = 400, description = "A bad id or body; `field` names it", body = ErrorBody),
        (status = 404, description = "The task has no status (unknown, expired, or status off)", body = ErrorBody),
        (status = 413, description = "Over `KAIROS_MAX_RESULT_BYTES` (`field`: `result`) or the request limit (`body`)", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn put_result(
    State(io): State<HandlerIo>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IoError> {
    let id = task_id(id)?;
    let (bytes, is_json) = json_or_base64(body_json(body, &io)?, "result", "result_base64")?;
    io.limits
        .check_result(bytes.len())
        .map_err(|message| IoError::TooLarge {
            field: "result",
            message,
        })?;
    let value = if is_json {
        // Read back from its own text: cannot fail.
        TaskResultValue::Json(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    } else {
        TaskResultValue::Bytes(bytes)
    };
    known(&io, &id).await?;
    io.store.set_result(&id, &value).await?;
    let kind = if is_json { "json" } else { "bytes" };
    Ok(Json(json!({"id": id, "result_type": kind})).into_response())
}

/// The body of `PUT /v1/tasks/{id}/checkpoint`, as `json_or_base64`
/// reads it: exactly one of the two fields.
#[derive(utoipa::ToSchema)]
// Only describes what `json_or_base64` reads: never constructed.
#[allow(dead_code)]
struct CheckpointBody {
    /// Any JSON value, saved as its text.
    checkpoint: Option<Value>,
    /// Bytes, in base64.
    checkpoint_base64: Option<String>,
}

/// The body of `PUT /v1/tasks/{id}/result`: exactly one of the two
/// fields.
#[derive(utoipa::ToSchema)]
// Only describes what `json_or_base64` reads: never constructed.
#[allow(dead_code)]
struct ResultBody {
    /// Any JSON value.
    result: Option<Value>,
    /// Bytes, in base64.
    result_base64: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_or_base64_takes_exactly_one() {
        let (b, j) =
            json_or_base64(json!({"result": {"a": 1}}), "result", "result_base64").unwrap();
        assert_eq!((b.as_slice(), j), (&br#"{"a":1}"#[..], true));
        let (b, j) =
            json_or_base64(json!({"result_base64": "AAE="}), "result", "result_base64").unwrap();
        assert_eq!((b.as_slice(), j), (&[0u8, 1][..], false));
        for (bad, field) in [
            (json!({}), "body"),
            (json!({"result": 1, "result_base64": "AA=="}), "body"),
            (json!({"result_base64": "%%"}), "result_base64"),
            (json!({"result_base64": 5}), "result_base64"),
            (json!({"result": 1, "extra": 2}), "body"),
        ] {
            match json_or_base64(bad.clone(), "result", "result_base64") {
                Err(IoError::Invalid { field: f, .. }) => assert_eq!(f, field, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
