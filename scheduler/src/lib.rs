//! # kairos-scheduler
//!
//! The trigger service: holds delayed and retrying tasks in the sharded Redis
//! delay queue and publishes them to RabbitMQ when they fall due, and fires
//! cron, interval and one-shot schedules through it.
//!
//! * [`delay`]: the delay queue (intake, store, pump, retries, wake-ups).
//! * [`schedules`]: timed triggers (model, store, ticker, admin, outcomes).
//! * [`api`]: the HTTP API behind one guard.
//! * `due_soon`: the gauges of work due within the next minute.
//! * [`redis_io`]: the Redis connection, start-up checks and Lua scripts.
//! * `timing`: Redis's clock and the sub-millisecond publish timers.
//! * `service`: `run` (the scheduler's steps) and `local_api`.
//! * [`config`]: every setting, from flags and the environment.
//!
//! See docs/ARCHITECTURE.md for a task's journey and where to change what.

// Every public item is documented, and nothing is public that no other
// crate can reach (issue 15).
#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod config;
pub mod delay;
mod due_soon;
pub mod redis_io;
pub mod schedules;
mod service;
mod shards;
mod timing;

pub use config::Config;
pub use service::{local_api, run, SchedulerError};
