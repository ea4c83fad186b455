//! The HTTP API: tasks, schedules, probes, behind one guard.
//!
//! * `guard`: the API token and the JSON content type, before every route.
//! * `tasks`: enqueue, look up and dead letters.
//! * `schedules`: the schedule routes and the probes.
//! * `events`: the live event stream (`GET /v1/events`).
//! * `status`: task status, cancel and the task list (`/v1/tasks/{id}`).
//! * `control`: pause and resume a queue, abort a task (`NS.control`).
//! * `queues`: the queue overview (`GET /v1/queues`).
//!
//! May touch: the delay queue (through `crate::delay::hold`), the schedule
//! admin, RabbitMQ (publishing tasks). Holds no state of its own.

pub(crate) mod control;
pub(crate) mod events;
pub(crate) mod guard;
pub(crate) mod queues;
pub(crate) mod schedules;
pub mod status;
pub mod tasks;

use crate::schedules::admin::Admin;
use axum::http::StatusCode;
use axum::{Json, Router};
use kairos_shared::secrets::Secret;
use kairos_shared::supervise::Health;
use serde_json::{json, Value};

/// Every route of the API behind its guard: the schedules and tasks
/// routes, `/readyz` when there are background loops to report
/// (`health`; none in process, for kairosctl), and the event stream when
/// given `events` (none in process: kairosctl's in-process calls answer
/// once and cannot stream). Without a `token` the API is open.
pub(crate) fn router(
    admin: Admin,
    tasks: tasks::TaskApi,
    status: status::StatusApi,
    health: Option<Health>,
    events: Option<events::EventStreams>,
    control: control::ControlApi,
    token: Option<Secret>,
) -> Router {
    let mut routes = schedules::router(admin)
        .merge(tasks::router(tasks))
        .merge(status::router(status))
        .merge(control::router(control.clone()))
        .merge(queues::router(control));
    if let Some(health) = health {
        routes = routes.merge(schedules::probes(health));
    }
    if let Some(events) = events {
        routes = routes.merge(events::router(events));
    }
    guard::guard(routes, token)
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
