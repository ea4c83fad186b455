//! The delay queue's Lua scripts against the real Redis: what each promises.

use kairos_scheduler::delay::store::{member, Claimed, Entry, RedisDelayQueue};
use kairos_tests::*;

async fn queue(env: &TestEnv, shards: usize) -> RedisDelayQueue {
    let pool = deadpool_redis::Config::from_url(REDIS_URL)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("pool");
    let q = RedisDelayQueue::new(pool, &env.ns, shards);
    q.check_shard_count().await.expect("shard count");
    q
}

fn entry(id: &str, run_at: Option<i64>, delay_ms: i64) -> Entry {
    Entry {
        member: member(id, 1),
        run_at,
        delay_ms,
        record: format!("record of {id}").into_bytes(),
    }
}

async fn redis_now(env: &TestEnv) -> i64 {
    let mut con = env.redis.clone();
    let (s, us): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut con)
        .await
        .expect("TIME");
    s * 1000 + us / 1000
}

#[tokio::test]
async fn schedule_first_submission_wins_and_reports_the_head() {
    let env = TestEnv::new("dq-sched").await;
    let q = queue(&env, 1).await;
    let now = redis_now(&env).await;
    let r = q
        .schedule(&[entry("a", Some(now + 10_000), 0)])
        .await
        .expect("schedule");
    assert!(r[0].added && r[0].head);
    assert_eq!(r[0].due, now + 10_000);
    // Later due: added, not the head. Same id again: ignored, whatever its time.
    let r = q
        .schedule(&[
            entry("b", Some(now + 20_000), 0),
            entry("a", Some(now + 1), 0),
        ])
        .await
        .expect("schedule");
    assert!(r[0].added && !r[0].head);
    assert!(
        !r[1].added,
        "a second submission of a pending id is ignored"
    );
    // x-delay-ms is counted from Redis's clock.
    let r = q
        .schedule(&[entry("c", None, 5_000)])
        .await
        .expect("schedule");
    assert!(r[0].added && r[0].head);
    assert!(
        (now + 5_000..now + 6_000).contains(&r[0].due),
        "{} vs {now}",
        r[0].due
    );
    assert_eq!(q.pending().await.expect("pending"), 3);
}

#[tokio::test]
async fn claim_takes_only_due_tasks_and_leases_them() {
    let env = TestEnv::new("dq-claim").await;
    let q = queue(&env, 4).await;
    let now = redis_now(&env).await;
    let mut entries: Vec<Entry> = (0..20)
        .map(|i| entry(&format!("due-{i}"), Some(now - 10), 0))
        .collect();
    entries.push(entry("future", Some(now + 60_000), 0));
    q.schedule(&entries).await.expect("schedule");

    let claim = q.claim(100, 30_000, 0).await.expect("claim");
    assert_eq!(claim.tasks.len(), 20);
    assert!(!claim.more);
    assert_eq!(claim.next_due, Some(now + 60_000));
    assert!(claim.now >= now);
    assert!(claim
        .tasks
        .iter()
        .all(|t| t.record == format!("record of {}", t.member).into_bytes()));
    // Leased tasks are not claimed twice, and still count as pending.
    assert!(q
        .claim(100, 30_000, 0)
        .await
        .expect("claim")
        .tasks
        .is_empty());
    assert_eq!(q.pending().await.expect("pending"), 21);
    // A pending id stays unique while leased.
    assert!(
        !q.schedule(&[entry("due-0", None, 0)])
            .await
            .expect("schedule")[0]
            .added
    );

    let done: Vec<&Claimed> = claim.tasks.iter().collect();
    q.complete(&done).await.expect("complete");
    assert_eq!(q.pending().await.expect("pending"), 1);
    // Once published and deleted, the id may be used again.
    assert!(
        q.schedule(&[entry("due-0", None, 0)])
            .await
            .expect("schedule")[0]
            .added
    );
}

#[tokio::test]
async fn claim_batches_report_more() {
    let env = TestEnv::new("dq-more").await;
    let q = queue(&env, 1).await;
    let entries: Vec<Entry> = (0..25).map(|i| entry(&format!("t-{i}"), None, 0)).collect();
    q.schedule(&entries).await.expect("schedule");
    let first = q.claim(10, 30_000, 0).await.expect("claim");
    assert_eq!(first.tasks.len(), 10);
    assert!(first.more);
    let second = q.claim(10, 30_000, 0).await.expect("claim");
    let third = q.claim(10, 30_000, 0).await.expect("claim");
    assert_eq!(second.tasks.len() + third.tasks.len(), 15);
    assert!(!third.more);
}

#[tokio::test]
async fn expired_leases_return_and_released_tasks_come_back_at_once() {
    let env = TestEnv::new("dq-lease").await;
    let q = queue(&env, 2).await;
    q.schedule(&[entry("x", None, 0), entry("y", None, 0)])
        .await
        .expect("schedule");
    // A claimer that "dies": a lease of 100 ms that is never completed.
    let claim = q.claim(10, 100, 0).await.expect("claim");
    assert_eq!(claim.tasks.len(), 2);
    assert!(q.claim(10, 100, 0).await.expect("claim").tasks.is_empty());
    // Past the lease, the next claims by anyone take them back. (Each
    // shard's lease ran out by its own script's clock, a millisecond apart
    // at most: one claim may come between the two.)
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut again = Vec::new();
    while again.len() < 2 {
        let c = q.claim(10, 30_000, 0).await.expect("claim");
        again.extend(c.tasks);
        assert!(
            tokio::time::Instant::now() < deadline,
            "lease never expired"
        );
        if again.len() < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    assert_eq!(again.len(), 2);
    // A failed publish releases them: claimable again right away.
    let failed: Vec<&Claimed> = again.iter().collect();
    q.release(&failed).await.expect("release");
    assert_eq!(q.claim(10, 30_000, 0).await.expect("claim").tasks.len(), 2);
}

#[tokio::test]
async fn a_completed_task_is_not_published_again_after_its_lease_expired() {
    let env = TestEnv::new("dq-late").await;
    let q = queue(&env, 1).await;
    q.schedule(&[entry("slow", None, 0)])
        .await
        .expect("schedule");
    let first = q.claim(10, 100, 0).await.expect("claim");
    // The lease expires and another claim takes the task back...
    tokio::time::sleep(std::time::Duration::from_millis(150)).await; // let the 100 ms lease pass
    let second = q.claim(10, 30_000, 0).await.expect("claim");
    assert_eq!(second.tasks.len(), 1);
    // ...and both claimers complete it: it is gone, not resurrected.
    q.complete(&first.tasks.iter().collect::<Vec<_>>())
        .await
        .expect("complete");
    q.complete(&second.tasks.iter().collect::<Vec<_>>())
        .await
        .expect("complete");
    assert_eq!(q.pending().await.expect("pending"), 0);
    assert!(q
        .claim(10, 30_000, 0)
        .await
        .expect("claim")
        .tasks
        .is_empty());
}

/// A confirm can arrive after its task's lease expired and the task went
/// back to the due index. Completing a batch that mixes such a task with
/// leased ones must remove it from the index too. (A release stands in
/// for the expired lease: both put the task back in the index.)
#[tokio::test]
async fn completing_a_batch_removes_tasks_back_in_the_index_as_well_as_leased_ones() {
    let env = TestEnv::new("dq-mixed").await;
    let q = queue(&env, 1).await;
    q.schedule(&[entry("back", None, 0), entry("leased", None, 0)])
        .await
        .expect("schedule");
    let claim = q.claim(10, 30_000, 0).await.expect("claim");
    assert_eq!(claim.tasks.len(), 2);
    let back: Vec<&Claimed> = claim.tasks.iter().filter(|c| c.id() == "back").collect();
    assert_eq!(back.len(), 1);
    q.release(&back).await.expect("release");
    q.complete(&claim.tasks.iter().collect::<Vec<_>>())
        .await
        .expect("complete");
    assert_eq!(q.pending().await.expect("pending"), 0);
    // No due time is left behind in the index (a claim would skip it, its
    // record being gone, but it would cost every later claim a look).
    let mut con = env.redis.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:dq{{0}}:idx*", env.ns))
        .query_async(&mut con)
        .await
        .expect("KEYS");
    for k in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut con)
            .await
            .expect("TYPE");
        if kind == "zset" {
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .query_async(&mut con)
                .await
                .expect("ZRANGE");
            assert!(members.is_empty(), "{k} still holds {members:?}");
        }
    }
    assert!(q
        .claim(10, 30_000, 0)
        .await
        .expect("claim")
        .tasks
        .is_empty());
}

#[tokio::test]
async fn shard_count_is_fixed_per_namespace() {
    let env = TestEnv::new("dq-shards").await;
    queue(&env, 4).await;
    let pool = deadpool_redis::Config::from_url(REDIS_URL)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("pool");
    let err = RedisDelayQueue::new(pool, &env.ns, 8)
        .check_shard_count()
        .await
        .expect_err("a different shard count must be refused");
    assert!(err.to_string().contains("KAIROS_SHARDS"), "{err}");
}

#[tokio::test]
async fn due_times_sit_in_compact_buckets_or_the_near_set_and_come_out_when_due() {
    let env = TestEnv::new("dq-buckets").await;
    let q = queue(&env, 1).await;
    let now = redis_now(&env).await;
    // 3,000 tasks due later (one a millisecond from 20 s on) and 1,500 due
    // within the near horizon (10 s), all of which are due already.
    let later: Vec<Entry> = (0..3000)
        .map(|i| entry(&format!("t-{i}"), Some(now + 20_000 + i), 0))
        .collect();
    let soon: Vec<Entry> = (0..1500)
        .map(|i| entry(&format!("s-{i}"), Some(now - 1500 + i), 0))
        .collect();
    q.schedule(&later).await.expect("schedule later");
    q.schedule(&soon).await.expect("schedule soon");
    let mut con = env.redis.clone();
    let buckets: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:dq{{0}}:idx:[0-9]*", env.ns))
        .query_async(&mut con)
        .await
        .expect("KEYS");
    assert!(buckets.len() > 1000, "{} buckets", buckets.len());
    for b in buckets.iter().take(50) {
        let enc: String = redis::cmd("OBJECT")
            .arg("ENCODING")
            .arg(b)
            .query_async(&mut con)
            .await
            .expect("OBJECT ENCODING");
        assert_eq!(enc, "listpack", "{b}");
    }
    let near: u64 = redis::cmd("ZCARD")
        .arg(format!("{}:dq{{0}}:idx:near", env.ns))
        .query_async(&mut con)
        .await
        .expect("ZCARD");
    assert_eq!(near, 1500, "tasks due soon skip the buckets");
    // Claims take every due task and then report the earliest later one.
    let mut claimed = 0;
    loop {
        let c = q.claim(500, 30_000, 0).await.expect("claim");
        assert!(c.tasks.iter().all(|t| t.due <= c.now));
        assert!(c.tasks.iter().all(|t| t.member.starts_with("s-")));
        claimed += c.tasks.len();
        if c.tasks.is_empty() {
            assert_eq!(c.next_due, Some(now + 20_000));
            break;
        }
    }
    assert_eq!(claimed, 1500);
    // Claimed 25 s ahead, the later ones come out of their buckets.
    let mut later_claimed = 0;
    loop {
        let c = q.claim(500, 30_000, 25_000).await.expect("claim ahead");
        later_claimed += c.tasks.len();
        if c.tasks.is_empty() {
            assert_eq!(c.next_due, None);
            break;
        }
    }
    assert_eq!(later_claimed, 3000);
    assert_eq!(
        q.pending().await.expect("pending"),
        4500,
        "leased, not deleted"
    );
}

#[tokio::test]
async fn claim_ahead_takes_tasks_due_soon_and_a_lost_claimer_gives_them_back() {
    let env = TestEnv::new("dq-ahead").await;
    let q = queue(&env, 1).await;
    let now = redis_now(&env).await;
    q.schedule(&[
        entry("soon", Some(now + 2_000), 0),
        entry("later", Some(now + 60_000), 0),
    ])
    .await
    .expect("schedule");
    // Within 5 s ahead: "soon" is claimed with its own due time, "later"
    // stays and is the next due.
    let c = q.claim(10, 200, 5_000).await.expect("claim");
    let ids: Vec<&str> = c.tasks.iter().map(|t| t.member.as_str()).collect();
    assert_eq!(ids, ["soon"]);
    assert_eq!(c.tasks[0].due, now + 2_000);
    assert_eq!(c.next_due, Some(now + 60_000));
    // The claimer dies before publishing: once its 200 ms lease expired,
    // the next claim takes "soon" again.
    let mut retaken = Vec::new();
    for _ in 0..50 {
        let c = q.claim(10, 30_000, 5_000).await.expect("claim");
        retaken.extend(c.tasks.into_iter().map(|t| t.member));
        if !retaken.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(retaken, ["soon"]);
    assert_eq!(q.pending().await.expect("pending"), 2);
}

#[tokio::test]
async fn a_claim_of_the_largest_batch_takes_it_whole() {
    // KAIROS_BATCH allows 5,000: the claim then leases 5,000 tasks at once,
    // more values than Lua unpacks in one call.
    let env = TestEnv::new("dq-big-batch").await;
    let q = queue(&env, 1).await;
    let now = redis_now(&env).await;
    let entries: Vec<Entry> = (0..5000)
        .map(|i| entry(&format!("b-{i}"), Some(now - 10), 0))
        .collect();
    q.schedule(&entries).await.expect("schedule");
    let c = q.claim(5000, 30_000, 0).await.expect("claim of 5,000");
    assert_eq!(c.tasks.len(), 5000);
    assert!(c.more, "a full batch says more may be due");
    let again = q.claim(5000, 30_000, 0).await.expect("claim");
    assert!(again.tasks.is_empty(), "all 5,000 are leased");
}
