//! The status writer: records updates without ever waiting on Redis.
//!
//! [`StatusWriter::record`] hands the update to a bounded channel; a
//! supervised background loop takes up to [`BATCH`] at a time, folds the
//! updates of one id into one ([`StatusUpdate::absorb`]), and sends the
//! batch as one pipeline: per shard an `EVALSHA` of the merge script for
//! up to 64 tasks at a time, the rate counters, and the queues not
//! registered yet. When Redis is down or
//! slow the channel fills and updates are dropped (counted in
//! `kairos_status_dropped_total`, logged at most once a second): the
//! status is a view of the pipeline, never a brake on it.

use super::keys::{ShardCount, StatusKeys};
use super::script::{merge_command, run, MERGE_CHUNK};
use super::update::{RateEvent, StatusUpdate};
use super::{StatusError, StatusSettings};
use crate::amqp::now_ms;
use crate::redis::RedisConn;
use crate::supervise::{Supervised, Supervisor};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Updates held for the loop before new ones are dropped.
const QUEUE_DEPTH: usize = 65_536;
/// Updates one flush takes at most.
pub const BATCH: usize = 1_024;
/// How long the rate counters of a queue are kept (s): a minute's rates
/// need the last 6 buckets of 10 s.
const RATE_TTL_S: u64 = 180;
/// Seconds per rate bucket.
const RATE_BUCKET_S: i64 = 10;

/// Records task status updates (see the module doc). Cheap to clone; a
/// disabled writer drops everything at no cost.
#[derive(Clone, Default)]
pub struct StatusWriter {
    tx: Option<mpsc::Sender<StatusUpdate>>,
    dropped: Arc<Dropped>,
    /// Holds the loop, for [`close`](Self::close).
    flusher: TaskTracker,
}

/// Counts dropped updates, logging at most once a second.
#[derive(Default)]
struct Dropped {
    count: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

impl Dropped {
    fn add(&self, n: u64, why: &str) {
        let total = self.count.fetch_add(n, Ordering::Relaxed) + n;
        metrics::counter!("kairos_status_dropped_total").increment(n);
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *last = Some(Instant::now());
            tracing::warn!(dropped = total, cause = why, "task status updates dropped");
        }
    }
}

impl StatusWriter {
    /// A writer that drops everything (`KAIROS_STATUS=false`).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the loop when `settings.status`, supervised as `status`
    /// under `work`'s health; it writes on `redis` (a connection of its
    /// own is best: its pipelines then queue behind nobody's calls) in
    /// `namespace`. After shutdown it still drains what was recorded until
    /// every clone of the writer is gone.
    pub fn start(
        settings: &StatusSettings,
        redis: RedisConn,
        namespace: &str,
        shards: ShardCount,
        work: &Supervisor,
    ) -> Self {
        if !settings.status {
            return Self::disabled();
        }
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let dropped = Arc::new(Dropped::default());
        let flusher = Flusher {
            redis,
            keys: StatusKeys::new(namespace),
            shards,
            ttl_s: settings.status_ttl_s,
            rx,
            queues: HashSet::new(),
            dropped: dropped.clone(),
            done: false,
            shed_until: None,
            memory: None,
        };
        let (tracker, work) = (TaskTracker::new(), work.clone());
        tracker.spawn(async move { work.run(flusher).await });
        tracker.close();
        StatusWriter {
            tx: Some(tx),
            dropped,
            flusher: tracker,
        }
    }

    /// Whether updates are written at all.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Hands `update` to the loop, or drops it (counted) when the loop is
    /// behind. Never waits.
    pub fn record(&self, update: StatusUpdate) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(update).is_err() {
            self.dropped
                .add(1, "the status writer is behind (is Redis slow or down?)");
        }
    }

    /// Builds and records an update only when enabled: `make` costs
    /// nothing when status is off.
    pub fn record_with(&self, make: impl FnOnce() -> StatusUpdate) {
        if self.enabled() {
            self.record(make());
        }
    }

    /// Updates dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.count.load(Ordering::Relaxed)
    }

    /// Waits, at most `within`, until what was recorded so far is written.
    /// Call it once every other clone is gone: the loop drains until then.
    pub async fn close(self, within: Duration) {
        if !self.enabled() {
            return;
        }
        let flusher = self.flusher.clone();
        drop(self);
        if tokio::time::timeout(within, flusher.wait()).await.is_err() {
            tracing::warn!("task status updates not all written before shutdown");
        }
    }
}

/// The loop: takes updates off the channel and merges them into Redis.
struct Flusher {
    redis: RedisConn,
    keys: StatusKeys,
    shards: ShardCount,
    ttl_s: u64,
    rx: mpsc::Receiver<StatusUpdate>,
    /// Queues added to `NS:queues` by this process.
    queues: HashSet<String>,
    dropped: Arc<Dropped>,
    /// Every writer is gone and everything was handled.
    done: bool,
    /// Until when updates are shed after Redis answered OOM.
    shed_until: Option<Instant>,
    /// When Redis's memory was last looked at, and whether it was near
    /// `maxmemory` then.
    memory: Option<(Instant, bool)>,
}

/// Above this share of `maxmemory`, statuses are shed: the rest is kept
/// for tasks.
const MEMORY_SHARE_FOR_STATUS: f64 = 0.9;

/// How often the writer reads Redis's memory (`INFO memory`).
const MEMORY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Whether `info` (an `INFO memory` reply) shows Redis above
/// [`MEMORY_SHARE_FOR_STATUS`] of a `maxmemory` limit.
fn near_maxmemory(info: &str) -> bool {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (field("used_memory"), field("maxmemory")) {
        (Some(used), Some(max)) if max > 0 => used as f64 > max as f64 * MEMORY_SHARE_FOR_STATUS,
        _ => false,
    }
}

/// How long the writer sheds updates after Redis refused one for want of
/// memory (`maxmemory`, `noeviction`). Statuses are a view, tasks are not:
/// a status written into the room that a published task just freed would
/// keep the intake's next task out (the intake is refused at maxmemory
/// too), so while Redis is full the room goes to tasks. Shed updates are
/// counted in `kairos_status_dropped_total`.
const SHED_AFTER_OOM: Duration = Duration::from_secs(10);

/// Redis refused a write because it is at `maxmemory`.
fn is_oom(e: &StatusError) -> bool {
    matches!(e, StatusError::Redis(e) if e.code() == Some("OOM"))
}

impl Supervised for Flusher {
    type Conn = ();
    type Error = String;

    fn name(&self) -> &'static str {
        "status"
    }

    async fn connect(&mut self, _: &CancellationToken) -> Option<()> {
        Some(())
    }

    /// Flushes until every writer is gone. It does not stop on shutdown:
    /// what was recorded before is still written.
    async fn session(&mut self, _: &mut (), _: &CancellationToken) -> Result<(), String> {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            if self.rx.recv_many(&mut batch, BATCH).await == 0 {
                self.done = true;
                return Ok(());
            }
            let n = batch.len() as u64;
            if self.shed_until.is_some_and(|t| Instant::now() < t) || self.near_full().await {
                batch.clear();
                self.dropped.add(
                    n,
                    "Redis is near maxmemory: statuses shed, tasks keep the room",
                );
                continue;
            }
            self.shed_until = None;
            if let Err(err) = self.flush(std::mem::take(&mut batch)).await {
                if is_oom(&err) {
                    self.shed_until = Some(Instant::now() + SHED_AFTER_OOM);
                }
                self.dropped.add(n, &err.to_string());
            }
        }
    }

    async fn close(&mut self, _: (), _: bool) {}

    fn finished(&self) -> bool {
        self.done
    }
}

impl Flusher {
    /// Whether Redis is near `maxmemory` (looked at once a second; an
    /// unanswered look counts as not full, and the write itself then
    /// finds out).
    async fn near_full(&mut self) -> bool {
        if let Some((at, full)) = self.memory {
            if at.elapsed() < MEMORY_CHECK_EVERY {
                return full;
            }
        }
        let mut pipe = redis::pipe();
        pipe.cmd("INFO").arg("memory");
        let full = match run::<(String,)>(&self.redis, &pipe).await {
            Ok((info,)) => near_maxmemory(&info),
            Err(_) => false,
        };
        self.memory = Some((Instant::now(), full));
        full
    }

    /// Writes one batch: one pipeline round trip.
    async fn flush(&mut self, batch: Vec<StatusUpdate>) -> Result<(), StatusError> {
        let (updates, rates) = coalesce(batch);
        let shards = self.shards.get(&self.redis, &self.keys).await?;
        let mut by_shard: Vec<Vec<&StatusUpdate>> = vec![Vec::new(); shards];
        for u in &updates {
            by_shard[ShardCount::shard(&u.id, shards)].push(u);
        }
        let mut pipe = redis::pipe();
        for (shard, group) in by_shard.iter().enumerate() {
            for chunk in group.chunks(MERGE_CHUNK) {
                pipe.add_command(merge_command(&self.keys, shard, self.ttl_s, chunk))
                    .ignore();
            }
        }
        let bucket = now_ms().div_euclid(1000) / RATE_BUCKET_S;
        let mut new_queues = Vec::new();
        for ((queue, event), n) in &rates {
            let key = self.keys.rate(queue);
            pipe.cmd("HINCRBY")
                .arg(&key)
                .arg(format!("{}:{bucket}", event.as_str()))
                .arg(*n)
                .ignore();
            pipe.cmd("EXPIRE").arg(&key).arg(RATE_TTL_S).ignore();
            if !self.queues.contains(queue) && !new_queues.contains(queue) {
                new_queues.push(queue.clone());
            }
        }
        if !new_queues.is_empty() {
            pipe.cmd("SADD")
                .arg(self.keys.queues())
                .arg(&new_queues)
                .ignore();
        }
        run::<()>(&self.redis, &pipe).await?;
        self.queues.extend(new_queues);
        Ok(())
    }
}

/// Folds the updates of one id into one, in the order recorded, and counts
/// the rate events per queue.
fn coalesce(batch: Vec<StatusUpdate>) -> (Vec<StatusUpdate>, HashMap<(String, RateEvent), u64>) {
    let mut rates: HashMap<(String, RateEvent), u64> = HashMap::new();
    let mut index: HashMap<String, usize> = HashMap::with_capacity(batch.len());
    let mut out: Vec<StatusUpdate> = Vec::with_capacity(batch.len());
    for u in batch {
        if let (Some(queue), Some(event)) = (&u.queue, u.event) {
            *rates.entry((queue.clone(), event)).or_default() += 1;
        }
        match index.get(&u.id) {
            Some(&i) => out[i].absorb(u),
            None => {
                index.insert(u.id.clone(), out.len());
                out.push(u);
            }
        }
    }
    (out, rates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::TaskState;

    fn update(id: &str, state: TaskState, attempt: u32) -> StatusUpdate {
        StatusUpdate {
            id: id.into(),
            state: Some(state),
            attempt,
            fresh: false,
            again: false,
            queue: Some("q".into()),
            event: Some(RateEvent::Started),
            fields: Vec::new(),
        }
    }

    #[test]
    fn statuses_give_way_near_maxmemory() {
        let info = |used: u64, max: u64| {
            format!("# Memory\r\nused_memory:{used}\r\nused_memory_human:1M\r\nmaxmemory:{max}\r\n")
        };
        assert!(!near_maxmemory(&info(950, 0)), "no limit");
        assert!(!near_maxmemory(&info(899, 1000)));
        assert!(near_maxmemory(&info(901, 1000)));
        assert!(!near_maxmemory("garbage"));
    }

    #[test]
    fn one_update_per_id_and_every_event_counted() {
        let (out, rates) = coalesce(vec![
            update("a", TaskState::Running, 1),
            update("b", TaskState::Running, 1),
            update("a", TaskState::Succeeded, 1),
        ]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].state, Some(TaskState::Succeeded));
        assert_eq!(rates[&("q".to_string(), RateEvent::Started)], 3);
    }

    #[tokio::test]
    async fn a_disabled_writer_takes_everything_and_writes_nothing() {
        let w = StatusWriter::disabled();
        assert!(!w.enabled());
        w.record(update("a", TaskState::Running, 1));
        w.record_with(|| unreachable!("not built when off"));
        assert_eq!(w.dropped(), 0);
        // Nothing to wait for.
        tokio::time::timeout(Duration::from_secs(1), w.close(Duration::from_secs(60)))
            .await
            .expect("a disabled writer closes at once");
    }
}
