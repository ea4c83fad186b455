//! Typed calls of the schedule scripts: each `…Args` builds its script's
//! `EVALSHA` (keys and arguments in the order the script reads them), and
//! each `decode` reads what the script returns.
//!
//! The calls that hold or withdraw occurrences (fire, put) take the delay
//! queue's [`OccurrenceHold`] for the shard and pass its keys on without
//! knowing them.

use crate::delay::store::OccurrenceHold;
use crate::redis_io::keys::ScheduleShardKeys;
use crate::redis_io::reply::{int, Reader, ReplyError};
use crate::redis_io::scripts::Script;
use crate::schedules::store::{Fire, Fired};
use redis::Value;

/// `sched_due.lua`: a shard's schedules whose next tick is near.
pub(crate) struct DueArgs<'a> {
    /// The shard's keys.
    pub(crate) keys: &'a ScheduleShardKeys,
    /// How far past now to look.
    pub(crate) lookahead_ms: i64,
    /// Most schedules to return.
    pub(crate) batch: usize,
}

/// What one shard's `sched_due.lua` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DueReply {
    /// Redis's clock (ms).
    pub(crate) now: i64,
    /// The earliest tick past the lookahead.
    pub(crate) later: Option<i64>,
    /// The batch was full: more may be due.
    pub(crate) full: bool,
    /// Each due schedule's id and next tick.
    pub(crate) items: Vec<(String, i64)>,
}

impl DueArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        let mut cmd = Script::SchedDue.call(&[&self.keys.next]);
        cmd.arg(self.lookahead_ms).arg(self.batch);
        cmd
    }

    /// `{now, later or -1, full 0/1, id1, next1, ...}`.
    pub(crate) fn decode(reply: Value) -> Result<DueReply, ReplyError> {
        let mut r = Reader::new(reply, "due reply")?;
        let now = r.int("now")?;
        let later = r.opt_time("later")?;
        let full = r.int("full")? == 1;
        let mut items = Vec::new();
        while !r.is_done() {
            items.push((r.string("id")?, r.int("next")?));
        }
        Ok(DueReply {
            now,
            later,
            full,
            items,
        })
    }
}

/// `sched_meta.lua`: digests and last ticks of some schedules of a shard.
pub(crate) struct MetaArgs<'a> {
    /// The shard's keys.
    pub(crate) keys: &'a ScheduleShardKeys,
    /// The schedules.
    pub(crate) ids: Vec<&'a str>,
}

impl MetaArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        with_ids(
            Script::SchedMeta,
            &[&self.keys.def, &self.keys.state],
            &self.ids,
        )
    }

    /// Per id: its digest (empty when missing) and its last tick.
    pub(crate) fn decode(reply: Value) -> Result<Vec<(String, Option<i64>)>, ReplyError> {
        each(reply, "meta reply", |r| {
            Ok((r.string("digest")?, r.opt_time("last")?))
        })
    }
}

/// `sched_defs.lua`: definitions of some schedules of a shard.
pub(crate) struct DefsArgs<'a> {
    /// The shard's keys.
    pub(crate) keys: &'a ScheduleShardKeys,
    /// The schedules.
    pub(crate) ids: Vec<&'a str>,
}

impl DefsArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        with_ids(Script::SchedDefs, &[&self.keys.def], &self.ids)
    }

    /// Per id: its digest and definition (both empty when missing).
    pub(crate) fn decode(reply: Value) -> Result<Vec<(String, Vec<u8>)>, ReplyError> {
        each(reply, "defs reply", |r| {
            Ok((r.string("digest")?, r.bytes("definition")?))
        })
    }
}

/// `script` over `keys`, with `ids` as its arguments.
fn with_ids(script: Script, keys: &[&str], ids: &[&str]) -> redis::Cmd {
    let mut cmd = script.call(keys);
    for id in ids {
        cmd.arg(*id);
    }
    cmd
}

/// Reads an array reply to its end, one `item` at a time.
fn each<T>(
    reply: Value,
    what: &'static str,
    mut item: impl FnMut(&mut Reader) -> Result<T, ReplyError>,
) -> Result<Vec<T>, ReplyError> {
    let mut r = Reader::new(reply, what)?;
    let mut out = Vec::new();
    while !r.is_done() {
        out.push(item(&mut r)?);
    }
    Ok(out)
}

/// `sched_fire.lua`: the compare-and-set of a shard's schedules, holding
/// their occurrences in the delay queue in the same step.
pub(crate) struct FireArgs<'a> {
    /// The shard's keys.
    pub(crate) keys: &'a ScheduleShardKeys,
    /// The delay queue's hold for the same shard.
    pub(crate) hold: &'a OccurrenceHold,
    /// The schedules to fire.
    pub(crate) fires: Vec<&'a Fire>,
}

impl FireArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        let [hold_a, hold_b] = self.hold.keys();
        let k = self.keys;
        let mut cmd = Script::SchedFire.call(&[&k.next, &k.def, &k.state, hold_a, hold_b]);
        cmd.arg(self.hold.wake_channel()).arg(self.fires.len());
        for f in &self.fires {
            cmd.arg(&f.id)
                .arg(f.expected_next)
                .arg(&f.digest)
                .arg(f.new_next.map(|n| n.to_string()).unwrap_or_default())
                .arg(if f.overlap_skip { "1" } else { "0" })
                .arg(f.max_run_ms)
                .arg(f.occurrences.len());
            for o in &f.occurrences {
                OccurrenceHold::push_task(&mut cmd, &o.member, o.tick, &o.record);
            }
        }
        cmd
    }

    /// Per schedule `{fired 0/1, enqueued, skipped}`.
    pub(crate) fn decode(reply: Value) -> Result<Vec<Fired>, ReplyError> {
        each(reply, "fire reply", |r| {
            let mut item = Reader::new(r.value("fire item")?, "fire item")?;
            Ok(Fired {
                won: item.int("fired")? == 1,
                enqueued: count(item.int("enqueued")?, "enqueued")?,
                skipped: count(item.int("skipped")?, "skipped")?,
            })
        })
    }
}

/// A count, which cannot be negative.
fn count(n: i64, what: &'static str) -> Result<u64, ReplyError> {
    u64::try_from(n).map_err(|_| ReplyError::Unexpected {
        what,
        expected: "a count",
        got: n.to_string(),
    })
}

/// `sched_put.lua`: creates, replaces, pauses, resumes or deletes one
/// schedule.
pub(crate) struct PutArgs<'a> {
    /// The shard's keys.
    pub(crate) keys: &'a ScheduleShardKeys,
    /// The delay queue's hold for the same shard.
    pub(crate) hold: &'a OccurrenceHold,
    /// The schedule.
    pub(crate) id: &'a str,
    /// Its definition JSON; `None` deletes it.
    pub(crate) definition: Option<&'a str>,
    /// Its next tick; `None`: paused or no more ticks.
    pub(crate) next: Option<i64>,
    /// Withdraw occurrences held ahead of their tick.
    pub(crate) withdraw: bool,
}

impl PutArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        let [hold_a, hold_b] = self.hold.keys();
        let k = self.keys;
        let mut cmd = Script::SchedPut.call(&[&k.next, &k.def, &k.state, hold_a, hold_b]);
        cmd.arg(self.id)
            .arg(self.definition.unwrap_or_default())
            .arg(self.next.map(|n| n.to_string()).unwrap_or_default())
            .arg(if self.withdraw { "1" } else { "0" });
        cmd
    }

    /// True when the id was new (a put) or existed (a delete).
    pub(crate) fn decode(reply: Value) -> Result<bool, ReplyError> {
        Ok(int(reply, "put reply")? == 1)
    }
}

/// `sched_outcome.lua`: records what became of an occurrence.
pub(crate) struct OutcomeArgs<'a> {
    /// The shard's keys.
    pub(crate) keys: &'a ScheduleShardKeys,
    /// The schedule.
    pub(crate) schedule_id: &'a str,
    /// The occurrence's task id.
    pub(crate) task_id: &'a str,
    /// The occurrence's tick.
    pub(crate) tick: i64,
    /// The occurrence is over (succeeded or dead).
    pub(crate) over: bool,
    /// The outcome JSON.
    pub(crate) outcome: &'a str,
}

impl OutcomeArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        let mut cmd = Script::SchedOutcome.call(&[&self.keys.state]);
        cmd.arg(self.schedule_id)
            .arg(self.task_id)
            .arg(self.tick)
            .arg(if self.over { "1" } else { "0" })
            .arg(self.outcome);
        cmd
    }

    /// True when the outcome was recorded (not older than the one stored).
    pub(crate) fn decode(reply: Value) -> Result<bool, ReplyError> {
        Ok(int(reply, "outcome reply")? == 1)
    }
}

/// `sched_beat.lua`: a scheduler's heartbeat.
pub(crate) struct BeatArgs<'a> {
    /// The heartbeat key.
    pub(crate) key: &'a str,
    /// Beats further apart than this start a new live period.
    pub(crate) gap_ms: i64,
}

impl BeatArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        let mut cmd = Script::SchedBeat.call(&[self.key]);
        cmd.arg(self.gap_ms);
        cmd
    }

    /// The start of the live period (Redis's clock, ms).
    pub(crate) fn decode(reply: Value) -> Result<i64, ReplyError> {
        int(reply, "beat reply")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_io::keys::Keys;
    use crate::schedules::store::Occurrence;

    /// The arguments after `EVALSHA sha`.
    fn args(cmd: &redis::Cmd) -> Vec<String> {
        cmd.args_iter()
            .skip(2)
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            })
            .collect()
    }

    #[test]
    fn a_fire_passes_the_delay_queues_hold_keys_and_its_occurrences() {
        let keys = Keys::new("ns");
        let hold = OccurrenceHold::new(&keys.delay_shard(1, "c"), "ns:dq:wake");
        let fire = Fire {
            shard: 1,
            id: "s".into(),
            expected_next: 100,
            digest: "d".into(),
            last: None,
            new_next: None,
            overlap_skip: true,
            max_run_ms: 5,
            occurrences: vec![Occurrence {
                member: "s@100".into(),
                tick: 100,
                record: b"r".to_vec(),
            }],
        };
        let cmd = FireArgs {
            keys: &keys.schedule_shard(1),
            hold: &hold,
            fires: vec![&fire],
        }
        .command();
        let want = [
            "5",
            "ns:dq{1}:snext",
            "ns:dq{1}:sdef",
            "ns:dq{1}:sstate",
            "ns:dq{1}:idx",
            "ns:dq{1}:rec",
            "ns:dq:wake",
            "1",
            "s",
            "100",
            "d",
            "",
            "1",
            "5",
            "1",
            "s@100",
            "100",
            "r",
        ];
        assert_eq!(args(&cmd), want);
    }

    #[test]
    fn a_delete_sends_no_definition_and_withdraws() {
        let keys = Keys::new("ns");
        let hold = OccurrenceHold::new(&keys.delay_shard(0, "c"), "w");
        let cmd = PutArgs {
            keys: &keys.schedule_shard(0),
            hold: &hold,
            id: "s",
            definition: None,
            next: None,
            withdraw: true,
        }
        .command();
        assert_eq!(args(&cmd)[6..], ["s", "", "", "1"]);
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn decodes_due_schedules() {
        let reply = Value::Array(vec![
            Value::Int(1000),
            Value::Int(5000),
            Value::Int(1),
            bulk("s1"),
            Value::Int(1200),
        ]);
        let got = DueArgs::decode(reply).expect("due");
        assert_eq!(
            got,
            DueReply {
                now: 1000,
                later: Some(5000),
                full: true,
                items: vec![("s1".into(), 1200)],
            }
        );
        let cut = Value::Array(vec![
            Value::Int(1000),
            Value::Int(-1),
            Value::Int(0),
            bulk("s1"),
        ]);
        assert!(matches!(
            DueArgs::decode(cut),
            Err(ReplyError::Missing("next"))
        ));
    }

    #[test]
    fn decodes_meta_and_definitions() {
        let meta = Value::Array(vec![bulk("abc"), Value::Int(-1), bulk(""), Value::Int(7)]);
        assert_eq!(
            MetaArgs::decode(meta).expect("meta"),
            vec![("abc".into(), None), (String::new(), Some(7))]
        );
        let defs = Value::Array(vec![bulk("abc"), bulk("{}")]);
        assert_eq!(
            DefsArgs::decode(defs).expect("defs"),
            vec![("abc".into(), b"{}".to_vec())]
        );
        let odd = Value::Array(vec![bulk("abc")]);
        assert!(DefsArgs::decode(odd).is_err());
    }

    #[test]
    fn decodes_fires_and_rejects_malformed_ones() {
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(1), Value::Int(2), Value::Int(0)]),
            Value::Array(vec![Value::Int(0), Value::Int(0), Value::Int(0)]),
        ]);
        let got = FireArgs::decode(reply).expect("fire");
        assert_eq!(
            got,
            vec![
                Fired {
                    won: true,
                    enqueued: 2,
                    skipped: 0
                },
                Fired {
                    won: false,
                    enqueued: 0,
                    skipped: 0
                },
            ]
        );
        let flat = Value::Array(vec![Value::Int(1), Value::Int(2), Value::Int(0)]);
        assert!(FireArgs::decode(flat).is_err());
        let negative = Value::Array(vec![Value::Array(vec![
            Value::Int(1),
            Value::Int(-2),
            Value::Int(0),
        ])]);
        assert!(FireArgs::decode(negative).is_err());
    }

    #[test]
    fn single_value_replies_must_be_integers() {
        assert!(PutArgs::decode(Value::Int(1)).expect("put"));
        assert!(!OutcomeArgs::decode(Value::Int(0)).expect("outcome"));
        assert_eq!(BeatArgs::decode(Value::Int(99)).expect("beat"), 99);
        assert!(BeatArgs::decode(Value::Nil).is_err());
        assert!(PutArgs::decode(bulk("1")).is_err());
    }
}
