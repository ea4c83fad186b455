//! The schedule scripts against a real Redis: the compare-and-set lets one
//! of many concurrent fires through, a replaced definition makes a stale
//! fire lose, no tick fires twice, and pause withdraws waiting occurrences;
//! a ticker round tells ticks missed in an outage from ticks it is late for.

use kairos_scheduler::delay::store::RedisDelayQueue;
use kairos_scheduler::schedules::model::ScheduleSpec;
use kairos_scheduler::schedules::store::{Fire, Occurrence, ScheduleStore};
use kairos_scheduler::schedules::ticker::Ticker;
use kairos_shared::events::EventSink;
use kairos_tests::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

fn fire_of(item: &kairos_scheduler::schedules::store::DueItem, tick: i64, new_next: i64) -> Fire {
    Fire {
        shard: item.shard,
        id: item.id.clone(),
        expected_next: item.next,
        digest: item.digest.clone(),
        last: item.last,
        new_next: Some(new_next),
        overlap_skip: false,
        max_run_ms: 1000,
        occurrences: vec![Occurrence {
            member: format!("{}@{tick}", item.id),
            tick,
            record: b"K\x01".to_vec(),
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_many_concurrent_fires_wins() {
    let env = TestEnv::new("schlua").await;
    let pool = deadpool_redis::Config::from_url(REDIS_URL)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("pool");
    let queue = RedisDelayQueue::new(pool.clone(), &env.ns, 8);
    queue.check_shard_count().await.expect("shards");
    let store = ScheduleStore::new(pool, &env.ns, &queue);
    let spec: ScheduleSpec =
        serde_json::from_str(r#"{"id":"s","every_ms":60000,"task":{"name":"t"}}"#).unwrap();
    let now = store.now().await.unwrap();
    let tick = now - 10;
    store.put(&spec, "s", Some(tick), false).await.unwrap();

    let due = store.due(0, 100).await.unwrap();
    assert_eq!(due.items.len(), 1);
    let item = due.items[0].clone();
    // Ten schedulers fire the same tick at once: one wins.
    let fires: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            let f = fire_of(&item, tick, tick + 60_000);
            tokio::spawn(async move { store.fire(&[f]).await.unwrap()[0] })
        })
        .collect();
    let mut won = 0;
    for f in fires {
        let r = f.await.unwrap();
        if r.won {
            won += 1;
            assert_eq!(r.enqueued, 1);
        }
    }
    assert_eq!(won, 1);
    assert_eq!(queue.pending().await.unwrap(), 1);
    // A fire of the same tick after it was published (record gone) and
    // with the old expected next loses: it cannot fire it twice.
    let late = store
        .fire(&[fire_of(&item, tick, tick + 60_000)])
        .await
        .unwrap();
    assert!(!late[0].won);

    // A fire planned on a definition that was replaced meanwhile loses.
    let due = store.due(100_000, 100).await.unwrap();
    let item = due.items[0].clone();
    let mut replaced = spec.clone();
    replaced.task.priority = 3;
    store
        .put(&replaced, "s", Some(item.next), false)
        .await
        .unwrap();
    let stale = store
        .fire(&[fire_of(&item, item.next, item.next + 60_000)])
        .await
        .unwrap();
    assert!(!stale[0].won, "a stale definition must not fire");

    // A tick at or before the last fired one never fires, even after a replace.
    store.put(&replaced, "s", Some(tick), false).await.unwrap();
    let due = store.due(0, 100).await.unwrap();
    let r = store
        .fire(&[fire_of(&due.items[0], tick, tick + 60_000)])
        .await
        .unwrap();
    assert!(r[0].won);
    assert_eq!(r[0].enqueued, 0, "tick {tick} fired twice");

    // Pause withdraws an occurrence handed over ahead of its tick.
    let ahead = now + 30_000;
    store.put(&replaced, "s", Some(ahead), false).await.unwrap();
    let due = store.due(60_000, 100).await.unwrap();
    let r = store
        .fire(&[fire_of(&due.items[0], ahead, ahead + 60_000)])
        .await
        .unwrap();
    assert_eq!(r[0].enqueued, 1);
    assert_eq!(queue.pending().await.unwrap(), 2);
    let mut paused = replaced.clone();
    paused.enabled = false;
    store.put(&paused, "s", None, true).await.unwrap();
    // No pump runs here, so both occurrences still wait: both are withdrawn.
    assert_eq!(
        queue.pending().await.unwrap(),
        0,
        "waiting occurrences are withdrawn"
    );
    let view = store.view("s").await.unwrap().expect("view");
    assert_eq!(view.next_fire_at, None);
    assert_eq!(view.last_fire_at, Some(ahead));
    assert!(store.delete("s").await.unwrap());
    assert!(store.view("s").await.unwrap().is_none());
}

/// A ticker on its own store (no pump, no worker: the test counts what it
/// hands to the delay queue), lookahead 100 ms, grace 1 s.
fn ticker_for(env: &TestEnv) -> (Ticker, RedisDelayQueue) {
    let pool = deadpool_redis::Config::from_url(REDIS_URL)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .expect("pool");
    let queue = RedisDelayQueue::new(pool.clone(), &env.ns, 8);
    let ticker = Ticker {
        store: ScheduleStore::new(pool, &env.ns, &queue),
        events: EventSink::disabled(),
        status: kairos_shared::status::StatusWriter::disabled(),
        pump_wake: Arc::new(Notify::new()),
        changed: Arc::new(Notify::new()),
        lookahead_ms: 100,
        grace_ms: 1000,
        batch: 100,
        idle: Duration::from_secs(1),
        parsed: Default::default(),
    };
    (ticker, queue)
}

/// Stores a `skip` schedule every second whose stored next tick is 3.5 s
/// old (ticks at now - 3.5, -2.5, -1.5 and -0.5 s, the next at +0.5 s),
/// runs one ticker round and returns how many occurrences it handed over.
async fn one_round_behind(ticker: &Ticker, queue: &RedisDelayQueue) -> u64 {
    let now = ticker.store.now().await.expect("now");
    let first = now - 3500;
    let spec: ScheduleSpec = serde_json::from_value(serde_json::json!({
        "every_ms": 1000, "start_at": first, "misfire": "skip", "task": {"name": "t"}
    }))
    .expect("spec");
    ticker
        .store
        .put(&spec, "behind", Some(first), false)
        .await
        .expect("put");
    ticker.round().await.expect("round");
    queue.pending().await.expect("pending")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_that_fell_due_while_no_scheduler_ran_follow_the_misfire_policy() {
    let env = TestEnv::new("schout").await;
    let (ticker, queue) = ticker_for(&env);
    // No scheduler beat before this round: the four late ticks fell due
    // in an outage, and `skip` runs none of them.
    assert_eq!(one_round_behind(&ticker, &queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_scheduler_that_fell_behind_fires_every_tick() {
    let env = TestEnv::new("schbehind").await;
    let (ticker, queue) = ticker_for(&env);
    // Some scheduler beats for 4 s (the scenario: a scheduler that runs
    // but has not reached the schedule yet, as on a loaded machine).
    for _ in 0..20 {
        ticker.store.beat(ticker.grace_ms).await.expect("beat");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The four late ticks fell due while it ran: they all fire, late,
    // whatever the misfire policy.
    assert_eq!(one_round_behind(&ticker, &queue).await, 4);
}
