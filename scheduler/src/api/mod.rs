//! The HTTP API: tasks, schedules, probes, behind one guard.
//!
//! * `guard`: the API token and the JSON content type, before every route.
//! * `tasks`: enqueue, look up and dead letters.
//! * `schedules`: the schedule routes and the probes.
//!
//! May touch: the delay queue (through `crate::delay::hold`), the schedule
//! admin, RabbitMQ (publishing tasks). Holds no state of its own.

pub mod guard;
pub mod schedules;
pub mod tasks;
