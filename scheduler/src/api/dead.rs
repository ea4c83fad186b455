//! The dead-letter routes (docs/HTTP.md, "Dead letters"), over
//! `kairos_shared::dead`:
//!
//! * `GET /v1/dead?queue=&name=&error=&limit=&cursor=`: a page of dead
//!   letters, oldest first, with the cursor of the next page
//! * `GET /v1/dead/{id}`: one letter with its body and headers
//! * `POST /v1/dead/replay`: `{"ids": [...]}` and/or `{"queue", "name",
//!   "error"}` replays those (all when empty)
//! * `DELETE /v1/dead?queue=&name=&error=&ids=`: purges those (all at once
//!   when no filter is given)
//!
//! Errors are JSON: 400 names the `field` at fault, 404 the `id`, 503 when
//! the broker cannot be reached. Each request has a broker connection of
//! its own: these operations are rare and administrative.

use super::json_error;
use super::openapi::ErrorBody;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kairos_shared::amqp::Broker;
use kairos_shared::contract::Names;
use kairos_shared::dead::{self, Cursor, DeadError, Filter, FilterError, MAX_SCAN};
use kairos_shared::dead::{LetterDetail, Page, Purged, Replayed};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Letters per page unless `limit` says otherwise.
pub(crate) const DEFAULT_PAGE: usize = 100;
/// Largest `limit` of a page.
pub(crate) const MAX_PAGE: usize = 10_000;
/// Most letters one replay sends back unless its `limit` says otherwise.
const DEFAULT_REPLAY_LIMIT: usize = 10_000;

/// What the dead-letter handlers share: where the broker is, and the
/// namespace.
#[derive(Clone)]
pub(crate) struct DeadApi {
    broker: Broker,
    names: Names,
}

impl DeadApi {
    pub(crate) fn new(broker: Broker, names: Names) -> Self {
        DeadApi { broker, names }
    }
}

/// The dead-letter routes over `api`.
pub(crate) fn router(api: DeadApi) -> OpenApiRouter {
    OpenApiRouter::default()
        .routes(routes!(list_dead, purge_dead))
        .routes(routes!(replay_dead))
        .routes(routes!(show_dead))
        .with_state(api)
}

/// Why a dead-letter route failed.
#[derive(Debug)]
enum DeadApiError {
    /// 400, naming the parameter or body field at fault.
    Invalid { field: String, message: String },
    /// 404: no letter with this id.
    NotFound(String),
    /// 503: the broker failed.
    Broker(String),
}

impl From<DeadError> for DeadApiError {
    fn from(e: DeadError) -> Self {
        DeadApiError::Broker(e.to_string())
    }
}

impl From<FilterError> for DeadApiError {
    fn from(e: FilterError) -> Self {
        DeadApiError::Invalid {
            field: e.field.to_string(),
            message: e.to_string(),
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> DeadApiError {
    DeadApiError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

impl IntoResponse for DeadApiError {
    fn into_response(self) -> Response {
        match self {
            DeadApiError::Invalid { field, message } => json_error(
                StatusCode::BAD_REQUEST,
                message,
                Some(("field", json!(field))),
            ),
            DeadApiError::NotFound(id) => json_error(
                StatusCode::NOT_FOUND,
                format!("no dead letter with id {id:?} among the first {MAX_SCAN}"),
                Some(("id", json!(id))),
            ),
            DeadApiError::Broker(e) => {
                tracing::warn!(cause = %e, "dead-letter API: broker failed");
                json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("broker: {e}"),
                    None,
                )
            }
        }
        .into_response()
    }
}

/// The filter and paging parameters of a query string: `queue`, `name`,
/// `error`, and those of `extra` (`limit`, `cursor`, `ids`); any other is
/// refused, by name.
fn query_filter(params: &HashMap<String, String>, extra: &[&str]) -> Result<Filter, DeadApiError> {
    let mut filter = Filter::default();
    for (key, value) in params {
        match key.as_str() {
            "queue" => filter.queue = Some(value.clone()),
            "name" => filter.name = Some(value.clone()),
            "error" => filter.error = Some(value.clone()),
            "ids" if extra.contains(&"ids") => {
                filter.ids = value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            k if extra.contains(&k) => {}
            _ => {
                let known = [&["queue", "name", "error"][..], extra].concat().join(", ");
                return Err(invalid(
                    key,
                    format!("unknown parameter {key:?}: use {known}"),
                ));
            }
        }
    }
    Ok(filter.normalized()?)
}

async fn connect(api: &DeadApi) -> Result<lapin::Connection, DeadApiError> {
    kairos_shared::amqp::connect_to(&api.broker, "kairos-http")
        .await
        .map_err(|e| DeadApiError::Broker(e.to_string()))
}

/// The query parameters, or 400 (JSON, field `query`) when the query
/// string cannot be read.
fn query_params(
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, DeadApiError> {
    q.map(|Query(p)| p)
        .map_err(|e| invalid("query", e.body_text()))
}

/// A page of dead letters, oldest first; nothing is removed.
#[utoipa::path(
    get,
    path = "/v1/dead",
    tag = "dead letters",
    params(
        ("queue" = Option<String>, Query, description = "Only letters meant for this logical queue"),
        ("name" = Option<String>, Query, description = "Only letters of this task name"),
        ("error" = Option<String>, Query, description = "Only letters whose error contains this text"),
        ("limit" = Option<usize>, Query, description = "Letters per page, 1 to 10000 (default 100)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page; keep going while `next_cursor` is not null", body = Page),
        (status = 400, description = "A bad or unknown parameter; `field` names it", body = ErrorBody),
        (status = 503, description = "The broker cannot be reached", body = ErrorBody),
    )
)]
async fn list_dead(
    State(api): State<DeadApi>,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, DeadApiError> {
    let params = query_params(params)?;
    let filter = query_filter(&params, &["limit", "cursor"])?;
    let limit = match params.get("limit") {
        None => DEFAULT_PAGE,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| invalid("limit", format!("limit must be 1 to {MAX_PAGE}, not {l:?}")))?,
    };
    let cursor = match params.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(Cursor::parse(c).ok_or_else(|| {
            invalid(
                "cursor",
                "not a cursor: pass next_cursor of the previous page as is",
            )
        })?),
    };
    if cursor.as_ref().is_some_and(|c| c.position >= MAX_SCAN) {
        return Err(invalid(
            "cursor",
            format!("beyond the first {MAX_SCAN} letters, which is as far as a listing reads"),
        ));
    }
    let conn = connect(&api).await?;
    let page = dead::page(&conn, &api.names, &filter, limit, cursor).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(Json(page?).into_response())
}

/// One dead letter with its body, headers and properties.
#[utoipa::path(
    get,
    path = "/v1/dead/{id}",
    tag = "dead letters",
    params(("id" = String, Path, description = "The task id of the letter")),
    responses(
        (status = 200, description = "The letter", body = LetterDetail),
        (status = 404, description = "No dead letter with this id", body = ErrorBody),
        (status = 503, description = "The broker cannot be reached", body = ErrorBody),
    )
)]
async fn show_dead(
    State(api): State<DeadApi>,
    Path(id): Path<String>,
) -> Result<Response, DeadApiError> {
    let conn = connect(&api).await?;
    let letter = dead::show(&conn, &api.names, &id).await;
    let _ = conn.close(200, "done".into()).await;
    match letter? {
        Some(letter) => Ok(Json(letter).into_response()),
        None => Err(DeadApiError::NotFound(id)),
    }
}

/// The body of `POST /v1/dead/replay`: a [`Filter`] and a limit.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    /// Only letters with these task ids.
    #[serde(default)]
    ids: Vec<String>,
    /// Only letters meant for this logical queue.
    queue: Option<String>,
    /// Only letters of this task name.
    name: Option<String>,
    /// Only letters whose error contains this text.
    error: Option<String>,
    /// At most this many (default 10000).
    limit: Option<usize>,
}

/// Sends the matching letters back to their queues with full retries
/// (all of them when the body is empty or `{}`); letters that cannot be
/// replayed stay dead and are listed in `refused`.
#[utoipa::path(
    post,
    path = "/v1/dead/replay",
    tag = "dead letters",
    request_body(content = Option<ReplayBody>, description = "Ids and/or a filter; empty replays all"),
    responses(
        (status = 200, description = "What was replayed, refused and not found", body = Replayed),
        (status = 400, description = "A bad body; `field` names the fault", body = ErrorBody),
        (status = 503, description = "The broker cannot be reached", body = ErrorBody),
    )
)]
async fn replay_dead(State(api): State<DeadApi>, body: Bytes) -> Result<Response, DeadApiError> {
    let req: ReplayBody = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            invalid(
                "body",
                format!("expected {{\"ids\": [...]}} or {{\"queue\", \"name\", \"error\"}}: {e}"),
            )
        })?
    };
    let filter = Filter {
        ids: req.ids,
        queue: req.queue,
        name: req.name,
        error: req.error,
    }
    .normalized()?;
    let limit = match req.limit {
        None => DEFAULT_REPLAY_LIMIT,
        Some(0) => return Err(invalid("limit", "limit must be at least 1")),
        Some(n) => n,
    };
    let conn = connect(&api).await?;
    let replayed = dead::replay_matching(&conn, &api.names, &filter, limit).await;
    let _ = conn.close(200, "done".into()).await;
    // Letters that cannot be replayed stay dead and are listed, each with
    // its reason.
    Ok(Json(replayed?).into_response())
}

/// Deletes the matching letters (all of them without a filter).
#[utoipa::path(
    delete,
    path = "/v1/dead",
    tag = "dead letters",
    params(
        ("queue" = Option<String>, Query, description = "Only letters meant for this logical queue"),
        ("name" = Option<String>, Query, description = "Only letters of this task name"),
        ("error" = Option<String>, Query, description = "Only letters whose error contains this text"),
        ("ids" = Option<String>, Query, description = "Only these task ids, comma-separated"),
    ),
    responses(
        (status = 200, description = "How many were deleted", body = Purged),
        (status = 400, description = "A bad or unknown parameter; `field` names it", body = ErrorBody),
        (status = 503, description = "The broker cannot be reached", body = ErrorBody),
    )
)]
async fn purge_dead(
    State(api): State<DeadApi>,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, DeadApiError> {
    let params = query_params(params)?;
    let filter = query_filter(&params, &["ids"])?;
    let conn = connect(&api).await?;
    let purged = dead::purge_matching(&conn, &api.names, &filter).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(Json(purged?).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn query_parameters_are_checked_by_name() {
        let f =
            query_filter(&params(&[("queue", "q"), ("limit", "3")]), &["limit"]).expect("valid");
        assert_eq!(f.queue.as_deref(), Some("q"));
        let Err(DeadApiError::Invalid { field, .. }) =
            query_filter(&params(&[("ids", "a")]), &["limit", "cursor"])
        else {
            panic!("ids is not a listing parameter");
        };
        assert_eq!(field, "ids");
        let f = query_filter(&params(&[("ids", "a,b,")]), &["ids"]).expect("valid");
        assert_eq!(f.ids, vec!["a", "b"]);
        let Err(DeadApiError::Invalid { field, .. }) =
            query_filter(&params(&[("error", &"e".repeat(2000))]), &[])
        else {
            panic!("too long");
        };
        assert_eq!(field, "error");
    }
}
