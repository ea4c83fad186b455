//! W5 schedules: 10,000 interval schedules firing every second for 30 s;
//! ticks/s, tick lateness p99, double fires.
//!
//! Schedules (issue 3) are not in this build, so this workload reports
//! "not available" rather than a number. The harness shape it will take:
//!
//! 1. create S schedules `every 1 s` in a fresh namespace, each firing
//!    `kairos.noop` with its schedule id (header `x-schedule-id`) and the
//!    occurrence's instant as `x-run-at`;
//! 2. run the scheduler and a worker with the recording handler for D s;
//! 3. ticks/s = fires recorded / D; lateness = start - `x-run-at`;
//!    double fires = (schedule id, `x-run-at`) pairs seen more than once;
//!    missed = expected occurrences (S x D) minus distinct pairs.

use super::Ctx;
use crate::report::Row;

pub const NOT_AVAILABLE: &str = "not available: schedules not in this build";

pub fn run(ctx: &mut Ctx<'_>) {
    let w = "W5 schedules";
    for metric in ["ticks", "tick lateness p99", "double fires"] {
        ctx.report.push(Row::unavailable(w, metric, NOT_AVAILABLE));
    }
}
