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
use crate::schedules::admin::{Admin, AdminError, Put};
use crate::schedules::model::ScheduleSpec;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

/// The schedule routes over `admin`.
pub(crate) fn router(admin: Admin) -> Router {
    Router::new()
        .route("/v1/schedules", get(list))
        .route("/v1/schedules/{id}", get(show).put(put).delete(delete))
        .route("/v1/schedules/{id}/pause", post(pause))
        .route("/v1/schedules/{id}/resume", post(resume))
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

async fn list(State(admin): State<Admin>) -> Result<Response, AdminError> {
    let all = admin.store.list().await?;
    Ok(Json(json!({ "schedules": all })).into_response())
}

async fn show(State(admin): State<Admin>, Path(id): Path<String>) -> Result<Response, AdminError> {
    Ok(Json(admin.view(&id).await?).into_response())
}

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

async fn pause(State(admin): State<Admin>, Path(id): Path<String>) -> Result<Response, AdminError> {
    admin.set_enabled(&id, false).await?;
    Ok(Json(admin.view(&id).await?).into_response())
}

async fn resume(
    State(admin): State<Admin>,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    admin.set_enabled(&id, true).await?;
    Ok(Json(admin.view(&id).await?).into_response())
}

async fn delete(
    State(admin): State<Admin>,
    Path(id): Path<String>,
) -> Result<Response, AdminError> {
    admin.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
