//! Timed triggers: the schedule model, its validation, the tick arithmetic
//! (cron with time zones and DST, intervals, one-shots) and the misfire plan.
//! Everything here is pure and unit-tested; Redis lives in
//! `schedule_store`, the firing loop in `ticker`.
//!
//! * `spec`: what a user writes (JSON over HTTP, TOML in the file), and the
//!   validated [`Schedule`] built from it.
//! * `trigger`: the next tick after an instant, DST rules included.
//! * `plan`: which ticks to fire now, given misfire policy and lookahead.
//! * `occurrence`: the task an occurrence becomes.

pub mod occurrence;
pub mod plan;
pub mod spec;
pub mod trigger;

pub use spec::{Misfire, Overlap, Schedule, ScheduleSpec, SpecError};
pub use trigger::Trigger;
