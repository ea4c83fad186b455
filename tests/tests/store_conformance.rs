//! The delay-store checks of `kairos_scheduler::delay::conformance`, run
//! on the Redis store: the same checks the in-memory store passes in the
//! scheduler's unit tests, so the fakes the pump and intake tests use
//! behave as Redis does. Each check gets a store in its own namespace.

use kairos_scheduler::delay::conformance as check;
use kairos_scheduler::delay::store::RedisDelayQueue;
use kairos_tests::*;

/// Several shards, so the checks see tasks spread over them.
const SHARDS: usize = 4;

/// A Redis store in `env`'s namespace (removed with `env`).
async fn store(env: &TestEnv) -> RedisDelayQueue {
    let pool = deadpool_redis::Config::from_url(REDIS_URL)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("pool");
    let q = RedisDelayQueue::new(pool, &env.ns, SHARDS);
    q.check_shard_count().await.expect("shard count");
    q
}

/// One test per check, each in its own namespace.
macro_rules! on_redis {
    ($($check:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $check() {
            let env = TestEnv::new("conform").await;
            check::$check(store(&env).await).await;
        }
    )*};
}

on_redis!(
    first_submission_wins,
    due_times_and_head,
    claims_due_tasks_in_order,
    claims_within_count_and_bytes,
    complete_forgets,
    release_returns_tasks,
);

#[tokio::test]
async fn expired_leases_return() {
    let env = TestEnv::new("conform").await;
    // Redis's clock cannot be moved: the lease runs out for real.
    check::expired_leases_return(store(&env).await, tokio::time::sleep).await;
}
