//! Typed calls of the task-status scripts of the scheduler: `cancel.lua`.

use crate::redis_io::keys::DelayShardKeys;
use crate::redis_io::reply::{Reader, ReplyError};
use crate::redis_io::scripts::Script;
use kairos_shared::status::{StatusKeys, TaskState};
use redis::Value;

/// `cancel.lua`: withdraws a task waiting in the delay queue and marks it
/// cancelled, atomically.
pub(crate) struct CancelArgs<'a> {
    /// The task's delay-queue shard.
    pub(crate) dq: &'a DelayShardKeys,
    /// The status keys of the namespace.
    pub(crate) status: &'a StatusKeys,
    /// The shard (the same number for both).
    pub(crate) shard: usize,
    /// The task id.
    pub(crate) id: &'a str,
    /// How long the status is kept (s).
    pub(crate) ttl_s: u64,
    /// Task status is on: mark it cancelled.
    pub(crate) status_on: bool,
}

/// What a cancel found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Cancelled {
    /// Withdrawn from the delay queue: it never runs.
    Withdrawn,
    /// Claimed by a pump, being published: too late.
    Leased(Option<TaskState>),
    /// Not waiting in the delay queue; its stored state, if any.
    Absent(Option<TaskState>),
}

impl CancelArgs<'_> {
    /// The script call.
    pub(crate) fn command(&self) -> redis::Cmd {
        let (s, id) = (self.shard, self.id);
        let mut cmd = Script::Cancel.call(&[
            &self.dq.idx,
            &self.dq.rec,
            &self.dq.lease,
            &self.status.task(s, id),
            &self.status.recent(s),
            &self.status.checkpoint(s, id),
        ]);
        cmd.arg(id)
            .arg(self.status.wait_prefix(s))
            .arg(self.ttl_s)
            .arg(if self.status_on { "1" } else { "" });
        cmd
    }

    /// `{outcome, stored state or ''}`.
    pub(crate) fn decode(reply: Value) -> Result<Cancelled, ReplyError> {
        let mut r = Reader::new(reply, "cancel reply")?;
        let outcome = r.string("outcome")?;
        let state = TaskState::parse(&r.string("state")?);
        match outcome.as_str() {
            "cancelled" => Ok(Cancelled::Withdrawn),
            "leased" => Ok(Cancelled::Leased(state)),
            "absent" => Ok(Cancelled::Absent(state)),
            _ => Err(ReplyError::Missing("a known cancel outcome")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redis_io::keys::Keys;

    #[test]
    fn a_cancel_names_both_features_keys_under_one_hash_tag() {
        let dq = Keys::new("ns").delay_shard(3, "api");
        let status = StatusKeys::new("ns");
        let cmd = CancelArgs {
            dq: &dq,
            status: &status,
            shard: 3,
            id: "a",
            ttl_s: 60,
            status_on: true,
        }
        .command();
        let args: Vec<String> = cmd
            .args_iter()
            .skip(3)
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(
            args,
            [
                "ns:dq{3}:idx",
                "ns:dq{3}:rec",
                "ns:dq{3}:lease",
                "ns:st{3}:t:a",
                "ns:st{3}:recent",
                "ns:st{3}:cp:a",
                "a",
                "ns:st{3}:wait:",
                "60",
                "1"
            ]
        );
    }

    #[test]
    fn decodes_each_outcome() {
        let reply = |o: &str, s: &str| {
            Value::Array(vec![
                Value::BulkString(o.as_bytes().to_vec()),
                Value::BulkString(s.as_bytes().to_vec()),
            ])
        };
        assert_eq!(
            CancelArgs::decode(reply("cancelled", "cancelled")).unwrap(),
            Cancelled::Withdrawn
        );
        assert_eq!(
            CancelArgs::decode(reply("leased", "scheduled")).unwrap(),
            Cancelled::Leased(Some(TaskState::Scheduled))
        );
        assert_eq!(
            CancelArgs::decode(reply("absent", "")).unwrap(),
            Cancelled::Absent(None)
        );
        assert!(CancelArgs::decode(reply("what", "")).is_err());
    }
}
