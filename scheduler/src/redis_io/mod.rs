//! Redis plumbing shared by the delay queue and the schedules: the
//! connection pool and its settings, the start-up checks, every key name,
//! and the Lua scripts (`scripts/*.lua`) with their typed calls.
//!
//! * `conn`: the pool and kept connections (timeouts, TLS).
//! * `setup`: start-up checks (eviction policy).
//! * `keys`: every key name, built in one place.
//! * `scripts`: the script registry: loading, `EVALSHA`, `NOSCRIPT`.
//! * `reply`: reading script replies without panicking.
//! * `delay_calls`, `schedule_calls`, `status_calls`: each script's
//!   arguments and reply.

pub mod conn;
pub(crate) mod delay_calls;
pub(crate) mod keys;
pub mod reply;
pub(crate) mod schedule_calls;
pub(crate) mod scripts;
pub(crate) mod setup;
pub(crate) mod status_calls;
