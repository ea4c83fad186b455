//! Typed calls of the delay queue's scripts: each `…Args` builds its
//! script's `EVALSHA` (keys and arguments in the order the script reads
//! them), and each reply type decodes what the script returns.

use crate::delay::store::Scheduled;
use crate::redis_io::keys::DelayShardKeys;
use crate::redis_io::reply::{int, Reader, ReplyError};
use crate::redis_io::scripts::Script;
use redis::Value;

/// `schedule.lua`: holds one task unless its member is already held.
pub(crate) struct HoldArgs<'a> {
    /// The shard's keys.
    pub(crate) keys: &'a DelayShardKeys,
    /// The member to hold.
    pub(crate) member: &'a str,
    /// Absolute due time; `None`: `delay_ms` after Redis's now.
    pub(crate) run_at: Option<i64>,
    /// The delay used without `run_at`.
    pub(crate) delay_ms: i64,
    /// The stored record.
    pub(crate) record: &'a [u8],
    /// Published to when the task becomes the shard's earliest.
    pub(crate) wake_channel: &'a str,
    /// Rewrite a record already held, so this connection's `WAIT` covers it.
    pub(crate) touch: bool,
}

impl HoldArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        let mut cmd = Script::Schedule.call(&[&self.keys.idx, &self.keys.rec]);
        cmd.arg(self.member)
            .arg(self.run_at.map(|t| t.to_string()).unwrap_or_default())
            .arg(self.delay_ms)
            .arg(self.record)
            .arg(self.wake_channel)
            .arg(if self.touch { "1" } else { "" });
        cmd
    }

    /// `{added 0/1, due, head 0/1}`.
    pub(crate) fn decode(reply: Value) -> Result<Scheduled, ReplyError> {
        let mut r = Reader::new(reply, "schedule reply")?;
        Ok(Scheduled {
            added: r.int("added")? == 1,
            due: r.int("due")?,
            head: r.int("head")? == 1,
        })
    }
}

/// `claim.lua`: claims a batch of a shard's due tasks into its lease set.
pub(crate) struct ClaimArgs<'a> {
    /// The shard's keys.
    pub(crate) keys: &'a DelayShardKeys,
    /// Most tasks to take.
    pub(crate) batch: usize,
    /// How long the lease lasts.
    pub(crate) lease_ms: u64,
    /// Tasks due up to this long after now are taken too.
    pub(crate) ahead_ms: u64,
    /// The claimer's count of claims answered so far.
    pub(crate) round: u64,
    /// The claim stops once its records sum to this many bytes.
    pub(crate) batch_bytes: usize,
}

/// One task a claim took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClaimedTask {
    /// Its member.
    pub(crate) member: String,
    /// Its due time (Unix ms, Redis's clock).
    pub(crate) due: i64,
    /// Its stored record.
    pub(crate) record: Vec<u8>,
}

/// What one shard's claim returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClaimReply {
    /// Redis's clock when the claim ran, in microseconds.
    pub(crate) now_us: i64,
    /// The shard's earliest due time left, if any.
    pub(crate) head: Option<i64>,
    /// The tasks taken.
    pub(crate) tasks: Vec<ClaimedTask>,
}

impl ClaimArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        let k = self.keys;
        let mut cmd = Script::Claim.call(&[&k.idx, &k.rec, &k.lease, &k.claim]);
        cmd.arg(self.batch)
            .arg(self.lease_ms)
            .arg(self.ahead_ms)
            .arg(self.round)
            .arg(self.batch_bytes.max(1));
        cmd
    }

    /// `{now µs, head or -1, member1, due1, record1, member2, ...}`.
    pub(crate) fn decode(reply: Value) -> Result<ClaimReply, ReplyError> {
        let mut r = Reader::new(reply, "claim reply")?;
        let now_us = r.int("now")?;
        let head = r.opt_time("head")?;
        let mut tasks = Vec::new();
        while !r.is_done() {
            tasks.push(ClaimedTask {
                member: r.string("member")?,
                due: r.int("due")?,
                record: r.bytes("record")?,
            });
        }
        Ok(ClaimReply {
            now_us,
            head,
            tasks,
        })
    }
}

/// `complete.lua`: forgets tasks whose publish the broker confirmed.
pub(crate) struct CompleteArgs<'a> {
    /// The shard's keys.
    pub(crate) keys: &'a DelayShardKeys,
    /// This repeats a call whose outcome is unknown.
    pub(crate) again: bool,
    /// The members to forget.
    pub(crate) members: Vec<&'a str>,
}

impl CompleteArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        let k = self.keys;
        let mut cmd = Script::Complete.call(&[&k.idx, &k.rec, &k.lease]);
        cmd.arg(if self.again { "1" } else { "0" });
        for m in &self.members {
            cmd.arg(*m);
        }
        cmd
    }

    /// The count of records deleted.
    pub(crate) fn decode(reply: Value) -> Result<i64, ReplyError> {
        int(reply, "complete reply")
    }
}

/// `release.lua`: puts leased tasks back into the due index.
pub(crate) struct ReleaseArgs<'a> {
    /// The shard's keys.
    pub(crate) keys: &'a DelayShardKeys,
    /// The least delay from now before they fall due again.
    pub(crate) delay_ms: u64,
    /// Each member with its due time.
    pub(crate) tasks: Vec<(&'a str, i64)>,
}

impl ReleaseArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        let k = self.keys;
        let mut cmd = Script::Release.call(&[&k.idx, &k.rec, &k.lease]);
        cmd.arg(self.delay_ms);
        for (member, due) in &self.tasks {
            cmd.arg(*member).arg(*due);
        }
        cmd
    }

    /// The count of tasks moved back.
    pub(crate) fn decode(reply: Value) -> Result<i64, ReplyError> {
        int(reply, "release reply")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_io::keys::Keys;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    /// The arguments after `EVALSHA sha numkeys`.
    fn args(cmd: &redis::Cmd) -> Vec<Vec<u8>> {
        cmd.args_iter()
            .skip(2)
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_claim_names_its_keys_and_never_asks_for_zero_bytes() {
        let keys = Keys::new("ns").delay_shard(2, "c");
        let cmd = ClaimArgs {
            keys: &keys,
            batch: 10,
            lease_ms: 30_000,
            ahead_ms: 5,
            round: 7,
            batch_bytes: 0,
        }
        .command();
        let want: Vec<&[u8]> = vec![
            b"4",
            b"ns:dq{2}:idx",
            b"ns:dq{2}:rec",
            b"ns:dq{2}:lease",
            b"ns:dq{2}:claim:c",
            b"10",
            b"30000",
            b"5",
            b"7",
            b"1",
        ];
        assert_eq!(args(&cmd), want);
    }

    #[test]
    fn a_hold_without_run_at_sends_an_empty_one() {
        let keys = Keys::new("ns").delay_shard(0, "c");
        let cmd = HoldArgs {
            keys: &keys,
            member: "m",
            run_at: None,
            delay_ms: 50,
            record: b"r",
            wake_channel: "w",
            touch: false,
        }
        .command();
        let want: Vec<&[u8]> = vec![
            b"2",
            b"ns:dq{0}:idx",
            b"ns:dq{0}:rec",
            b"m",
            b"",
            b"50",
            b"r",
            b"w",
            b"",
        ];
        assert_eq!(args(&cmd), want);
    }

    #[test]
    fn decodes_a_claim() {
        let reply = Value::Array(vec![
            Value::Int(1_000_123),
            Value::Int(-1),
            bulk(b"a"),
            Value::Int(999),
            bulk(b"rec-a"),
        ]);
        let got = ClaimArgs::decode(reply).expect("claim");
        assert_eq!(got.now_us, 1_000_123);
        assert_eq!(got.head, None);
        assert_eq!(
            got.tasks,
            vec![ClaimedTask {
                member: "a".into(),
                due: 999,
                record: b"rec-a".to_vec(),
            }]
        );
    }

    #[test]
    fn a_malformed_claim_is_an_error() {
        // A task cut short.
        let short = Value::Array(vec![Value::Int(1), Value::Int(5), bulk(b"a")]);
        assert!(matches!(
            ClaimArgs::decode(short),
            Err(ReplyError::Missing("due"))
        ));
        // A record that is not a string.
        let wrong = Value::Array(vec![
            Value::Int(1),
            Value::Int(5),
            bulk(b"a"),
            Value::Int(1),
            Value::Int(2),
        ]);
        assert!(ClaimArgs::decode(wrong).is_err());
        assert!(ClaimArgs::decode(Value::Nil).is_err());
    }

    #[test]
    fn decodes_a_hold_and_rejects_a_short_one() {
        let reply = Value::Array(vec![Value::Int(1), Value::Int(42), Value::Int(0)]);
        let got = HoldArgs::decode(reply).expect("hold");
        assert_eq!(
            got,
            Scheduled {
                added: true,
                due: 42,
                head: false
            }
        );
        let short = Value::Array(vec![Value::Int(1)]);
        assert!(matches!(
            HoldArgs::decode(short),
            Err(ReplyError::Missing("due"))
        ));
    }

    #[test]
    fn complete_and_release_send_their_members_and_count() {
        let keys = Keys::new("ns").delay_shard(1, "c");
        let cmd = ReleaseArgs {
            keys: &keys,
            delay_ms: 0,
            tasks: vec![("a", 5), ("b", 6)],
        }
        .command();
        assert_eq!(
            &args(&cmd)[4..],
            [
                b"0".to_vec(),
                b"a".to_vec(),
                b"5".to_vec(),
                b"b".to_vec(),
                b"6".to_vec()
            ]
        );
        let cmd = CompleteArgs {
            keys: &keys,
            again: true,
            members: vec!["a"],
        }
        .command();
        assert_eq!(&args(&cmd)[4..], [b"1".to_vec(), b"a".to_vec()]);
        assert_eq!(CompleteArgs::decode(Value::Int(2)).expect("count"), 2);
        assert!(ReleaseArgs::decode(bulk(b"x")).is_err());
    }
}
