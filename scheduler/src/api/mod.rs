//! The HTTP API: tasks, schedules, probes, behind one guard.
//!
//! * `guard`: the API token and the JSON content type, before every route.
//! * `tasks`: enqueue (and `/healthz`); merges `dead`.
//! * `dead`: the dead letters: page, show, replay, purge.
//! * `schedules`: the schedule routes.
//! * `probes`: `/readyz` (Redis, RabbitMQ, loops) and `/metrics`.
//! * `events`: the live event stream (`GET /v1/events`).
//! * `handler_io`: checkpoints, progress and results from handlers in
//!   other languages (`/v1/tasks/{id}/checkpoint|progress|result`).
//! * `ui`: the dashboard page (`/`, `/ui/...`), served with the stream.
//! * `status`: task status, cancel and the task list (`/v1/tasks/{id}`).
//! * `control`: pause and resume a queue, abort a task (`NS.control`).
//! * `queues`: the queue overview (`GET /v1/queues`).
//! * `openapi`: the OpenAPI document of the API routes (`/v1/openapi.json`,
//!   the dashboard page is no API route), made from the same definitions
//!   that register them.
//!
//! May touch: the delay queue (through `crate::delay::hold`), the schedule
//! admin, RabbitMQ (publishing tasks). Holds no state of its own.

pub(crate) mod control;
pub(crate) mod dead;
pub(crate) mod events;
pub(crate) mod guard;
pub(crate) mod handler_io;
pub(crate) mod openapi;
pub(crate) mod probes;
pub(crate) mod queues;
pub(crate) mod schedules;
pub mod status;
pub mod tasks;
pub(crate) mod ui;

use crate::schedules::admin::Admin;
use axum::http::StatusCode;
use axum::{Json, Router};
use kairos_shared::secrets::Secret;
use serde_json::{json, Value};

/// Every route of the API behind its guard: the schedules and tasks
/// routes, `/readyz` and `/metrics` when given `probes` (none in process,
/// for kairosctl), and the event stream when
/// given `events` (none in process: kairosctl's in-process calls answer
/// once and cannot stream) and with it the dashboard page, which needs
/// it; and the OpenAPI document of the API routes at `/v1/openapi.json`.
/// Without a `token` the API is open.
// One state per part of the API, handed over once at start.
#[allow(clippy::too_many_arguments)]
pub(crate) fn router(
    admin: Admin,
    tasks: tasks::TaskApi,
    status: status::StatusApi,
    probes: Option<probes::Probes>,
    events: Option<events::EventStreams>,
    handler_io: handler_io::HandlerIo,
    control: control::ControlApi,
    token: Option<Secret>,
) -> Router {
    let mut routes = schedules::router(admin)
        .merge(tasks::routes(tasks))
        .merge(handler_io::router(handler_io))
        .merge(status::router(status))
        .merge(control::router(control.clone()))
        .merge(queues::router(control));
    if let Some(probes) = probes {
        routes = routes.merge(probes::router(probes));
    }
    if let Some(events) = events {
        // The page is no API route: served, not in the OpenAPI document.
        routes = routes
            .merge(events::router(events))
            .merge(ui::router().into());
    }
    guard::guard(openapi::serve(routes), token)
}

/// An error as the API answers it: `status` with the JSON body
/// `{"error": message}`, plus `detail` (such as the `field` at fault) when
/// given.
pub(crate) fn json_error(
    status: StatusCode,
    message: impl std::fmt::Display,
    detail: Option<(&str, Value)>,
) -> (StatusCode, Json<Value>) {
    let mut body = json!({ "error": message.to_string() });
    if let Some((key, value)) = detail {
        body[key] = value;
    }
    (status, Json(body))
}
