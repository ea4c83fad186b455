//! Kairos on a Redis Cluster (a private one: 3 masters, 3 replicas): the
//! delay queue's and the schedules' scripts run on it with their shards
//! spread over the masters, pipelines that span shards included; and a
//! scheduler and a worker with a `redis+cluster://` URL run delayed tasks,
//! fire an interval schedule, answer and cancel through the task status.

use kairos_scheduler::delay::store::{member, Claimed, Entry, RedisDelayQueue};
use kairos_scheduler::schedules::model::ScheduleSpec;
use kairos_scheduler::schedules::store::{Fire, Occurrence, ScheduleStore};
use kairos_shared::redis::{redis_pool, RedisPool};
use kairos_tests::*;
use kairos_worker::Worker;
use lapin::types::AMQPValue;
use serde_json::json;
use std::time::Duration;

/// How long a task or a tick may take to be seen.
const WITHIN: Duration = Duration::from_secs(30);

/// Enough shards that every master holds some.
const SHARDS: usize = 8;

fn cluster_pool(cluster: &OwnRedisCluster) -> RedisPool {
    let pool = redis_pool(&cluster.url(), &Default::default(), Duration::from_secs(5))
        .expect("cluster client");
    assert!(pool.is_cluster());
    pool
}

fn namespace() -> String {
    format!("kt-rc-{}", &uuid::Uuid::now_v7().simple().to_string()[20..])
}

fn entry(id: &str) -> Entry {
    Entry {
        member: member(id, 1),
        run_at: None,
        delay_ms: 0,
        record: format!("record of {id}").into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_queue_scripts_run_on_a_redis_cluster() {
    let cluster = OwnRedisCluster::start(3, 1);
    let q = RedisDelayQueue::new(cluster_pool(&cluster), &namespace(), SHARDS);
    q.check_shard_count().await.expect("shard count");

    // 40 tasks over the 8 shards: one hold pipeline spanning every master.
    let entries: Vec<Entry> = (0..40).map(|i| entry(&format!("t-{i}"))).collect();
    let held = q.schedule(&entries).await.expect("schedule");
    assert!(held.iter().all(|s| s.added));
    assert_eq!(q.pending().await.expect("pending"), 40);

    // The claim over every shard, then complete and release per shard.
    let claim = q.claim(100, 30_000, 0).await.expect("claim");
    assert_eq!(claim.tasks.len(), 40);
    let shards: std::collections::HashSet<usize> = claim.tasks.iter().map(|t| t.shard).collect();
    assert!(shards.len() > 3, "tasks spread over shards: {shards:?}");
    assert!(claim
        .tasks
        .iter()
        .all(|t| t.record == format!("record of {}", t.member).into_bytes()));
    let (done, failed): (Vec<&Claimed>, Vec<&Claimed>) =
        claim.tasks.iter().partition(|t| t.shard % 2 == 0);
    q.complete(&done).await.expect("complete");
    q.release(&failed).await.expect("release");
    assert_eq!(q.pending().await.expect("pending"), failed.len() as u64);

    // Every master forgets the scripts (as a promoted replica or a
    // restarted master would): the next call loads them on every master.
    cluster.on_every_node(&["SCRIPT", "FLUSH"]);
    let again = q.claim(100, 30_000, 0).await.expect("claim again");
    assert_eq!(again.tasks.len(), failed.len());
    let again: Vec<&Claimed> = again.tasks.iter().collect();
    q.complete(&again).await.expect("complete");
    assert_eq!(q.pending().await.expect("pending"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_scripts_run_on_a_redis_cluster() {
    let cluster = OwnRedisCluster::start(3, 1);
    let pool = cluster_pool(&cluster);
    let ns = namespace();
    let queue = RedisDelayQueue::new(pool.clone(), &ns, SHARDS);
    queue.check_shard_count().await.expect("shards");
    let store = ScheduleStore::new(pool, &ns, &queue);
    store.beat(1_000).await.expect("beat");
    let now = store.now().await.expect("now");
    let tick = now - 10;
    for i in 0..12 {
        let spec: ScheduleSpec = serde_json::from_str(&format!(
            r#"{{"id":"s{i}","every_ms":60000,"task":{{"name":"t"}}}}"#
        ))
        .expect("spec");
        store
            .put(&spec, &format!("s{i}"), Some(tick), false)
            .await
            .expect("put");
    }
    let due = store.due(0, 100).await.expect("due");
    assert_eq!(due.items.len(), 12);
    let fires: Vec<Fire> = due
        .items
        .iter()
        .map(|item| Fire {
            shard: item.shard,
            id: item.id.clone(),
            expected_next: item.next,
            digest: item.digest.clone(),
            last: item.last,
            new_next: Some(tick + 60_000),
            overlap_skip: false,
            max_run_ms: 1000,
            occurrences: vec![Occurrence {
                member: format!("{}@{tick}", item.id),
                tick,
                record: b"K\x01".to_vec(),
            }],
        })
        .collect();
    let fired = store.fire(&fires).await.expect("fire");
    assert!(fired.iter().all(|f| f.won && f.enqueued == 1));
    assert_eq!(queue.pending().await.expect("pending"), 12);
    let view = store.view("s3").await.expect("view").expect("s3 exists");
    drop(view);
    assert!(store.delete("s3").await.expect("delete"));
    assert!(store.view("s3").await.expect("view").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_and_a_worker_run_on_a_redis_cluster() {
    let cluster = OwnRedisCluster::start(3, 1);
    let env = TestEnv::new("rcluster").await;
    let mut tap = EventTap::new(&env).await;
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    sc.redis_url = cluster.url();
    // Each intake batch waits for a replica of every master it wrote to.
    sc.redis_wait = 1;
    let scheduler = InProcess::scheduler(sc);
    let mut wc = env.worker_config();
    wc.redis_url = cluster.url();
    let worker = InProcess::worker(Worker::new(wc).with_builtins());
    let api = ScheduleApi::new(addr);
    api.wait_ready(WITHIN).await;

    // Delayed tasks over the shards: held, claimed, published, run.
    let delay = env.names.delay();
    const N: usize = 20;
    for i in 0..N {
        let props = with_headers(
            task_props("kairos.noop", &format!("d-{i}")),
            &[("x-delay-ms", AMQPValue::LongInt(300))],
        );
        env.publish(&delay, "default", props, b"").await;
    }
    // One far in the future, cancelled through the API.
    let later = with_headers(
        task_props("kairos.noop", "later"),
        &[("x-delay-ms", AMQPValue::LongInt(600_000))],
    );
    env.publish(&delay, "default", later, b"").await;
    tap.wait_until(WITHIN, "every delayed task ran", |seen| {
        (0..N).all(|i| {
            let id = format!("d-{i}");
            seen.iter().any(|e| e.id == id && e.kind == "succeeded")
        })
    })
    .await;

    // The task status, written on the cluster, read by the API.
    let deadline = tokio::time::Instant::now() + WITHIN;
    loop {
        let r = api.call(|a| a.send("GET", "/v1/tasks/d-0", None)).await;
        if r.status == 200 && r.body["state"] == "succeeded" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status of d-0: {} {:?}",
            r.status,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = api
        .call(|a| a.send("DELETE", "/v1/tasks/later", None))
        .await;
    assert!(r.ok(), "cancel: {} {:?}", r.status, r.body);

    // An interval schedule fires.
    let r = api
        .put(
            "tick",
            json!({"every_ms": 500, "task": {"name": "kairos.noop"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    tap.wait_until(WITHIN, "two ticks ran", |seen| {
        seen.iter()
            .filter(|e| e.kind == "succeeded" && e.id.starts_with("tick"))
            .count()
            >= 2
    })
    .await;

    // Every loop of the scheduler (ownership, pump, ticker, wake, status
    // writer, gauges) is healthy, and Redis answers the probe.
    let port = addr.port();
    let ready = tokio::task::spawn_blocking(move || http_get(port, "/readyz"))
        .await
        .expect("readyz task");
    let (status, body) = ready.expect("/readyz answers");
    assert_eq!(status, 200, "{body}");

    worker.stop().await;
    scheduler.stop().await;
}

/// Prints the mean round trip of an empty claim over every shard (the
/// pump's hot path): one pipeline on one server, one per slot on the
/// cluster. Unoptimized build, shared machine: for the order of magnitude.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_round_trip_on_a_node_and_on_a_cluster() {
    const ROUNDS: u32 = 200;
    let cluster = OwnRedisCluster::start(3, 1);
    let env = TestEnv::new("rc-claim").await;
    let node = redis_pool(REDIS_URL, &Default::default(), Duration::from_secs(5)).expect("pool");
    for (what, pool, ns) in [
        ("one node", node, env.ns.clone()),
        ("3-master cluster", cluster_pool(&cluster), namespace()),
    ] {
        let q = RedisDelayQueue::new(pool, &ns, SHARDS);
        q.check_shard_count().await.expect("shard count");
        q.claim(100, 30_000, 0).await.expect("warm up");
        let start = std::time::Instant::now();
        for _ in 0..ROUNDS {
            let claim = q.claim(100, 30_000, 0).await.expect("claim");
            assert!(claim.tasks.is_empty());
        }
        println!(
            "claim over {SHARDS} shards, {what}: {} us per round trip",
            start.elapsed().as_micros() / u128::from(ROUNDS)
        );
    }
}

/// Losing a master: its replica takes over, and the tasks it held (already
/// replicated) are all claimed from the new master through the same client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_tasks_survive_the_loss_of_a_master() {
    let mut cluster = OwnRedisCluster::start(3, 1);
    let q = RedisDelayQueue::new(cluster_pool(&cluster), &namespace(), SHARDS);
    q.check_shard_count().await.expect("shard count");
    let entries: Vec<Entry> = (0..40).map(|i| entry(&format!("f-{i}"))).collect();
    q.schedule(&entries).await.expect("schedule");
    let master = cluster.replicated_master(WITHIN);
    cluster.nodes[master].kill9();
    let killed = std::time::Instant::now();

    // The cluster notices (node timeout 2 s) and promotes the replica;
    // claims fail until then.
    let deadline = tokio::time::Instant::now() + WITHIN;
    let mut claimed = std::collections::HashSet::new();
    let mut errors = 0;
    while claimed.len() < entries.len() {
        match q.claim(100, 30_000, 0).await {
            Ok(claim) => {
                let done: Vec<&Claimed> = claim.tasks.iter().collect();
                claimed.extend(claim.tasks.iter().map(|t| t.member.clone()));
                q.complete(&done).await.ok();
            }
            Err(_) => errors += 1,
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} tasks claimed after the failover ({errors} failed claims)",
            claimed.len(),
            entries.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "all {} tasks claimed {} ms after a master was killed; {errors} claims failed meanwhile",
        claimed.len(),
        killed.elapsed().as_millis()
    );
}
