//! Task status: what became of every task, kept in Redis beside its
//! delay-queue shard (docs/ARCHITECTURE.md, "Task status").
//!
//! * [`StatusUpdate`]: one step of a task (`scheduled`, `ready`,
//!   `running`, ...), built from the task where the step happens.
//! * [`StatusWriter`]: records updates off the hot path: a bounded
//!   channel, and a supervised loop that merges them into Redis in
//!   batches (one pipeline of `EVALSHA`s); when Redis is down or behind,
//!   updates are dropped and counted, never waited for.
//! * [`StatusStore`]: reads statuses (`get`, `list`) and writes what a
//!   caller must know is durable (checkpoints, results, progress).
//! * `keys`: every status key, and the shard count shared with the delay
//!   queue.
//!
//! Keys per task id, with shard `S` the delay queue's
//! ([`crate::redis::shard_of`] over `NS:dq:shards`): `NS:st{S}:t:ID`
//! (hash), `NS:st{S}:cp:ID` (checkpoint), `NS:st{S}:recent` (zset id ->
//! updated ms), `NS:st{S}:wait:QUEUE` (zset id -> due ms, tasks waiting in
//! the delay queue); `NS:queues` (set of logical queues) and
//! `NS:rate:QUEUE` (hash `EVENT:B` -> count, B = Unix s / 10).
//!
//! The merge rules (rank, fresh reset, TTL) are in `status.lua`.

mod keys;
mod script;
mod store;
mod update;
mod writer;

pub use keys::{ShardCount, StatusKeys, DEFAULT_SHARDS};
pub use store::{
    ListFilter, Page, ResultField, StatusError, StatusStore, TaskResultValue, TaskStatus,
};
pub use update::{RateEvent, StatusUpdate, TaskState, RANK_TERMINAL};
pub use writer::{StatusWriter, BATCH};

use clap::builder::BoolishValueParser;
use clap::Args;

/// The task status's Lua library (`status.lua`): `st_merge` and its
/// helpers. Prepended to the writer's merge script, and to the scheduler's
/// cancel script, which marks a task `cancelled` in the same atomic step
/// that withdraws it from the delay queue.
pub const STATUS_LUA_LIBRARY: &str = include_str!("status.lua");

/// Default retention of a finished task's status: 24 h.
pub const DEFAULT_TTL_S: u64 = 86_400;

/// The task status settings, shared by the scheduler and the worker.
#[derive(Args, Clone, Debug)]
pub struct StatusSettings {
    /// Keep every task's status in Redis (true/false): `GET /v1/tasks/ID`,
    /// cancel, the dashboard and the queue rates need it.
    #[arg(long = "status", env = "KAIROS_STATUS", value_name = "KAIROS_STATUS", default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub status: bool,

    /// How long a finished task's status (and checkpoint) is kept, in
    /// seconds; a waiting task's is kept until this long after its due
    /// time.
    #[arg(long, env = "KAIROS_STATUS_TTL_S", value_name = "KAIROS_STATUS_TTL_S", default_value_t = DEFAULT_TTL_S, value_parser = clap::value_parser!(u64).range(1..=315_360_000))]
    pub status_ttl_s: u64,
}

impl Default for StatusSettings {
    fn default() -> Self {
        StatusSettings {
            status: true,
            status_ttl_s: DEFAULT_TTL_S,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        status: StatusSettings,
    }

    #[test]
    fn settings_default_on_for_a_day_and_name_themselves() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert!(cli.status.status);
        assert_eq!(cli.status.status_ttl_s, 86_400);
        let off = Cli::try_parse_from(["x", "--status", "false", "--status-ttl-s", "5"]).unwrap();
        assert!(!off.status.status);
        assert_eq!(off.status.status_ttl_s, 5);
        let err = Cli::try_parse_from(["x", "--status-ttl-s", "0"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("status-ttl-s"), "{err}");
    }
}
