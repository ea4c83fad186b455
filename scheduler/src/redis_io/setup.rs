//! How the scheduler meets its Redis: the connection pool with the reply
//! timeout Kairos needs, and the start-up check that Redis will not evict
//! held tasks.

use crate::delay::store::QueueError;
use crate::redis_io::conn::RedisConn;

/// What to do about a `maxmemory-policy`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `noeviction`: nothing held is ever evicted.
    Fine,
    /// An evicting policy the operator allowed: run, and say so.
    Warn,
    /// An evicting policy the operator did not allow: do not start.
    Refuse,
}

/// Only `noeviction` keeps every held task: under any other policy Redis
/// deletes keys at maxmemory, and a `volatile-*` one still evicts the keys
/// Kairos gives a TTL (and any other application's in the same Redis).
pub(crate) fn verdict(policy: &str, allow_eviction: bool) -> Verdict {
    match (policy.eq_ignore_ascii_case("noeviction"), allow_eviction) {
        (true, _) => Verdict::Fine,
        (false, true) => Verdict::Warn,
        (false, false) => Verdict::Refuse,
    }
}

/// Reads `maxmemory-policy` and refuses an evicting one unless allowed.
/// Managed Redis services often disable `CONFIG`: that is a warning, not a
/// reason to stop. Connection errors are returned as such (the caller waits
/// for Redis); a refusal is a [`QueueError::Config`].
pub(crate) async fn check_eviction_policy(
    redis: &RedisConn,
    allow_eviction: bool,
) -> Result<(), QueueError> {
    let mut con = redis.get().await?;
    let reply: redis::RedisResult<Vec<String>> = redis.watch(
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut con)
            .await,
    );
    let policy = match reply {
        Ok(pair) => match pair.get(1) {
            Some(p) => p.clone(),
            None => {
                tracing::warn!(
                    "Redis did not report its maxmemory-policy; make sure it is noeviction"
                );
                return Ok(());
            }
        },
        Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => {
            tracing::warn!(cause = %e, "cannot read Redis's maxmemory-policy (CONFIG is disabled?); make sure it is noeviction");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    match verdict(&policy, allow_eviction) {
        Verdict::Fine => Ok(()),
        Verdict::Warn => {
            tracing::warn!(%policy, "Redis may evict held tasks at maxmemory (KAIROS_REDIS_ALLOW_EVICTION=true)");
            Ok(())
        }
        Verdict::Refuse => Err(QueueError::Config(format!(
            "Redis maxmemory-policy is {policy}: at maxmemory Redis would delete held tasks; \
             set maxmemory-policy noeviction, or KAIROS_REDIS_ALLOW_EVICTION=true to run anyway"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_noeviction_passes_unless_allowed() {
        assert_eq!(verdict("noeviction", false), Verdict::Fine);
        assert_eq!(verdict("NOEVICTION", false), Verdict::Fine);
        for p in [
            "allkeys-lru",
            "volatile-ttl",
            "allkeys-random",
            "volatile-lfu",
        ] {
            assert_eq!(verdict(p, false), Verdict::Refuse, "{p}");
            assert_eq!(verdict(p, true), Verdict::Warn, "{p}");
        }
    }
}
