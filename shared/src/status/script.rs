//! The status scripts (`merge.lua`, `checkpoint.lua`, with `status.lua`
//! prepended to the merge) and running them: `EVALSHA`, and on `NOSCRIPT`
//! (a Redis restart, a failover) loading them and running once more.

use super::keys::StatusKeys;
use super::update::StatusUpdate;
use super::{StatusError, STATUS_LUA_LIBRARY};
use crate::redis::RedisConn;
use redis::ServerErrorKind;
use std::sync::LazyLock;

/// `merge.lua` with the library.
static MERGE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{STATUS_LUA_LIBRARY}{}",
        include_str!("merge.lua")
    ))
});

/// `checkpoint.lua`.
static CHECKPOINT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("checkpoint.lua")));

/// Updates one merge call carries at most: a call runs about 15 µs of
/// Redis time per update, and holds every other client meanwhile.
pub(super) const MERGE_CHUNK: usize = 64;

/// The `EVALSHA` merging `updates` (all of shard `shard`, at most
/// [`MERGE_CHUNK`]) into the task statuses, kept `ttl_s` (see
/// `status.lua`).
pub(super) fn merge_command(
    keys: &StatusKeys,
    shard: usize,
    ttl_s: u64,
    updates: &[&StatusUpdate],
) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(MERGE.get_hash())
        .arg(1 + 2 * updates.len())
        .arg(keys.recent(shard));
    for u in updates {
        cmd.arg(keys.task(shard, &u.id))
            .arg(keys.checkpoint(shard, &u.id));
    }
    cmd.arg(keys.wait_prefix(shard)).arg(ttl_s);
    for u in updates {
        cmd.arg(&u.id)
            .arg(u.state.map_or("", |s| s.as_str()))
            .arg(u.rank())
            .arg(match (u.fresh, u.again) {
                (_, true) => "2",
                (true, false) => "1",
                _ => "",
            })
            .arg(2 * u.fields.len());
        for (name, value) in &u.fields {
            cmd.arg(*name).arg(value.as_slice());
        }
    }
    cmd
}

/// The `EVALSHA` saving a checkpoint of task `id`.
pub(super) fn checkpoint_command(
    keys: &StatusKeys,
    shard: usize,
    ttl_s: u64,
    id: &str,
    bytes: &[u8],
) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(CHECKPOINT.get_hash())
        .arg(2)
        .arg(keys.task(shard, id))
        .arg(keys.checkpoint(shard, id))
        .arg(bytes)
        .arg(ttl_s);
    cmd
}

/// Runs `pipe` on `redis`, loading the scripts and trying once more if
/// Redis lost them.
pub(super) async fn run<T: redis::FromRedisValue>(
    redis: &RedisConn,
    pipe: &redis::Pipeline,
) -> Result<T, StatusError> {
    let mut con = redis.get().await?;
    let reply = async {
        match con.query_pipe(pipe).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
                MERGE.load_async(&mut con).await?;
                CHECKPOINT.load_async(&mut con).await?;
                con.query_pipe(pipe).await
            }
            other => other,
        }
    };
    Ok(redis.watch(reply.await)?)
}
