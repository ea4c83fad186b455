//! Redis Cluster hash slots of a pipeline's commands: a cluster runs a
//! pipeline on one node only, and redis-rs refuses one whose keys span
//! slots (CrossSlot). Kairos pipelines several shards (`{S}` hash tags)
//! in one round trip in places (the claim over every shard, the schedules'
//! reads, the ownership round); on a cluster such a pipeline is run as one
//! pipeline per slot, concurrently, and the replies put back in order.

use redis::aio::ConnectionLike;
use redis::{Arg, Cmd, FromRedisValue, Pipeline, RedisResult, Value};

/// The number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the
/// first `{` and the next `}`, when not empty) or of the whole key.
pub fn slot_of(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16_xmodem(tagged) % SLOTS
}

fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The key that routes `cmd` (the first key of a script call, else the
/// first argument), or `None` for a command without a key (`TIME`, `WAIT`,
/// a script call with no key...). Covers the commands Kairos sends.
pub fn key_of(cmd: &Cmd) -> Option<Vec<u8>> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        Arg::Simple(b) => Some(b),
        _ => None,
    });
    let name = args.next()?.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let _script = args.next()?;
            let numkeys: usize = std::str::from_utf8(args.next()?).ok()?.parse().ok()?;
            if numkeys == 0 {
                return None;
            }
            args.next().map(<[u8]>::to_vec)
        }
        b"TIME" | b"WAIT" | b"PING" | b"PUBLISH" | b"SCRIPT" | b"INFO" | b"CONFIG" => None,
        _ => args.next().map(<[u8]>::to_vec),
    }
}

/// The commands of `pipe` grouped by slot (in first-seen order, each
/// group's commands in pipeline order), and the keyless ones: `None` when
/// every keyed command shares one slot (the pipeline can go as it is).
fn groups(pipe: &Pipeline) -> Option<(Vec<Vec<usize>>, Vec<usize>)> {
    let mut slots: Vec<(u16, Vec<usize>)> = Vec::new();
    let mut keyless = Vec::new();
    for (i, cmd) in pipe.cmd_iter().enumerate() {
        match key_of(cmd).map(|k| slot_of(&k)) {
            Some(slot) => match slots.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, group)) => group.push(i),
                None => slots.push((slot, vec![i])),
            },
            None => keyless.push(i),
        }
    }
    if slots.len() <= 1 {
        return None;
    }
    Some((slots.into_iter().map(|(_, g)| g).collect(), keyless))
}

/// Runs `pipe` on a cluster connection: as it is when its keys share one
/// slot, else one pipeline per slot, concurrently, then the keyless
/// commands one by one (so a `WAIT`, which redis-rs sends to every master,
/// follows the writes), and the replies in the pipeline's order. A
/// pipeline that spans slots must not `ignore()` a command: its reply
/// would be returned (redis-rs does not say which ones are ignored).
pub async fn query_by_slot<C, T>(con: &mut C, pipe: &Pipeline) -> RedisResult<T>
where
    C: ConnectionLike + Clone + Send,
    T: FromRedisValue,
{
    let Some((groups, keyless)) = groups(pipe) else {
        return pipe.query_async(con).await;
    };
    let cmds: Vec<&Cmd> = pipe.cmd_iter().collect();
    let runs = groups.iter().map(|group| {
        let mut sub = redis::pipe();
        for &i in group {
            sub.add_command(cmds[i].clone());
        }
        let mut con = con.clone();
        async move { sub.query_async::<Vec<Value>>(&mut con).await }
    });
    let replies = futures_util::future::try_join_all(runs).await?;
    let mut ordered: Vec<Option<Value>> = vec![None; cmds.len()];
    for (group, values) in groups.iter().zip(replies) {
        for (&i, v) in group.iter().zip(values) {
            ordered[i] = Some(v);
        }
    }
    for i in keyless {
        ordered[i] = Some(cmds[i].query_async::<Value>(con).await?);
    }
    let values = ordered
        .into_iter()
        .map(|v| v.unwrap_or(Value::Nil))
        .collect();
    Ok(T::from_redis_value(Value::Array(values))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"123456789"), 12739);
        assert_eq!(slot_of(b"ns:dq{3}:due"), slot_of(b"3"));
        assert_eq!(slot_of(b"a{}b"), slot_of(b"a{}b"));
        assert_ne!(slot_of(b"a{}b"), slot_of(b""));
    }

    #[test]
    fn pipelines_are_grouped_by_the_slot_of_their_first_key() {
        let mut pipe = redis::pipe();
        pipe.cmd("EVALSHA")
            .arg("sha")
            .arg(2)
            .arg("k{1}")
            .arg("l{1}");
        pipe.cmd("HLEN").arg("x{2}");
        pipe.cmd("TIME");
        pipe.cmd("HLEN").arg("y{1}");
        let (groups, keyless) = groups(&pipe).expect("two slots");
        assert_eq!(groups, [vec![0, 3], vec![1]]);
        assert_eq!(keyless, [2]);
        let mut one = redis::pipe();
        one.cmd("HLEN").arg("x{2}").cmd("WAIT").arg(1).arg(0);
        assert!(groups_is_none(&one));
    }

    fn groups_is_none(pipe: &Pipeline) -> bool {
        groups(pipe).is_none()
    }
}
