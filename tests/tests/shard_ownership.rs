//! Issue 17: schedulers split the shards instead of each serving all of
//! them. Each shard's lease `NS:own{S}` names the instance that serves it
//! (`HOST:PID:CLAIMER`); these tests read those keys to see who owns what,
//! and a consumer on the task queue (as a worker would) to see that nothing
//! is lost and no schedule tick fires twice through kill -9 and rebalances.

use futures_util::StreamExt;
use kairos_shared::events::EventKind;
use kairos_tests::*;
use lapin::types::AMQPValue;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The default `KAIROS_SHARDS`.
const SHARDS: usize = 8;
/// A short shard lease, so a takeover is quick to observe.
const SHARD_LEASE_MS: u64 = 1500;
/// One ownership round: a third of the lease.
const ROUND_MS: u64 = SHARD_LEASE_MS / 3;
/// What a loaded 2-core test machine may add to a takeover (a round that
/// starts late, a slow script reply).
const SLACK_MS: u64 = 1500;
/// How long a scheduler process may take to start and answer.
const READY: Duration = Duration::from_secs(30);

/// A scheduler process and its HTTP API.
struct Scheduler {
    proc: Proc,
    api: ScheduleApi,
}

impl Scheduler {
    fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

/// Starts a scheduler with short leases (task leases too, so a killed
/// instance's claimed tasks come back within the test).
fn spawn_scheduler(env: &TestEnv) -> Scheduler {
    let addr = free_addr();
    let mut penv = env.process_env();
    penv.push(("KAIROS_HTTP_ADDR".into(), addr.to_string()));
    penv.push(("KAIROS_SHARD_LEASE_MS".into(), SHARD_LEASE_MS.to_string()));
    penv.push(("KAIROS_LEASE_MS".into(), "2000".into()));
    penv.push(("KAIROS_IDLE_MS".into(), "200".into()));
    Scheduler {
        proc: Proc::spawn("kairos-scheduler", &penv),
        api: ScheduleApi::new(addr),
    }
}

/// The pid in an owner id (`HOST:PID:CLAIMER`).
fn pid_of(owner: &str) -> Option<u32> {
    owner.rsplit(':').nth(1)?.parse().ok()
}

/// The id (`HOST:PID:CLAIMER`) owning each shard.
async fn owner_ids(env: &TestEnv) -> Vec<Option<String>> {
    let keys: Vec<String> = (0..SHARDS)
        .map(|s| format!("{}:own{{{s}}}", env.ns))
        .collect();
    let mut con = env.redis.clone();
    redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut con)
        .await
        .expect("MGET owners")
}

/// The pid owning each shard (`None`: nobody holds its lease).
async fn owners(env: &TestEnv) -> Vec<Option<u32>> {
    let ids = owner_ids(env).await;
    ids.iter().map(|v| v.as_deref().and_then(pid_of)).collect()
}

/// (shard, claimer) of every claim record left in the delay queue
/// (`NS:dq{S}:claim:CLAIMER`: written by each claim that leased tasks, kept
/// for the task lease).
async fn claimers_by_shard(env: &TestEnv) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for key in env.redis_keys().await {
        let Some((head, claimer)) = key.split_once(":claim:") else {
            continue;
        };
        let shard = head
            .rsplit_once('{')
            .and_then(|(_, s)| s.strip_suffix('}'))
            .and_then(|s| s.parse().ok())
            .expect("a shard's claim key");
        out.push((shard, claimer.to_string()));
    }
    out.sort();
    out
}

/// Polls the owners until `done` holds; returns them and how long it took.
/// Panics after `within`, naming `what`.
async fn wait_owners(
    env: &TestEnv,
    within: Duration,
    what: &str,
    done: impl Fn(&[Option<u32>]) -> bool,
) -> (Vec<Option<u32>>, Duration) {
    let start = Instant::now();
    loop {
        let now = owners(env).await;
        if done(&now) {
            return (now, start.elapsed());
        }
        assert!(
            start.elapsed() < within,
            "{what}: not within {within:?}; owners {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count(owners: &[Option<u32>], pid: u32) -> usize {
    owners.iter().filter(|o| **o == Some(pid)).count()
}

/// Publishes `n` delayed tasks `PREFIX-i`, due from `start` (Unix ms) over
/// `spread_ms`.
async fn publish_delayed(env: &TestEnv, prefix: &str, n: usize, start: i64, spread_ms: i64) {
    let tasks = batch(n, |i| {
        let run_at = start + (i as i64 * spread_ms) / n as i64;
        with_headers(
            task_props("kairos.noop", &format!("{prefix}-{i}")),
            &[("x-run-at", AMQPValue::LongLongInt(run_at))],
        )
    });
    env.publish_many(&env.names.delay(), tasks).await;
}

/// Deliveries per task id on the `default` queue, counted by a consumer
/// that acks each (as a worker would).
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<String, usize>>>);

impl Seen {
    async fn start(env: &TestEnv) -> (Self, tokio::task::JoinHandle<()>) {
        let seen = Seen::default();
        let mut consumer = env.consume_queue("default", 1000).await;
        let out = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                if let Some(id) = d.properties.message_id().as_ref() {
                    *out.lock().entry(id.to_string()).or_default() += 1;
                }
                ack(&d).await;
            }
        });
        (seen, task)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.0.lock().expect("seen lock")
    }

    fn distinct_with(&self, prefix: &str) -> usize {
        self.lock().keys().filter(|k| k.starts_with(prefix)).count()
    }

    /// Ticks delivered per schedule (occurrence ids are `SCHEDULE@TICK`).
    fn ticks(&self) -> BTreeMap<String, Vec<i64>> {
        let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for id in self.lock().keys() {
            if let Some((s, t)) = id.split_once('@') {
                if let Ok(t) = t.parse() {
                    out.entry(s.to_string()).or_default().push(t);
                }
            }
        }
        for t in out.values_mut() {
            t.sort();
        }
        out
    }

    async fn wait(&self, within: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !done(self) {
            assert!(Instant::now() < deadline, "{what}: not within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_split_the_shards_and_hand_them_over_on_stop() {
    let env = TestEnv::new("own2").await;
    let mut a = spawn_scheduler(&env);
    let b = spawn_scheduler(&env);
    a.api.wait_ready(READY).await;
    b.api.wait_ready(READY).await;
    let (pa, pb) = (a.pid(), b.pid());
    let (split, took) = wait_owners(&env, READY, "the two split the shards", |o| {
        count(o, pa) == SHARDS / 2 && count(o, pb) == SHARDS / 2
    })
    .await;
    println!("split {split:?} after {took:?}");

    // Both serve their half: every task of every shard is published, and
    // only by its owner. Due after a handed-off shard stopped being served
    // by its old owner too (two rounds after the handoff).
    const N: usize = 1000;
    let (seen, consumer) = Seen::start(&env).await;
    let first_due = now_ms() + (2 * ROUND_MS) as i64 + 1500;
    publish_delayed(&env, "t", N, first_due, 1000).await;
    // The claim records live for a claim's lease (2 s): gather them while
    // the tasks are published, not after (a loaded machine delivers the
    // last `published` events late).
    let mut claimers = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.distinct_with("t-") < N {
        // From the first task published on: claims from before the split
        // settled may still have records before that.
        if seen.distinct_with("t-") > 0 {
            claimers.extend(claimers_by_shard(&env).await);
        }
        assert!(
            Instant::now() < deadline,
            "every delayed task published: {} of {N}",
            seen.distinct_with("t-")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    claimers.extend(claimers_by_shard(&env).await);
    let owners = owner_ids(&env).await;
    for (shard, claimer) in &claimers {
        let owner = owners[*shard].as_deref().and_then(|o| o.rsplit(':').next());
        assert_eq!(
            owner,
            Some(claimer.as_str()),
            "shard {shard} claimed by another: {claimers:?}, owners {owners:?}"
        );
    }
    let distinct: std::collections::HashSet<_> = claimers.iter().map(|(_, c)| c).collect();
    assert_eq!(distinct.len(), 2, "both claimed: {claimers:?}");

    // A graceful stop hands the leases over at once, not when they expire.
    let stopped = Instant::now();
    assert!(a.proc.terminate(Duration::from_secs(15)).success());
    let (_, took) = wait_owners(
        &env,
        Duration::from_millis(SHARD_LEASE_MS),
        "B owns every shard after A stopped",
        |o| count(o, pb) == SHARDS,
    )
    .await;
    println!(
        "B owned all shards {:?} after A's stop began ({took:?} after it exited)",
        stopped.elapsed()
    );
    consumer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_rebalances_loses_no_task_and_fires_no_tick_twice() {
    let env = TestEnv::new("ownk").await;
    let mut tap = EventTap::new(&env).await;
    let mut a = spawn_scheduler(&env);
    let b = spawn_scheduler(&env);
    a.api.wait_ready(READY).await;
    b.api.wait_ready(READY).await;
    let (pa, pb) = (a.pid(), b.pid());
    wait_owners(&env, READY, "the two split the shards", |o| {
        count(o, pa) == SHARDS / 2 && count(o, pb) == SHARDS / 2
    })
    .await;

    // Interval schedules spread over the shards, ticking every second.
    const SCHEDULES: usize = 12;
    for i in 0..SCHEDULES {
        let spec = serde_json::json!({"every_ms": 1000, "task": {"name": "kairos.noop"}});
        let r = a.api.put(&format!("s{i}"), spec).await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    // Delayed tasks falling due over several seconds.
    const N: usize = 2000;
    let (seen, consumer) = Seen::start(&env).await;
    publish_delayed(&env, "t", N, now_ms() + 1000, 5000).await;
    seen.wait(Duration::from_secs(30), "the first tasks published", |s| {
        s.distinct_with("t-") >= N / 10
    })
    .await;

    // kill -9 A while tasks fall due and schedules tick; start C at once,
    // during the takeover.
    a.proc.kill9();
    let mut c = spawn_scheduler(&env);
    let pc = c.pid();
    let bound = Duration::from_millis(SHARD_LEASE_MS + ROUND_MS + SLACK_MS);
    let (after, took) = wait_owners(&env, bound, "A's shards taken over", |o| {
        count(o, pa) == 0 && o.iter().all(Option::is_some)
    })
    .await;
    println!(
        "A killed after {} tasks; its shards owned by others {took:?} later: {after:?}",
        seen.distinct_with("t-")
    );

    // C joins: B hands it a share. kill -9 C as soon as it serves some.
    let (joined, _) = wait_owners(&env, READY, "C takes a share", |o| count(o, pc) > 0).await;
    c.proc.kill9();
    println!(
        "C killed while owning {} shards: {joined:?}",
        count(&joined, pc)
    );
    let (_, took_c) = wait_owners(&env, bound, "B owns every shard again", |o| {
        count(o, pb) == SHARDS
    })
    .await;
    println!("B owned every shard {took_c:?} after C's kill");

    // Nothing lost: every delayed task is published.
    seen.wait(
        Duration::from_secs(60),
        "every delayed task published",
        |s| s.distinct_with("t-") == N,
    )
    .await;
    // Ticks keep coming for every schedule, with no gap, through both
    // kills: wait until each has a tick 3 s after the second kill.
    let until = now_ms() + 3000;
    seen.wait(Duration::from_secs(30), "ticks after the kills", |s| {
        let t = s.ticks();
        t.len() == SCHEDULES && t.values().all(|v| v.last().is_some_and(|&l| l >= until))
    })
    .await;
    for (schedule, ticks) in seen.ticks() {
        for w in ticks.windows(2) {
            assert_eq!(
                w[1] - w[0],
                1000,
                "{schedule}: a tick is missing: {ticks:?}"
            );
        }
    }
    // Exactly once: each tick was fired (won its compare-and-set) by one
    // scheduler. A `scheduled` event may be lost with a killed process, so
    // at most one.
    tap.collect_for(Duration::from_millis(500)).await;
    let mut fired: HashMap<&str, usize> = HashMap::new();
    for e in tap.of(EventKind::Scheduled) {
        if e.id.contains('@') {
            *fired.entry(e.id.as_str()).or_default() += 1;
        }
    }
    let twice: Vec<_> = fired.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "ticks fired twice: {twice:?}");
    // Published twice is allowed (a killed instance's claimed tasks come
    // back when their lease expires): reported, not asserted.
    let dup: usize = seen.lock().values().map(|n| n - 1).sum();
    println!(
        "{N} tasks and {} ticks delivered; {dup} duplicate deliveries; takeovers {took:?} and {took_c:?} (bound {bound:?})",
        fired.len(),
    );
    consumer.abort();
}

/// `own_shard.lua` on `key` as instance `me`, the desired owner `want`.
async fn own_shard(env: &TestEnv, key: &str, me: &str, want: &str) -> i64 {
    redis::Script::new(include_str!(
        "../../scheduler/src/redis_io/scripts/own_shard.lua"
    ))
    .key(key)
    .arg(me)
    .arg(want)
    .arg(10_000)
    .invoke_async(&mut env.redis.clone())
    .await
    .expect("own_shard")
}

/// `own_members.lua` on `key` for `me` (lease `ms`); the members, sorted.
async fn own_members(env: &TestEnv, key: &str, me: &str, ms: u64, leave: bool) -> Vec<String> {
    let mut v: Vec<String> = redis::Script::new(include_str!(
        "../../scheduler/src/redis_io/scripts/own_members.lua"
    ))
    .key(key)
    .arg(me)
    .arg(ms)
    .arg(if leave { "1" } else { "0" })
    .invoke_async(&mut env.redis.clone())
    .await
    .expect("own_members");
    v.sort();
    v
}

/// The two ownership scripts against Redis, as the scheduler sends them
/// (`allow-oom` flags line aside): every reply code of `own_shard.lua`, and
/// membership expiry and leaving in `own_members.lua`.
#[tokio::test]
async fn the_ownership_scripts_take_renew_hand_off_and_expire() {
    let env = TestEnv::new("owns").await;
    let mut con = env.redis.clone();
    let key = format!("{}:own{{0}}", env.ns);
    let e = &env;
    assert_eq!(
        own_shard(e, &key, "b", "a").await,
        0,
        "free, but a's to take"
    );
    assert_eq!(own_shard(e, &key, "a", "a").await, 1, "acquired");
    assert_eq!(own_shard(e, &key, "a", "a").await, 2, "renewed");
    assert_eq!(own_shard(e, &key, "b", "b").await, 0, "held by another");
    assert_eq!(own_shard(e, &key, "a", "b").await, 3, "handed off");
    let owner: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("GET");
    assert_eq!(owner.as_deref(), Some("b"));
    assert_eq!(
        own_shard(e, &key, "b", "b").await,
        2,
        "b renews it as its own"
    );
    assert_eq!(
        own_shard(e, &key, "b", "").await,
        4,
        "released: nobody to take it"
    );
    let gone: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut con)
        .await
        .expect("GET");
    assert_eq!(gone, None);

    let mkey = format!("{}:sched:members", env.ns);
    assert_eq!(own_members(e, &mkey, "a", 10_000, false).await, ["a"]);
    assert_eq!(own_members(e, &mkey, "b", 300, false).await, ["a", "b"]);
    // b stops renewing: gone once its expiry passes (polled, not slept).
    let deadline = Instant::now() + Duration::from_secs(5);
    while own_members(e, &mkey, "a", 10_000, false).await != ["a"] {
        assert!(Instant::now() < deadline, "b never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        own_members(e, &mkey, "a", 10_000, true).await.is_empty(),
        "a left"
    );
    let exists: bool = redis::cmd("EXISTS")
        .arg(&mkey)
        .query_async(&mut con)
        .await
        .expect("EXISTS");
    assert!(!exists, "nothing left behind");
}
