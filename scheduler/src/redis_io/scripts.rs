//! The registry of the scheduler's Lua scripts (`scripts/*.lua`): each is
//! listed once here, with its flags and whether the delay queue's Lua
//! library (`scripts/due_index.lua`) is prepended to it.
//!
//! Every script is loaded at start ([`load_all`]) and called by `EVALSHA`
//! ([`Script::call`]); a pipeline that meets `NOSCRIPT` (a Redis restart,
//! a failover, `SCRIPT FLUSH`) loads them all again and runs once more
//! ([`run`]). Every script is safe to run twice.

use crate::delay::store::QueueError;
use crate::redis_io::conn::RedisConn;
use redis::ServerErrorKind;
use std::sync::LazyLock;
use std::time::Duration;

/// Redis 7 script flags: the script runs even when Redis is at maxmemory
/// (with `noeviction`, every other write is refused then). Claim, complete
/// and release are what frees memory: they must never be refused. A script
/// without it that adds memory (schedule, a fire) is refused at its first
/// write, before it changed anything.
const ALLOW_OOM: &str = "#!lua flags=allow-oom\n";

/// The delay queue's Lua library: the due index and the hold functions.
const DELAY_LIBRARY: &str = include_str!("scripts/due_index.lua");

/// The task status's Lua library (`kairos_shared::status`): `st_merge`.
const STATUS_LIBRARY: &str = kairos_shared::status::STATUS_LUA_LIBRARY;

/// One of the scheduler's Lua scripts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Script {
    /// `schedule.lua`: holds one task.
    Schedule,
    /// `claim.lua`: claims a shard's due tasks into its lease set.
    Claim,
    /// `complete.lua`: forgets published tasks.
    Complete,
    /// `release.lua`: returns leased tasks to the due index.
    Release,
    /// `sched_due.lua`: reads a shard's schedules due soon.
    SchedDue,
    /// `sched_meta.lua`: reads digests and last ticks.
    SchedMeta,
    /// `sched_defs.lua`: reads definitions with their digests.
    SchedDefs,
    /// `sched_fire.lua`: the compare-and-set that fires ticks.
    SchedFire,
    /// `sched_put.lua`: creates, replaces, pauses or deletes a schedule.
    SchedPut,
    /// `sched_outcome.lua`: records an occurrence's outcome.
    SchedOutcome,
    /// `sched_beat.lua`: the schedulers' heartbeat.
    SchedBeat,
    /// `cancel.lua`: withdraws a waiting task and marks it cancelled.
    Cancel,
    /// `own_members.lua`: the schedulers that split the shards.
    OwnMembers,
    /// `own_shard.lua`: takes, renews or hands off one shard's lease.
    OwnShard,
}

/// How one script's source is put together.
struct Source {
    file: &'static str,
    allow_oom: bool,
    library: bool,
    /// The task status's library is prepended (after the delay queue's).
    status: bool,
    body: &'static str,
}

impl Script {
    /// Every script, once.
    pub(crate) const ALL: [Script; 14] = [
        Script::Schedule,
        Script::Claim,
        Script::Complete,
        Script::Release,
        Script::SchedDue,
        Script::SchedMeta,
        Script::SchedDefs,
        Script::SchedFire,
        Script::SchedPut,
        Script::SchedOutcome,
        Script::SchedBeat,
        Script::Cancel,
        Script::OwnMembers,
        Script::OwnShard,
    ];

    fn source(self) -> Source {
        macro_rules! src {
            ($file:literal, allow_oom: $oom:expr, library: $lib:expr) => {
                src!($file, allow_oom: $oom, library: $lib, status: false)
            };
            ($file:literal, allow_oom: $oom:expr, library: $lib:expr, status: $st:expr) => {
                Source {
                    file: $file,
                    allow_oom: $oom,
                    library: $lib,
                    status: $st,
                    body: include_str!(concat!("scripts/", $file)),
                }
            };
        }
        match self {
            Script::Schedule => src!("schedule.lua", allow_oom: false, library: true),
            Script::Claim => src!("claim.lua", allow_oom: true, library: true),
            Script::Complete => src!("complete.lua", allow_oom: true, library: true),
            Script::Release => src!("release.lua", allow_oom: true, library: true),
            Script::SchedDue => src!("sched_due.lua", allow_oom: false, library: false),
            Script::SchedMeta => src!("sched_meta.lua", allow_oom: false, library: false),
            Script::SchedDefs => src!("sched_defs.lua", allow_oom: false, library: false),
            Script::SchedFire => src!("sched_fire.lua", allow_oom: false, library: true),
            Script::SchedPut => src!("sched_put.lua", allow_oom: false, library: true),
            Script::SchedOutcome => src!("sched_outcome.lua", allow_oom: false, library: false),
            Script::SchedBeat => src!("sched_beat.lua", allow_oom: false, library: false),
            Script::Cancel => src!("cancel.lua", allow_oom: false, library: true, status: true),
            Script::OwnMembers => src!("own_members.lua", allow_oom: true, library: false),
            Script::OwnShard => src!("own_shard.lua", allow_oom: true, library: false),
        }
    }

    /// The script as sent to Redis: flags line, library, body.
    fn text(self) -> String {
        let s = self.source();
        let mut text = String::new();
        if s.allow_oom {
            text.push_str(ALLOW_OOM);
        }
        if s.library {
            text.push_str(DELAY_LIBRARY);
        }
        if s.status {
            text.push_str(STATUS_LIBRARY);
        }
        text.push_str(s.body);
        text
    }

    fn compiled(self) -> &'static redis::Script {
        static COMPILED: LazyLock<Vec<redis::Script>> = LazyLock::new(|| {
            Script::ALL
                .iter()
                .map(|s| redis::Script::new(&s.text()))
                .collect()
        });
        // `ALL` lists the variants in declaration order.
        &COMPILED[self as usize]
    }

    /// An `EVALSHA` of this script over `keys`; the caller adds the
    /// arguments.
    pub(crate) fn call(self, keys: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.compiled().get_hash()).arg(keys.len());
        for k in keys {
            cmd.arg(*k);
        }
        cmd
    }
}

/// Loads every script (at start, and after `NOSCRIPT`).
pub(crate) async fn load_all<C>(con: &mut C) -> redis::RedisResult<()>
where
    C: redis::aio::ConnectionLike + Send,
{
    for s in Script::ALL {
        if let Err(cause) = s.compiled().load_async(con).await {
            tracing::warn!(script = s.source().file, %cause, "cannot load a Lua script");
            return Err(cause);
        }
    }
    Ok(())
}

/// Runs a pipeline of `EVALSHA`s (and plain commands) on `redis`, loading
/// the scripts and trying once more if Redis lost them. `timeout` replaces
/// the connection's reply timeout for this call when given.
pub(crate) async fn run<T: redis::FromRedisValue>(
    redis: &RedisConn,
    pipe: &redis::Pipeline,
    timeout: Option<Duration>,
) -> Result<T, QueueError> {
    let mut con = redis.get().await?;
    if let Some(t) = timeout {
        // This handle's own setting: other clones keep theirs.
        con.set_response_timeout(t);
    }
    let reply = async {
        match con.query_pipe(pipe).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
                load_all(&mut con).await?;
                con.query_pipe(pipe).await
            }
            other => other,
        }
    };
    Ok(redis.watch(reply.await)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn all_lists_every_variant_in_order() {
        for (i, s) in Script::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
        }
    }

    #[test]
    fn every_script_file_is_listed_once() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/redis_io/scripts");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .expect("scripts dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".lua") && n != "due_index.lua")
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = Script::ALL
            .iter()
            .map(|s| s.source().file.to_string())
            .collect();
        listed.sort();
        assert_eq!(listed, on_disk);
    }

    #[test]
    fn only_the_scripts_that_free_memory_run_at_maxmemory() {
        for s in Script::ALL {
            // The ownership scripts decide who claims: refused at
            // maxmemory, a restarted scheduler would serve no shard.
            let frees = matches!(
                s,
                Script::Claim
                    | Script::Complete
                    | Script::Release
                    | Script::OwnMembers
                    | Script::OwnShard
            );
            assert_eq!(s.text().starts_with(ALLOW_OOM), frees, "{s:?}");
            assert_eq!(
                s.text().matches("#!lua").count(),
                usize::from(frees),
                "{s:?}"
            );
        }
    }

    #[test]
    fn scripts_that_touch_the_delay_queue_carry_its_library() {
        for s in Script::ALL {
            let uses = s.source().body.contains("dq_");
            assert_eq!(s.text().contains("local function dq_add"), uses, "{s:?}");
        }
    }

    #[test]
    fn schedule_scripts_touch_delay_queue_keys_only_through_its_library() {
        // KEYS[4] and KEYS[5] of the schedule scripts that hold occurrences
        // are the delay queue's (`OccurrenceHold`): only `dq_` functions
        // may use them.
        for s in [Script::SchedFire, Script::SchedPut] {
            for line in s.source().body.lines() {
                let code = line.split("--").next().unwrap_or_default();
                if code.contains("KEYS[4]") || code.contains("KEYS[5]") {
                    assert!(code.contains("dq_"), "{s:?}: {line}");
                }
            }
        }
    }

    #[test]
    fn every_script_has_its_own_hash() {
        let hashes: HashSet<&str> = Script::ALL
            .iter()
            .map(|s| s.compiled().get_hash())
            .collect();
        assert_eq!(hashes.len(), Script::ALL.len());
    }

    #[test]
    fn a_call_names_the_hash_and_the_keys() {
        let cmd = Script::SchedBeat.call(&["k1"]);
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(args[0], b"EVALSHA");
        assert_eq!(args[1], Script::SchedBeat.compiled().get_hash().as_bytes());
        assert_eq!(args[2], b"1");
        assert_eq!(args[3], b"k1");
    }
}
