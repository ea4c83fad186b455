//! Redis plumbing shared by the delay queue and the schedules: the
//! connection pool and its settings, the start-up checks, and the Lua
//! scripts (`scripts/*.lua`).
//!
//! * `conn`: the pool and dedicated connections (timeouts, TLS).
//! * `setup`: start-up checks (eviction policy).
//!
//! Knows no key of its own: each feature builds its keys and calls its
//! scripts.

pub mod conn;
pub mod setup;
