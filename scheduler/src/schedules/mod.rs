//! Timed triggers: cron, interval and one-shot schedules that fire exactly
//! once per tick across schedulers.
//!
//! * `model`: the schedule model, validation, tick and DST arithmetic and
//!   the misfire plan; pure and unit-tested.
//! * `store`: schedules in Redis (definitions, due index, leases, meta).
//! * `ticker`: the loop that fires due ticks into the delay queue.
//! * `admin`: create, change, pause and delete schedules (HTTP, file, ctl).
//! * `file`: the schedule file synced at start.
//! * `outcomes`: learns from `NS.events` what became of each occurrence.
//!
//! May touch: Redis (through `crate::redis_io`), `NS.events`, and the delay
//! queue, which holds each occurrence until its time.

pub(crate) mod admin;
pub(crate) mod file;
pub mod model;
pub mod outcomes;
pub mod store;
pub mod ticker;
