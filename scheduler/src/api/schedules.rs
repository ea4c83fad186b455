//! The schedules HTTP API on `KAIROS_HTTP_ADDR` (docs/SCHEDULES.md):
//!
//! * `PUT /v1/schedules/{id}`: create (201) or replace (200)
//! * `GET /v1/schedules`, `GET /v1/schedules/{id}`
//! * `POST /v1/schedules/{id}/pause`, `POST /v1/schedules/{id}/resume`
//! * `DELETE /v1/schedules/{id}` (204)
//!
//! Errors are JSON: `{"error": "...", "field": "..."}` with 400 for bad
//! input, 404 for an unknown id, 503 when Redis fails.

use super::json_error;
use super::openapi::ErrorBody;
use crate::schedules::admin::{Admin, AdminError, Put};
use crate::schedules::model::ScheduleSpec;
use crate::schedules::store::View;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The schedule routes over `admin`.
pub(crate) fn router(admin: Admin) -> OpenApiRouter {
    OpenApiRouter::default()
        .routes(routes!(list))
        .routes(routes!(show, put, delete))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .with_state(admin)
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, message, detail) = match &self {
            AdminError::Invalid(e) => (
                StatusCode::BAD_REQUEST,
                e.to_string(),
                Some(("field", json!(e.field))),
            ),
            AdminError::NotFound(_) => (StatusCode::NOT_FOUND, self.to_string(), None),
            AdminError::Store(e) => {
                tracing::warn!(cause = %e, "schedule API: Redis failed");
                (StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}"), None)
            }
        };
        json_error(status, message, detail).into_response()
    }
}

/// Every schedule, with its next and last fire times.
#[utoipa::path(
    get,
    path = "/v1/schedules",
    operation_id = "list_schedules",
    tag = "schedules",
    responses(
        (status = 200, description = "`{\"schedules\": [...]}`", body = Schedules),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn list(State(admin): State<Admin>) -> Result<Response, AdminError> {
    let all = admin.store.list().await?;
    Ok(Json(json!({ "schedules": all })).into_response())
}

/// One schedule.
#[utoipa::path(
    get,
    path = "/v1/schedules/{id}",
    operation_id = "show_schedule",
    tag = "schedules",
    params(("id" = String, Path, description = "The schedule id: 1 to 128 of A-Z a-z 0-9 . _ : -")),
    responses(
        (status = 200, description = "The schedule", body = View),
        (status = 404, description = "No schedule with this id", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn show(State(admin): State<Admin>, Path(id): Path<String>) -> Result<Response, AdminError> {
    Ok(Json(admin.view(&id).await?).into_response())
}

/// Creates or replaces a schedule. Exactly one of `cron`, `every_ms` and
/// `at`; the id comes from the path.
#[utoipa::path(
    put,
    path = "/v1/schedules/{id}",
    operation_id = "put_schedule",
    tag = "schedules",
    params(("id" = String, Path, description = "The schedule id: 1 to 128 of A-Z a-z 0-9 . _ : -")),
    request_body = ScheduleSpec,
    responses(
        (status = 201, description = "Created", body = View),
        (status = 200, description = "Replaced", body = View),
        (status = 400, description = "Bad input; `field` names it", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn put(
    State(admin): State<Admin>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, AdminError> {
    let spec = ScheduleSpec::from_json(&body)?;
    let (put, _) = admin.put(&id, spec, false).await?;
    let status = if put == Put::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(admin.view(&id).await?)).into_response())
}

/// Pauses a schedule: it stops firing, and occurrences handed to the
/// delay queue that no pump claimed yet are withdrawn.
#[utoipa::path(
    post,
    path = "/v1/schedules/{id}/pause",
    operation_id = "pause_schedule",
    tag = "schedules",
    params(("id" = String, Path, description = "The schedule id: 1 to 128 of A-Z a-z 0-9 . _ : -")),
    responses(
        (status = 200, description = "The paused schedule", body = View),
        (status = 404, description = "No schedule with this id", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn pause(State(admin): State<Admin>, Path(id): Path<String>) -> Result<Response, AdminError> {
    admin.set_enabled(&id, false).await?;
    Ok(Json(admin.view(&id).await?).into_response())
}

/// Resumes a schedule from the next tick after now (no catch-up).
#[utoipa::path(
    post,
    path = "/v1/schedules/{id}/resume",
    operation_id = "resume_schedule",
    tag = "schedules",
    params(("id" = String, Path, description = "The schedule id: 1 to 128 of A-Z a-z 0-9 . _ : -")),
    responses(
        (status = 200, description = "The resumed schedule", body = View),
        (status = 404, description = "No schedule with this id", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn resume(
    State(admin): State<Admin>,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    admin.set_enabled(&id, true).await?;
    Ok(Json(admin.view(&id).await?).into_response())
}

/// Deletes a schedule and withdraws its waiting occurrences.
#[utoipa::path(
    delete,
    path = "/v1/schedules/{id}",
    operation_id = "delete_schedule",
    tag = "schedules",
    params(("id" = String, Path, description = "The schedule id: 1 to 128 of A-Z a-z 0-9 . _ : -")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No schedule with this id", body = ErrorBody),
        (status = 503, description = "Redis cannot be reached", body = ErrorBody),
    )
)]
async fn delete(
    State(admin): State<Admin>,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    admin.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The answer of `GET /v1/schedules`.
#[derive(utoipa::ToSchema)]
// Only describes the JSON that `list` builds: never constructed.
#[allow(dead_code)]
struct Schedules {
    schedules: Vec<View>,
}
