//! Kairos on the 3-node clusters (a RabbitMQ cluster with quorum queues and
//! a Redis Cluster of 3 masters with a replica each), through the loss of
//! a RabbitMQ node and of a Redis master. Behind the `cluster` feature; it
//! needs the clusters running: `scripts/cluster-test.sh` starts them,
//! exports their settings (`KAIROS_TEST_AMQP_URL`, `KAIROS_TEST_REDIS_URL`,
//! `KAIROS_TEST_QUEUE_MODE`, `KAIROS_CLUSTER_*`) and runs this file alone
//! (`--test-threads=1`: each test kills nodes).
//!
//! What ran is counted from the record files of `kairos-record-worker`
//! (its `record` handler appends the task id before it succeeds), not from
//! lifecycle events: events are published without confirms and documented
//! as a view, so a node's loss may drop some that did happen.
//!
//! # The duplicate bound
//!
//! A task runs twice when the acknowledgement of its first run, or the
//! record that it was published, is lost with the node that held it:
//!
//! * worker side: deliveries a worker held unacked when its queue's
//!   leader or its own connection went; at most its prefetch per band
//!   queue, at most the maximum concurrency ([`WORKER_MAX`]), for each
//!   worker and band: `WORKERS x 3 x WORKER_MAX`;
//! * scheduler side: tasks claimed and published whose confirm did not
//!   come back (connection on the lost node), published again after the
//!   lease: at most one claim round, `SHARDS x SCHEDULER_BATCH` per
//!   scheduler;
//! * Redis side: completions (the record deleted after the publish) the
//!   lost master acknowledged but had not yet sent to its replica: the new
//!   master publishes those again; at most the claim rounds of the
//!   replication lag, bounded here by one more round of the shards on
//!   the lost master.
//!
//! [`DUPLICATE_BOUND`] adds these up (2,592 here). The claims in flight at
//! any instant are the tasks due in the claim-ahead window, not whole
//! batches, so these paths give a few duplicates at most.
//!
//! Measured (December 2026, 2 shared cores): 0 duplicates when every
//! delayed task was in Redis before the kill; 59 to 89 when the intake was
//! still taking them in. Those come from another path: with
//! `KAIROS_REDIS_WAIT=1` the intake holds a batch unacked and repeats its
//! hold (write + `WAIT`) every round until a replica confirms, and the
//! master that took over has none until the killed node is back (about
//! 5 s here). Tasks of that batch that came due meanwhile were published,
//! ran and completed, and each repeated hold puts them back: they run
//! again, once per round. Still within the bound; to be fixed in the
//! intake (repeat the `WAIT` only, not the write).
//!
//! The killed Redis node is started again as soon as its replica took
//! over, as an orchestrator would: with `KAIROS_REDIS_WAIT=1` a master
//! without a replica confirms nothing, and the intake of every batch with
//! a task in its slots waits until it has one again.
#![cfg(feature = "cluster")]

use kairos_shared::client::NewTask;
use kairos_shared::queue_mode::QueueMode;
use kairos_tests::*;
use rand::Rng;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Tasks due at once.
const TASKS_NOW: usize = 1_000;
/// Tasks delayed by [`DELAY_MS`], uniformly.
const TASKS_DELAYED: usize = 2_000;
/// The delays of the delayed tasks (ms).
const DELAY_MS: std::ops::RangeInclusive<i64> = 2_000..=8_000;
/// Tasks that must have run before the nodes are killed: about a third.
const KILL_AFTER: usize = 1_000;
/// The RabbitMQ node killed: the first of the list, where the test's own
/// connection declared the queues (their leaders live there).
const RABBIT_NODE: usize = 1;
/// Schedulers and workers, as processes.
const SCHEDULERS: usize = 2;
const WORKERS: usize = 2;
/// Workers' maximum concurrency (`KAIROS_CONCURRENCY=4..32`), which caps
/// their prefetch per queue.
const WORKER_MAX: usize = 32;
/// Priority bands of a queue in quorum mode.
const BANDS: usize = 3;
/// Tasks a scheduler claims per shard per round (`KAIROS_BATCH`).
const SCHEDULER_BATCH: usize = 100;
/// Delay-queue shards (the default `KAIROS_SHARDS`).
const SHARDS: usize = 8;
/// The lease of a claimed task (`KAIROS_LEASE_MS`): a publish whose
/// outcome the lost node took is repeated after it. Short, so the test
/// does not wait the default 30 s.
const LEASE_MS: &str = "5000";
/// The bound on duplicates derived in the module's doc.
const DUPLICATE_BOUND: usize =
    WORKERS * BANDS * WORKER_MAX + SCHEDULERS * SHARDS * SCHEDULER_BATCH + SHARDS * SCHEDULER_BATCH;
/// How long every task may take to run, kills included.
const ALL_RUN_WITHIN: Duration = Duration::from_secs(120);
/// How often the record files are read.
const RECORD_POLL: Duration = Duration::from_millis(20);
/// How long after the last run nothing more may come (a late duplicate
/// would come within a lease).
const QUIET: Duration = Duration::from_secs(2);
/// The three slot ranges `redis-cli --cluster create` gives 3 masters, by
/// first slot: `scripts/cluster.sh stop redis-master N` counts them so.
const SLOT_RANGES: [std::ops::RangeInclusive<u16>; 3] = [0..=5460, 5461..=10922, 10923..=16383];

/// The clusters `scripts/cluster-test.sh` started, and `scripts/cluster.sh`
/// to stop and start their nodes (it reads the same `KAIROS_CLUSTER_*`).
struct Cluster {
    amqp_urls: Vec<String>,
    redis_url: String,
}

impl Cluster {
    fn from_env() -> Self {
        const HOW: &str = "this test needs the 3-node clusters: run scripts/cluster-test.sh (or `scripts/cluster.sh up` and export its KAIROS_AMQP_URL / KAIROS_REDIS_URL as KAIROS_TEST_AMQP_URL / KAIROS_TEST_REDIS_URL, with KAIROS_CLUSTER_* as for up)";
        let amqp = std::env::var("KAIROS_TEST_AMQP_URL").unwrap_or_default();
        let amqp_urls: Vec<String> = kairos_shared::amqp::split_urls(&amqp)
            .map(str::to_string)
            .collect();
        assert_eq!(amqp_urls.len(), 3, "KAIROS_TEST_AMQP_URL: {HOW}");
        let redis_url = std::env::var("KAIROS_TEST_REDIS_URL").unwrap_or_default();
        assert!(
            kairos_shared::redis::cluster_nodes(&redis_url).is_some(),
            "KAIROS_TEST_REDIS_URL: {HOW}"
        );
        Cluster {
            amqp_urls,
            redis_url,
        }
    }

    /// The node list starting at node `first` (1-based): each process
    /// connects to another node first, so they spread.
    fn amqp_from(&self, first: usize) -> String {
        let n = self.amqp_urls.len();
        (0..n)
            .map(|k| self.amqp_urls[(first - 1 + k) % n].as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `scripts/cluster.sh ARGS`; returns its stderr (its log).
    fn script(&self, args: &[&str]) -> String {
        let out = run_ok(
            Command::new(workspace_root().join("scripts/cluster.sh")).args(args),
            &format!("scripts/cluster.sh {}", args.join(" ")),
            "run scripts/cluster.sh",
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn stop_rabbit(&self, n: usize) {
        self.script(&["stop", "rabbit", &n.to_string()]);
    }

    fn start_rabbit(&self, n: usize) {
        self.script(&["start", "rabbit", &n.to_string()]);
    }

    /// Kills the master of slot range `n` (1-based); returns its port.
    fn stop_redis_master(&self, n: usize) -> u16 {
        let log = self.script(&["stop", "redis-master", &n.to_string()]);
        // "kill -9 the Redis master on PORT (slot range N)"
        log.split("master on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in cluster.sh's log: {log}"))
    }

    /// The port of the live master serving slot range `n` (1-based), as a
    /// live node's `CLUSTER NODES` says; `None` while no master serves it.
    fn redis_master(&self, n: usize) -> Option<u16> {
        let nodes = kairos_shared::redis::cluster_nodes(&self.redis_url)?.ok()?;
        for node in nodes {
            let port = node.rsplit(':').next()?.trim_end_matches('/');
            let Ok(out) = Command::new("redis-cli")
                .args(["-p", port, "cluster", "nodes"])
                .output()
            else {
                continue;
            };
            let text = String::from_utf8_lossy(&out.stdout);
            if text.trim().is_empty() {
                continue; // a stopped node
            }
            // id addr:port@bus flags master ping pong epoch state slots...
            for line in text.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                    continue;
                }
                let first_slot: Option<u16> = f[8].split('-').next().and_then(|s| s.parse().ok());
                if first_slot.is_some_and(|s| SLOT_RANGES[n - 1].contains(&s)) {
                    return f[1].split([':', '@']).nth(1).and_then(|p| p.parse().ok());
                }
            }
            return None;
        }
        None
    }

    /// Waits until a master other than `killed` serves slot range `n` (the
    /// replica took over), then starts the killed node again as its
    /// replica, as an orchestrator would: with `KAIROS_REDIS_WAIT=1` a
    /// master without a replica confirms no write. Returns how long the
    /// failover took.
    fn fail_over_and_restart(&self, n: usize, killed: u16, since: Instant) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(60);
        let took = loop {
            if self.redis_master(n).is_some_and(|p| p != killed) {
                break since.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "no replica took over slot range {n} from {killed}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        self.start_redis(killed);
        took
    }

    /// Starts the Redis node on `port` again and waits until it is a
    /// replica in sync, so a later test can kill its master.
    fn start_redis(&self, port: u16) {
        self.script(&["start", "redis", &port.to_string()]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "info", "replication"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if info.contains("role:slave") && info.contains("master_link_status:up") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Redis on {port} did not become an in-sync replica: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The slot range (1-based, as `cluster.sh stop redis-master N` counts)
/// holding most delay-queue shards: the master whose loss hits the most
/// tasks. Shard `S`'s keys carry the hash tag `{S}`, whatever the
/// namespace.
fn busiest_slot_range() -> usize {
    let mut shards = [0usize; 3];
    for s in 0..SHARDS {
        let slot = kairos_shared::redis_slots::slot_of(format!("{{{s}}}").as_bytes());
        let range = SLOT_RANGES
            .iter()
            .position(|r| r.contains(&slot))
            .expect("a slot is in a range");
        shards[range] += 1;
    }
    (0..3).max_by_key(|&r| shards[r]).expect("three ranges") + 1
}

/// What the record files say: every run, when this test first saw it.
#[derive(Default)]
struct Runs {
    files: Vec<PathBuf>,
    offsets: Vec<usize>,
    /// (seen at, worker index, task id), in the order seen.
    seen: Vec<(Instant, usize, String)>,
    first: HashMap<String, Instant>,
}

impl Runs {
    fn new(files: Vec<PathBuf>) -> Self {
        Runs {
            offsets: vec![0; files.len()],
            files,
            ..Runs::default()
        }
    }

    /// Reads the lines appended since the last call.
    fn poll(&mut self) {
        let now = Instant::now();
        for (w, file) in self.files.iter().enumerate() {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue; // no run yet
            };
            // Only whole lines: a run being written is read next time.
            let Some(end) = text.rfind('\n').map(|i| i + 1) else {
                continue;
            };
            if end <= self.offsets[w] {
                continue;
            }
            for id in text[self.offsets[w]..end].lines() {
                self.first.entry(id.to_string()).or_insert(now);
                self.seen.push((now, w, id.to_string()));
            }
            self.offsets[w] = end;
        }
    }

    fn distinct(&self) -> usize {
        self.first.len()
    }

    fn duplicates(&self) -> usize {
        self.seen.len() - self.first.len()
    }

    /// Polls until `done` holds or `within` passed; whether it held.
    async fn wait(&mut self, within: Duration, done: impl Fn(&Runs) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            self.poll();
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(RECORD_POLL).await;
        }
    }
}

/// Tasks held in the namespace's delay queue (records of every shard).
async fn held(env: &TestEnv) -> usize {
    let mut con = env.redis.clone();
    let mut pipe = redis::pipe();
    for s in 0..SHARDS {
        pipe.cmd("HLEN").arg(format!("{}:dq{{{s}}}:rec", env.ns));
    }
    let counts: Vec<usize> = con.query_pipe(&pipe).await.unwrap_or_default();
    counts.into_iter().sum()
}

/// Two schedulers and two record workers as processes on the clusters,
/// 3,000 tasks (1,000 now, 2,000 delayed 2 to 8 s, priorities 0 to 9),
/// and, once a third have run and the delayed ones wait, kill -9 of
/// RabbitMQ node 1 and of the Redis master holding most delay shards:
/// every task runs, duplicates stay within [`DUPLICATE_BOUND`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_runs_through_the_loss_of_a_rabbitmq_node_and_a_redis_master() {
    let cluster = Cluster::from_env();
    let env = TestEnv::with_mode("clsys", QueueMode::Quorum).await;
    let dir = std::env::temp_dir().join(format!("kairos-{}", env.ns));
    std::fs::create_dir_all(&dir).expect("record dir");
    let setting = |env: &mut Vec<(String, String)>, k: &str, v: String| {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v));
    };

    // Processes spread over the nodes: scheduler 1 and worker 2 start on
    // node 1 (the one killed), the others on nodes 2 and 3.
    let mut procs = Vec::new();
    for s in 0..SCHEDULERS {
        let mut penv = env.process_env();
        setting(&mut penv, "KAIROS_AMQP_URL", cluster.amqp_from(1 + s));
        setting(&mut penv, "KAIROS_REDIS_URL", cluster.redis_url.clone());
        setting(&mut penv, "KAIROS_REDIS_WAIT", "1".into());
        setting(&mut penv, "KAIROS_BATCH", SCHEDULER_BATCH.to_string());
        setting(&mut penv, "KAIROS_LEASE_MS", LEASE_MS.into());
        // Events are not what this test counts: spare the 2 cores.
        setting(&mut penv, "KAIROS_EVENTS", "false".into());
        let log = dir.join(format!("scheduler-{s}.log"));
        procs.push(Proc::spawn_logged("kairos-scheduler", &penv, &log));
    }
    let mut files = Vec::new();
    for w in 0..WORKERS {
        let file = dir.join(format!("runs-{w}.txt"));
        let mut penv = env.process_env();
        setting(&mut penv, "KAIROS_AMQP_URL", cluster.amqp_from(3 - 2 * w));
        setting(&mut penv, "KAIROS_REDIS_URL", cluster.redis_url.clone());
        setting(&mut penv, "KAIROS_RECORD_FILE", file.display().to_string());
        setting(&mut penv, "KAIROS_CONCURRENCY", format!("4..{WORKER_MAX}"));
        setting(&mut penv, "KAIROS_EVENTS", "false".into());
        setting(&mut penv, "KAIROS_WORKER_ID", format!("cluster-w{w}"));
        let log = dir.join(format!("worker-{w}.log"));
        procs.push(Proc::spawn_logged("kairos-record-worker", &penv, &log));
        files.push(file);
    }
    let mut runs = Runs::new(files);

    // The tasks: ids cs-0000.., priorities mixed, the delayed ones after
    // the immediate ones.
    let started = Instant::now();
    let client = env.client().await;
    let mut rng = rand::rng();
    let mut due = HashMap::new();
    let tasks: Vec<NewTask> = (0..TASKS_NOW + TASKS_DELAYED)
        .map(|i| {
            let id = format!("cs-{i:04}");
            let mut task = NewTask::new("record")
                .id(id.clone())
                .priority(rng.random_range(0..=9));
            if i >= TASKS_NOW {
                let delay = rng.random_range(DELAY_MS);
                due.insert(id, now_ms() + delay);
                task = task.delay_ms(delay);
            }
            task
        })
        .collect();
    for chunk in tasks.chunks(500) {
        client.enqueue_many(chunk).await.expect("enqueue");
    }
    let published = started.elapsed();
    drop(client);

    assert!(
        runs.wait(ALL_RUN_WITHIN, |r| r.distinct() >= KILL_AFTER)
            .await,
        "only {} tasks ran before the kill (see {})",
        runs.distinct(),
        dir.display()
    );
    let ran_before = runs.distinct();
    let held_before = held(&env).await;
    let range = busiest_slot_range();
    let killed_at = Instant::now();
    let killed_at_ms = now_ms();
    cluster.stop_rabbit(RABBIT_NODE);
    let redis_port = cluster.stop_redis_master(range);
    let kills_took = killed_at.elapsed();
    // The failover and the restart of the killed Redis node go on while
    // the runs are watched.
    let redis_back = {
        let c = Cluster {
            amqp_urls: cluster.amqp_urls.clone(),
            redis_url: cluster.redis_url.clone(),
        };
        tokio::task::spawn_blocking(move || {
            let failover = c.fail_over_and_restart(range, redis_port, killed_at);
            (failover, killed_at.elapsed())
        })
    };

    let all = TASKS_NOW + TASKS_DELAYED;
    let all_ran = runs.wait(ALL_RUN_WITHIN, |r| r.distinct() >= all).await;
    let (failover, replica_back) = redis_back.await.expect("failover task");
    let total = started.elapsed();
    // Late duplicates: wait for the delay queue to empty, then a quiet
    // window in which nothing more may run.
    let deadline = Instant::now() + ALL_RUN_WITHIN;
    while all_ran && held(&env).await > 0 && Instant::now() < deadline {
        runs.poll();
        tokio::time::sleep(RECORD_POLL).await;
    }
    let before_quiet = runs.seen.len();
    runs.wait(QUIET, |r| r.seen.len() > before_quiet + 10_000)
        .await;

    // Resuming: per worker, the first run after the kill; overall, the
    // longest gap between runs after it; the delayed tasks due after the
    // kill, how late they ran.
    let after: Vec<&(Instant, usize, String)> = runs
        .seen
        .iter()
        .filter(|(t, _, _)| *t > killed_at)
        .collect();
    let resumed: Vec<Option<u128>> = (0..WORKERS)
        .map(|w| {
            after
                .iter()
                .find(|(_, ww, _)| *ww == w)
                .map(|(t, _, _)| (*t - killed_at).as_millis())
        })
        .collect();
    let mut longest_gap = Duration::ZERO;
    let mut last = killed_at;
    for (t, _, _) in &after {
        longest_gap = longest_gap.max(*t - last);
        last = *t;
    }
    let mut late: Vec<i64> = due
        .iter()
        .filter(|(_, d)| **d > killed_at_ms)
        .filter_map(|(id, d)| {
            let seen = runs.first.get(id)?;
            let seen_ms = killed_at_ms + (*seen - killed_at).as_millis() as i64;
            Some(seen_ms - d)
        })
        .collect();
    late.sort_unstable();
    let mut runs_of: HashMap<&str, usize> = HashMap::new();
    for (_, _, id) in &runs.seen {
        *runs_of.entry(id.as_str()).or_default() += 1;
    }
    let twice: Vec<&str> = runs_of
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .take(10)
        .collect();
    let lost = all - runs.distinct();
    println!(
        "CLUSTER-SYSTEM published={all} in {published:?}; killed rabbit node {RABBIT_NODE} and the redis master on {redis_port} (slot range {range}) after {ran_before} ran, {held_before} held in Redis, kills took {kills_took:?}, redis failover after {failover:?}, killed node an in-sync replica again after {replica_back:?}; \
         ran={} lost={lost} duplicates={} (bound {DUPLICATE_BOUND}, e.g. {twice:?}); \
         worker resume after kill (ms)={resumed:?}; longest gap after kill={longest_gap:?}; \
         delayed due after kill: {} ran, late p50={} p99={} max={} ms; total={total:?}",
        runs.distinct(),
        runs.duplicates(),
        late.len(),
        percentile(&late, 50.0),
        percentile(&late, 99.0),
        late.last().copied().unwrap_or_default(),
    );

    // The nodes come back for the next test (or run) before any assert.
    for p in &mut procs {
        p.kill9();
    }
    cluster.start_rabbit(RABBIT_NODE);

    assert!(
        all_ran,
        "{lost} of {all} tasks never ran (logs and record files in {})",
        dir.display()
    );
    assert!(
        runs.duplicates() <= DUPLICATE_BOUND,
        "{} duplicates, over the bound of {DUPLICATE_BOUND}",
        runs.duplicates()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Delayed tasks accepted (the scheduler acked them to RabbitMQ) into the
/// delay queue while the Redis master holding most shards is killed:
/// without `KAIROS_REDIS_WAIT` the ones the master had not yet sent to its
/// replica are lost with it (measured and reported, not asserted: it is
/// the window the docs state); with `KAIROS_REDIS_WAIT=1` none may be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_loss_window_of_a_master_kill_with_and_without_wait() {
    let cluster = Cluster::from_env();
    // KAIROS_CLUSTER_LOSS_ROUNDS: measurements without WAIT (1 by
    // default; each costs a failover, about 10 s).
    let rounds: usize = std::env::var("KAIROS_CLUSTER_LOSS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let mut report = Vec::new();
    for wait in std::iter::repeat_n(0, rounds).chain([1]) {
        let (published, at_kill, kept) = intake_through_a_master_kill(&cluster, wait).await;
        println!(
            "WRITE-LOSS KAIROS_REDIS_WAIT={wait}: {published} delayed tasks confirmed ({at_kill} in Redis when the master was killed), {kept} in Redis after the failover, lost {}",
            published - kept
        );
        report.push((wait, published, kept));
    }
    for (wait, published, kept) in report {
        if wait > 0 {
            assert_eq!(
                kept, published,
                "with KAIROS_REDIS_WAIT={wait} no accepted task may be lost"
            );
        }
    }
}

/// Tasks published per batch while measuring the write loss.
const LOSS_BATCH: usize = 100;
/// Tasks published before the kill, and after it.
const LOSS_BEFORE: usize = 3_000;
const LOSS_AFTER: usize = 1_000;
/// Far enough ahead that no task fires during the measurement.
const LOSS_DELAY_MS: i64 = 600_000;

/// One scheduler (`KAIROS_REDIS_WAIT=wait`) takes delayed tasks in while
/// the Redis master with most shards is killed mid-stream; returns the
/// tasks confirmed, the tasks in Redis when the kill came, and the tasks
/// in Redis once the intake is drained.
async fn intake_through_a_master_kill(cluster: &Cluster, wait: u16) -> (usize, usize, usize) {
    let env = TestEnv::with_mode("clloss", QueueMode::Quorum).await;
    let mut penv = env.process_env();
    penv.retain(|(k, _)| k != "KAIROS_EVENTS");
    penv.push(("KAIROS_EVENTS".into(), "false".into()));
    penv.push(("KAIROS_REDIS_WAIT".into(), wait.to_string()));
    let dir = std::env::temp_dir().join(format!("kairos-{}", env.ns));
    std::fs::create_dir_all(&dir).expect("log dir");
    let mut scheduler = Proc::spawn_logged("kairos-scheduler", &penv, &dir.join("scheduler.log"));
    let client = env.client().await;
    let mut published = 0;
    // The kill comes from another task while publishing goes on, so the
    // master dies with writes in flight.
    let mut kill = None;
    let mut at_kill = 0;
    while published < LOSS_BEFORE + LOSS_AFTER {
        if published == LOSS_BEFORE {
            at_kill = held(&env).await;
            let script_env = (cluster.amqp_urls.clone(), cluster.redis_url.clone());
            kill = Some(tokio::task::spawn_blocking(move || {
                let c = Cluster {
                    amqp_urls: script_env.0,
                    redis_url: script_env.1,
                };
                let range = busiest_slot_range();
                let killed_at = Instant::now();
                let port = c.stop_redis_master(range);
                c.fail_over_and_restart(range, port, killed_at);
            }));
        }
        let batch: Vec<NewTask> = (published..published + LOSS_BATCH)
            .map(|i| {
                NewTask::new("kairos.noop")
                    .id(format!("wl-{i:05}"))
                    .delay_ms(LOSS_DELAY_MS)
            })
            .collect();
        client.enqueue_many(&batch).await.expect("enqueue");
        published += LOSS_BATCH;
    }
    if let Some(k) = kill {
        k.await.expect("kill task");
    }
    // Drained: NS.delay empty and what Redis holds stable for a moment
    // (the intake acks only after its write, and a redelivered batch is
    // written again).
    let delay_queue = env.names.delay();
    env.wait_depth(
        &delay_queue,
        ALL_RUN_WITHIN,
        "the intake did not drain",
        |d| d == 0,
    )
    .await;
    let mut kept = held(&env).await;
    let deadline = Instant::now() + ALL_RUN_WITHIN;
    loop {
        tokio::time::sleep(QUIET).await;
        let now = held(&env).await;
        if now == kept || Instant::now() > deadline {
            break;
        }
        kept = now;
    }
    scheduler.kill9();
    let _ = std::fs::remove_dir_all(&dir);
    (published, at_kill, kept)
}
