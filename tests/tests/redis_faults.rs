//! A Redis that misbehaves (issue 14, items 9, 10 and 12): full at
//! maxmemory, configured to evict, stalled, or asked for replicas. Every test
//! runs its own `redis-server` (never the shared one).

use kairos_scheduler::delay::store::{member, Entry, RedisDelayQueue};
use kairos_shared::contract::Task;
use kairos_tests::*;
use lapin::types::AMQPValue;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn own_queue(redis: &OwnRedis, ns: &str, shards: usize) -> RedisDelayQueue {
    let pool = kairos_scheduler::redis_io::conn::pool(
        &redis.url(),
        &Default::default(),
        Duration::from_secs(5),
    )
    .expect("pool");
    let q = RedisDelayQueue::new(pool, ns, shards);
    q.check_shard_count().await.expect("shard count");
    q
}

/// An entry with a real task record (the pump can publish it).
fn task_entry(id: &str, run_at: Option<i64>, delay_ms: i64, body_len: usize) -> Entry {
    let task = Task::decode(
        "default",
        &task_props("test.record", id),
        &vec![b'x'; body_len],
    )
    .expect("task");
    Entry {
        member: member(id, 1),
        run_at,
        delay_ms,
        record: kairos_shared::record::encode(&task).expect("record"),
    }
}

async fn info(con: &mut redis::aio::MultiplexedConnection, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query_async(con)
        .await
        .expect("INFO")
}

/// A number from `INFO`: `field:N` or `field:count=N`.
async fn info_num(con: &mut redis::aio::MultiplexedConnection, section: &str, field: &str) -> i64 {
    info(con, section)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| {
            v.trim_start_matches("count=")
                .split(',')
                .next()
                .unwrap_or("0")
                .trim()
                .to_string()
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn redis_now(con: &mut redis::aio::MultiplexedConnection) -> i64 {
    let (s, us): (i64, i64) = redis::cmd("TIME").query_async(con).await.expect("TIME");
    s * 1000 + us / 1000
}

/// Fills Redis with a megabyte of other data, then sets maxmemory 64 KiB
/// below what is used: Redis is at maxmemory, and stays there until more
/// than that is freed (a limit just above the use flickers: the refused
/// command's own buffer is counted). Returns maxmemory.
async fn fill_to_maxmemory(con: &mut redis::aio::MultiplexedConnection) -> i64 {
    for i in 0..32 {
        let _: () = redis::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(vec![b'f'; 32 * 1024])
            .query_async(con)
            .await
            .expect("filler");
    }
    let max = info_num(con, "memory", "used_memory").await - 64 * 1024;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(max)
        .query_async(con)
        .await
        .expect("CONFIG SET maxmemory");
    let refused: redis::RedisResult<()> = redis::cmd("SET")
        .arg("filler:more")
        .arg("x")
        .query_async(con)
        .await;
    assert!(refused.is_err(), "Redis is at maxmemory");
    max
}

const NOEVICTION: [&str; 4] = ["--appendonly", "no", "--maxmemory-policy", "noeviction"];

/// Claim, complete and release free memory: at maxmemory they still run,
/// including a claim that first returns expired leases to the due index
/// (before: its first write, a ZADD, was refused with OOM, and every claim
/// of the shard failed until memory came back by other means). A hold,
/// which adds memory, is refused, and succeeds once the completions freed
/// room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_that_free_memory_run_at_maxmemory() {
    let redis = OwnRedis::start_with(&NOEVICTION);
    let mut con = redis.connection().await;
    let ns = "kt-oom-scripts";
    let q = own_queue(&redis, ns, 1).await;
    let now = redis_now(&mut con).await;
    // A claimer that died holding 50 leases...
    let dead = own_queue(&redis, ns, 1).await;
    let leased: Vec<Entry> = (0..50)
        .map(|i| task_entry(&format!("leased-{i}"), Some(now - 10), 0, 2048))
        .collect();
    dead.schedule(&leased).await.expect("schedule");
    assert_eq!(
        dead.claim(100, 200, 0).await.expect("claim").tasks.len(),
        50
    );
    // ...and 50 more due, not claimed yet.
    let due: Vec<Entry> = (0..50)
        .map(|i| task_entry(&format!("due-{i}"), Some(now - 10), 0, 2048))
        .collect();
    q.schedule(&due).await.expect("schedule");

    let max = fill_to_maxmemory(&mut con).await;
    let refused = q
        .schedule(&[task_entry("new", None, 0, 100)])
        .await
        .expect_err("a hold at maxmemory is refused");
    assert!(refused.to_string().contains("OOM"), "{refused}");
    assert!(
        !refused.outcome_unknown(),
        "a refusal is a known outcome: {refused:?}"
    );

    // The dead claimer's leases expire (200 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claim = q.claim(200, 30_000, 0).await.expect("claim at maxmemory");
    assert_eq!(claim.tasks.len(), 100, "expired leases and due tasks");
    let failed: Vec<_> = claim.tasks.iter().take(10).collect();
    q.release(&failed).await.expect("release at maxmemory");
    let again = q.claim(200, 30_000, 0).await.expect("claim at maxmemory");
    assert_eq!(again.tasks.len(), 10, "released tasks come back at once");
    let done: Vec<_> = claim.tasks.iter().skip(10).chain(&again.tasks).collect();
    q.complete(&done).await.expect("complete at maxmemory");
    assert_eq!(q.pending().await.expect("pending"), 0);

    let used = info_num(&mut con, "memory", "used_memory").await;
    assert!(used < max, "completions freed memory: {used} of {max}");
    let held = q
        .schedule(&[task_entry("new", None, 0, 100)])
        .await
        .expect("a hold succeeds once there is room");
    assert!(held[0].added);
}

/// End to end: a scheduler (re)started while Redis is at maxmemory still
/// starts, publishes due tasks and a dead instance's expired leases, which
/// frees memory; tasks submitted meanwhile are refused, returned to
/// RabbitMQ, retried with a growing pause, and run once there is room.
/// Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_still_publishes_and_intake_waits_for_room() {
    let env = TestEnv::new("oom").await;
    let redis = OwnRedis::start_with(&NOEVICTION);
    let mut con = redis.connection().await;
    let q = own_queue(&redis, &env.ns, 8).await;
    let now = redis_now(&mut con).await;
    let dead_ids: Vec<String> = (0..30).map(|i| format!("dead-{i}")).collect();
    let entries: Vec<Entry> = dead_ids
        .iter()
        .map(|id| task_entry(id, Some(now - 10), 0, 200))
        .collect();
    q.schedule(&entries).await.expect("schedule");
    assert_eq!(q.claim(100, 300, 0).await.expect("claim").tasks.len(), 30);
    let later: Vec<Entry> = (0..200)
        .map(|i| task_entry(&format!("later-{i}"), Some(now + 6_000), 0, 2048))
        .collect();
    q.schedule(&later).await.expect("schedule");
    let max = fill_to_maxmemory(&mut con).await;

    let log = RunLog::default();
    let mut wc = env.worker_config();
    wc.common.events = false;
    let worker =
        InProcess::worker(kairos_worker::Worker::new(wc).handler("test.record", log.handler(0)));
    let mut sc = env.scheduler_config();
    sc.redis_url = redis.url();
    sc.common.events = false;
    let scheduler = InProcess::scheduler(sc);
    let new: Vec<_> = (0..20)
        .map(|i| {
            let p = with_headers(
                task_props("test.record", &format!("new-{i}")),
                &[("x-delay-ms", AMQPValue::LongInt(10))],
            );
            ("default".to_string(), p, vec![b'n'; 2048])
        })
        .collect();
    env.publish_many(&env.names.delay(), new).await;

    log.wait_for(Duration::from_secs(30), "the expired leases ran", |l| {
        dead_ids.iter().all(|id| l.runs_of(id) > 0)
    })
    .await;
    // Intake is refused while Redis is full, but not in a hot loop.
    let oom_before = info_num(&mut con, "errorstats", "errorstat_OOM").await;
    let window = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let oom_during = info_num(&mut con, "errorstats", "errorstat_OOM").await - oom_before;
    let attempts_cap = 20 * (window.elapsed().as_millis() as i64 / 100 + 2);
    println!(
        "OOM refusals in {:?}: {oom_during} (cap {attempts_cap})",
        window.elapsed()
    );
    assert!(
        oom_during <= attempts_cap,
        "intake retried in a hot loop: {oom_during}"
    );
    assert!(oom_before > 0, "Redis refused something at maxmemory");

    // The 200 fall due, are published and completed: memory frees, and the
    // 20 refused tasks get in.
    log.wait_distinct(250, Duration::from_secs(60)).await;
    let dups = log.total() - log.distinct();
    println!("ran {} tasks, {dups} duplicates", log.distinct());
    assert!(dups <= 20, "only refused intake batches may repeat: {dups}");
    assert_eq!(env.queue_depth(&env.names.delay()).await, 0);
    let used = info_num(&mut con, "memory", "used_memory").await;
    assert!(used < max, "memory freed: {used} of {max}");
    worker.stop().await;
    scheduler.stop().await;
}

/// An evicting `maxmemory-policy` could delete held tasks: the scheduler
/// refuses to start, naming the setting and the override.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_refused_at_start_unless_allowed() {
    let env = TestEnv::new("evict").await;
    let redis = OwnRedis::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let mut sc = env.scheduler_config();
    sc.redis_url = redis.url();
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        kairos_scheduler::run(sc.clone(), std::future::pending()),
    )
    .await
    .expect("refused at once")
    .expect_err("an evicting policy is refused")
    .to_string();
    assert!(
        err.contains("maxmemory-policy")
            && err.contains("allkeys-lru")
            && err.contains("KAIROS_REDIS_ALLOW_EVICTION"),
        "{err}"
    );

    // Allowed: it runs.
    sc.redis_allow_eviction = true;
    let log = RunLog::default();
    let worker = InProcess::worker(
        kairos_worker::Worker::new(env.worker_config()).handler("test.record", log.handler(0)),
    );
    let scheduler = InProcess::scheduler(sc);
    let p = with_headers(
        task_props("test.record", "allowed"),
        &[("x-delay-ms", AMQPValue::LongInt(10))],
    );
    env.publish(&env.names.delay(), "default", p, b"").await;
    log.wait_distinct(1, Duration::from_secs(30)).await;
    worker.stop().await;
    scheduler.stop().await;
}

/// Run times by task id, recorded by the worker's handler.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<HashMap<String, Vec<Instant>>>>);

impl Runs {
    fn handler(&self) -> impl kairos_worker::Handler {
        let runs = self.clone();
        move |ctx: kairos_worker::TaskContext, _body: Vec<u8>| {
            let runs = runs.clone();
            async move {
                if let Ok(mut r) = runs.0.lock() {
                    r.entry(ctx.id.clone()).or_default().push(Instant::now());
                }
                Ok(())
            }
        }
    }

    fn snapshot(&self) -> HashMap<String, Vec<Instant>> {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// What a stalled Redis did to a stream of delayed tasks.
struct StallReport {
    duplicates: usize,
    max_runs: usize,
    worst_lateness: Duration,
    session_restarts: usize,
    repeats: usize,
}

/// A scheduler process against an own Redis that stalls (`DEBUG SLEEP 1`,
/// four times) while 400 tasks with a 200 ms delay stream in: intake holds
/// and pump claims and completes all hit the stalls.
async fn stalled_run(prefix: &str, timeout_ms: Option<u64>) -> StallReport {
    let env = TestEnv::new(prefix).await;
    let redis = OwnRedis::start_with(&["--appendonly", "no", "--enable-debug-command", "local"]);
    let dir = std::env::temp_dir().join(format!("kairos-stall-{}", env.ns));
    std::fs::create_dir_all(&dir).expect("log dir");
    let log_path = dir.join("scheduler.log");
    let mut senv = env.process_env();
    senv.push(("KAIROS_REDIS_URL".into(), redis.url()));
    senv.push(("KAIROS_EVENTS".into(), "false".into()));
    senv.push(("RUST_LOG".into(), "warn".into()));
    if let Some(t) = timeout_ms {
        senv.push(("KAIROS_REDIS_TIMEOUT_MS".into(), t.to_string()));
    }
    let scheduler = Proc {
        child: Command::new(binary("kairos-scheduler"))
            .envs(senv)
            .stdin(Stdio::null())
            // tracing writes to stdout.
            .stdout(std::fs::File::create(&log_path).expect("log file"))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn scheduler"),
    };
    let runs = Runs::default();
    let mut wc = env.worker_config();
    wc.common.events = false;
    let worker =
        InProcess::worker(kairos_worker::Worker::new(wc).handler("test.record", runs.handler()));

    let mut staller = redis.connection().await;
    let stalls = tokio::spawn(async move {
        for _ in 0..4 {
            let _: () = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(1)
                .query_async(&mut staller)
                .await
                .expect("DEBUG SLEEP");
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    });
    let mut published = HashMap::new();
    for wave in 0..40 {
        let msgs: Vec<_> = batch(10, |i| {
            delayed_props("test.record", &format!("s-{wave}-{i}"), 200)
        });
        let at = Instant::now();
        env.publish_many(&env.names.delay(), msgs).await;
        for i in 0..10 {
            published.insert(format!("s-{wave}-{i}"), at);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stalls.await.expect("stalls");
    let deadline = Instant::now() + Duration::from_secs(90);
    while runs.snapshot().len() < published.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} tasks ran",
            runs.snapshot().len(),
            published.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Late duplicates (a lease expiring) would come 30 s on: none is
    // waited for here, the lateness below would show the lease wait.
    let seen = runs.snapshot();
    let mut report = StallReport {
        duplicates: seen.values().map(|v| v.len() - 1).sum(),
        max_runs: seen.values().map(Vec::len).max().unwrap_or(0),
        worst_lateness: Duration::ZERO,
        session_restarts: 0,
        repeats: 0,
    };
    for (id, at) in &published {
        let first = seen[id].iter().min().copied().expect("ran");
        report.worst_lateness = report
            .worst_lateness
            .max(first.saturating_duration_since(*at));
    }
    worker.stop().await;
    drop(scheduler);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    report.session_restarts = log.matches("AMQP session ended").count();
    report.repeats = log.matches("repeating").count() + log.matches("claim failed").count();
    for line in log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .take(8)
    {
        println!("  scheduler: {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{prefix}: timeout {timeout_ms:?}: duplicates {}, max runs of a task {}, worst lateness {:?}, session restarts {}, repeated Redis calls {}",
        report.duplicates, report.max_runs, report.worst_lateness, report.session_restarts, report.repeats
    );
    report
}

/// With the default reply timeout (5 s) a Redis stalled for a second is
/// waited for: no duplicate, no lease wait, no session restart. (With the
/// client's 500 ms default, a claim that timed out had leased its tasks for
/// 30 s, and a completion that timed out ended the AMQP session.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_is_waited_for() {
    let r = stalled_run("stall", None).await;
    assert_eq!(r.duplicates, 0);
    assert_eq!(r.session_restarts, 0);
    assert!(
        r.worst_lateness < Duration::from_secs(15),
        "{:?}",
        r.worst_lateness
    );
}

/// With a reply timeout shorter than the stall, every Redis call of intake
/// and pump times out with an unknown outcome: the repeats are idempotent
/// (a claim sent again gets the tasks its lost reply had leased), so no
/// task waits out its 30 s lease, the AMQP session stays up, and a task runs
/// at most twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_shorter_than_a_stall_repeat_idempotently() {
    let r = stalled_run("stallshort", Some(200)).await;
    assert!(r.repeats > 0, "the stalls caused timeouts");
    assert_eq!(r.session_restarts, 0);
    assert!(r.max_runs <= 2, "a task ran {} times", r.max_runs);
    assert!(
        r.worst_lateness < Duration::from_secs(15),
        "{:?}",
        r.worst_lateness
    );
}

async fn held_in(con: &mut redis::aio::MultiplexedConnection, ns: &str) -> u64 {
    let mut n = 0;
    for s in 0..8 {
        let c: u64 = redis::cmd("HLEN")
            .arg(format!("{ns}:dq{{{s}}}:rec"))
            .query_async(con)
            .await
            .expect("HLEN");
        n += c;
    }
    n
}

fn far_tasks(prefix: &str, n: usize) -> Batch {
    batch(n, |i| {
        delayed_props("test.record", &format!("{prefix}-{i}"), 600_000)
    })
}

/// Waits until the broker has let go of a stopped scheduler: no consumer
/// left on `NS.delay` (its unacked deliveries are back in the queue).
async fn until_released(env: &TestEnv) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if env.consumer_count(&env.names.delay()).await == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the stopped scheduler still consumes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `KAIROS_REDIS_WAIT=1`: intake acks a batch only once a replica has it.
/// With the replica frozen, the batch is written to the primary but stays
/// unacked (a scheduler stopped then returns it to RabbitMQ); once the
/// replica answers again, it is acked and the replica has every task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wait_acks_only_what_a_replica_has() {
    let env = TestEnv::new("rwait").await;
    let primary = OwnRedis::start_with(&["--appendonly", "no"]);
    let mut pcon = primary.connection().await;
    let (replica, mut rcon) = synced_replica(&primary).await;
    let mut sc = env.scheduler_config();
    sc.redis_url = primary.url();
    sc.common.events = false;
    sc.redis_wait = 1;
    sc.redis_wait_timeout_ms = 300;

    // Replica up: acked, and the replica has them when the ack came.
    let scheduler = InProcess::scheduler(sc.clone());
    env.publish_many(&env.names.delay(), far_tasks("a", 20))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.queue_depth(&env.names.delay()).await > 0 || held_in(&mut pcon, &env.ns).await < 20 {
        assert!(Instant::now() < deadline, "intake did not take the tasks");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Gone from the queue is not yet acked: a stop returns unacked ones.
    scheduler.stop().await;
    until_released(&env).await;
    assert_eq!(env.queue_depth(&env.names.delay()).await, 0, "all 20 acked");
    assert_eq!(
        held_in(&mut rcon, &env.ns).await,
        20,
        "the replica has all 20"
    );

    // Replica frozen: the first batch is written to the primary and never
    // acked, and intake takes nothing more meanwhile (each batch is acked
    // before the next is taken).
    replica.pause();
    let scheduler = InProcess::scheduler(sc.clone());
    env.publish_many(&env.names.delay(), far_tasks("b", 20))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while held_in(&mut pcon, &env.ns).await <= 20 {
        assert!(
            Instant::now() < deadline,
            "intake did not write the tasks: {} waiting",
            env.queue_depth(&env.names.delay()).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Several WAITs time out meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    scheduler.stop().await;
    until_released(&env).await;
    assert_eq!(
        env.queue_depth(&env.names.delay()).await,
        20,
        "nothing acked without the replica"
    );

    // Replica back: the batch is acked, after the replica has it.
    replica.resume();
    let scheduler = InProcess::scheduler(sc);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.queue_depth(&env.names.delay()).await > 0 || held_in(&mut rcon, &env.ns).await < 40 {
        assert!(
            Instant::now() < deadline,
            "intake did not ack after the replica came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last batch's WAIT reply and ack may still be on their way (the
    // replica already answers at once): the broker's count of unacked
    // deliveries is not visible over AMQP, so give them a moment.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    scheduler.stop().await;
    until_released(&env).await;
    assert_eq!(env.queue_depth(&env.names.delay()).await, 0, "all acked");
    assert_eq!(
        held_in(&mut rcon, &env.ns).await,
        40,
        "the replica has all 40"
    );
}

/// A claim whose reply is lost (Redis stalled past the client's timeout)
/// has leased its tasks all the same; the next claim, sent with the same
/// round, gets them back at once instead of after the 30 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_without_reply_is_answered_by_the_next() {
    let redis = OwnRedis::start_with(&["--appendonly", "no", "--enable-debug-command", "local"]);
    let ns = "kt-claim-lost";
    let pool = kairos_scheduler::redis_io::conn::pool(
        &redis.url(),
        &Default::default(),
        Duration::from_millis(200),
    )
    .expect("pool");
    let q = RedisDelayQueue::new(pool, ns, 2);
    q.check_shard_count().await.expect("shard count");
    let mut con = redis.connection().await;
    let now = redis_now(&mut con).await;
    let entries: Vec<Entry> = (0..20)
        .map(|i| task_entry(&format!("t-{i}"), Some(now - 10), 0, 10))
        .collect();
    q.schedule(&entries).await.expect("schedule");

    let mut staller = redis.connection().await;
    let stall = tokio::spawn(async move {
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("0.6")
            .query_async(&mut staller)
            .await
            .expect("DEBUG SLEEP");
    });
    // Sent while Redis sleeps: runs when it wakes, after the client gave up.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let lost = q.claim(100, 30_000, 0).await.expect_err("no reply in time");
    assert!(lost.outcome_unknown(), "{lost:?}");
    stall.await.expect("stall");
    let leased: u64 = redis::cmd("ZCARD")
        .arg(format!("{ns}:dq{{0}}:lease"))
        .query_async::<u64>(&mut con)
        .await
        .expect("ZCARD")
        + redis::cmd("ZCARD")
            .arg(format!("{ns}:dq{{1}}:lease"))
            .query_async::<u64>(&mut con)
            .await
            .expect("ZCARD");
    assert_eq!(leased, 20, "the claim ran without its reply");

    let again = q.claim(100, 30_000, 0).await.expect("claim");
    let mut ids: Vec<String> = again.tasks.iter().map(|c| c.member.clone()).collect();
    ids.sort();
    let mut want: Vec<String> = (0..20).map(|i| format!("t-{i}")).collect();
    want.sort();
    assert_eq!(
        ids, want,
        "the repeated claim returns what the lost one leased"
    );
    assert!(again.tasks.iter().all(|c| !c.record.is_empty()));
    // The next round is a new claim: nothing is handed out twice.
    assert!(q
        .claim(100, 30_000, 0)
        .await
        .expect("claim")
        .tasks
        .is_empty());
    let done: Vec<_> = again.tasks.iter().collect();
    q.complete(&done).await.expect("complete");
    assert_eq!(q.pending().await.expect("pending"), 0);
}

/// A completion repeated after a lost reply forgets only tasks still
/// leased: if the first ran, an id submitted anew since stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_completion_spares_a_resubmitted_id() {
    let redis = OwnRedis::start_with(&["--appendonly", "no"]);
    let ns = "kt-complete-again";
    let q = own_queue(&redis, ns, 1).await;
    let mut con = redis.connection().await;
    let now = redis_now(&mut con).await;
    q.schedule(&[task_entry("x", Some(now - 10), 0, 10)])
        .await
        .expect("schedule");
    let claim = q.claim(10, 30_000, 0).await.expect("claim");
    let done: Vec<_> = claim.tasks.iter().collect();
    q.complete(&done).await.expect("complete");
    // Submitted again under the same id, then the completion repeated.
    q.schedule(&[task_entry("x", Some(now + 60_000), 0, 10)])
        .await
        .expect("schedule");
    q.complete_again(&done).await.expect("complete again");
    assert_eq!(q.pending().await.expect("pending"), 1, "the new task stays");
}

/// Waits for the next wake-up of `notify`, failing after a while.
async fn woken(notify: &tokio::sync::Notify, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), notify.notified())
        .await
        .unwrap_or_else(|_| panic!("no wake-up: {what}"));
}

/// Publishes on `channel`; returns how many subscribers got it.
async fn publish(client: &redis::Client, channel: &str) -> i64 {
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg("1")
        .query_async(&mut con)
        .await
        .expect("PUBLISH")
}

#[tokio::test]
async fn wake_ups_survive_a_redis_restart() {
    let mut redis = OwnRedis::start();
    let client = redis::Client::open(redis.url()).expect("client");
    let notify = Arc::new(tokio::sync::Notify::new());
    let cancel = tokio_util::sync::CancellationToken::new();
    let listener = tokio::spawn(kairos_scheduler::delay::wake::listen(
        client.clone(),
        "wake".into(),
        notify.clone(),
        cancel.clone(),
    ));
    // Each subscription wakes the pump once (it covers what was published
    // while unsubscribed), then every message does.
    woken(&notify, "subscribed").await;
    assert_eq!(publish(&client, "wake").await, 1);
    woken(&notify, "a message").await;
    redis.kill9();
    redis.restart();
    woken(&notify, "subscribed again after the restart").await;
    assert_eq!(publish(&client, "wake").await, 1);
    woken(&notify, "a message after the restart").await;
    cancel.cancel();
    listener.await.expect("listener");
}

/// `KAIROS_REDIS_WAIT=1` on a master that has no replica (what a promoted
/// replica is until the lost node comes back): the intake keeps the batch
/// unacked and asks the replicas again, round after round, but must not
/// write the hold again. Its tasks fall due meanwhile and run: holding them
/// again put them back and ran them once more on every round. Once a
/// replica attaches, the batch is acked, and every task ran exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wait_without_a_replica_runs_each_task_once() {
    const TASKS: usize = 20;
    /// Confirmation rounds to see before a replica attaches.
    const ROUNDS: i64 = 5;
    let env = TestEnv::new("rwait-once").await;
    let primary = OwnRedis::start_with(&["--appendonly", "no"]);
    let mut pcon = primary.connection().await;
    let mut sc = env.scheduler_config();
    sc.redis_url = primary.url();
    sc.common.events = false;
    sc.redis_wait = 1;
    sc.redis_wait_timeout_ms = 100;
    let scheduler = InProcess::scheduler(sc);
    let log = RunLog::default();
    let mut wc = env.worker_config();
    wc.common.events = false;
    let worker =
        InProcess::worker(kairos_worker::Worker::new(wc).handler("test.record", log.handler(0)));

    env.publish_many(
        &env.names.delay(),
        batch(TASKS, |i| {
            delayed_props("test.record", &format!("once-{i}"), 200)
        }),
    )
    .await;
    // The intake's first batch (some or all of the tasks, as they came) is
    // held, falls due and runs; the rest wait for it to be acked.
    log.wait_distinct(1, Duration::from_secs(30)).await;
    // The batch is still unacked: rounds of confirmation go on. Each
    // refreshes the proofs (PEXPIRE) on the master. Its tasks were due
    // 200 ms after the publish and have run by the last of these rounds.
    let deadline = Instant::now() + Duration::from_secs(30);
    while calls(&mut pcon, "pexpire").await < ROUNDS {
        assert!(
            Instant::now() < deadline,
            "no confirmation rounds while the master has no replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A replica attaches: the batch is acked (the delivery leaves the
    // broker's unacked count: seen as the scheduler stopping with nothing
    // to return).
    let (_replica, _) = synced_replica(&primary).await;
    // The intake takes a batch only after it acked the one before: the
    // other batches, and a task published now, run only once the first
    // batch was confirmed.
    env.publish_many(
        &env.names.delay(),
        batch(1, |_| delayed_props("test.record", "probe", 0)),
    )
    .await;
    log.wait_distinct(TASKS + 1, Duration::from_secs(30)).await;
    scheduler.stop().await;
    until_released(&env).await;
    worker.stop().await;
    // Only the probe's batch may have been unacked at the stop.
    while let Some(back) = env
        .channel
        .basic_get(
            env.names.delay().as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        let id = back.delivery.properties.message_id().clone();
        assert_eq!(
            id.as_ref().map(|i| i.as_str()),
            Some("probe"),
            "a task of the first batch was never acked"
        );
    }
    let runs = log.snapshot();
    assert_eq!(runs.len(), TASKS + 1);
    let again: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(again.is_empty(), "tasks ran more than once: {again:?}");
}

/// Calls of Redis command `cmd` so far (`INFO commandstats`).
async fn calls(con: &mut redis::aio::MultiplexedConnection, cmd: &str) -> i64 {
    info(con, "commandstats")
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A replica of `primary` (no persistence), once its link is up; with a
/// connection to it.
async fn synced_replica(primary: &OwnRedis) -> (OwnRedis, redis::aio::MultiplexedConnection) {
    let replica = OwnRedis::start_with(&[
        "--appendonly",
        "no",
        "--replicaof",
        "127.0.0.1",
        &primary.port.to_string(),
    ]);
    let mut rcon = replica.connection().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !info(&mut rcon, "replication")
        .await
        .contains("master_link_status:up")
    {
        assert!(Instant::now() < deadline, "replica did not sync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (replica, rcon)
}
