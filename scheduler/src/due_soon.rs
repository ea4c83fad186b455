//! The due-soon gauges: work that is still held in Redis but will land in
//! RabbitMQ within the next `KAIROS_DUE_SOON_S` seconds. A queue-length
//! autoscaler (KEDA's RabbitMQ trigger) sees delayed tasks and schedule
//! bursts only once they are published; these gauges let it add workers
//! before (deploy/k8s/base/keda-scaledobject-due-soon.yaml).
//!
//! * `kairos_tasks_due_soon{queue}`: tasks of `queue` held in the delay
//!   queue (scheduled or retrying) whose due time is at most
//!   `now + KAIROS_DUE_SOON_S`, read from the task status's wait sets
//!   (`NS:st{S}:wait:QUEUE`, the same sets as `due` in `GET /v1/queues`).
//!   Tasks already overdue but not yet published count too: they land as
//!   soon as a pump runs.
//! * `kairos_schedules_due_soon`: schedules whose next tick falls within
//!   the window (`ZCOUNT` of each shard's `NS:dq{S}:snext`). It counts
//!   schedules, not ticks: an every-second schedule counts once.
//!
//! What they miss: the wait sets are written by the task status, so with
//! `KAIROS_STATUS=false` there is nothing to count per queue and
//! `kairos_tasks_due_soon` is not exported at all (the schedule gauge still
//! is). Tasks in flight to the scheduler (in `NS.delay` or `NS.retry`, not
//! yet taken in) are not held yet and are not counted. Every scheduler
//! exports the same values: aggregate with `max`, not `sum`.

use crate::delay::store::RedisDelayQueue;
use crate::redis_io::keys::Keys;
use crate::Config;
use kairos_shared::amqp::sleep_or_cancel;
use kairos_shared::redis::RedisConn;
use kairos_shared::status::StatusKeys;
use kairos_shared::supervise::Supervisor;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the gauges are refreshed: well under a usual Prometheus
/// scrape interval (15 s), and a few small pipelines each time.
const EVERY: Duration = Duration::from_secs(5);

/// The most queues counted (the first by name), as `GET /v1/queues`
/// lists: bounds one refresh's pipeline.
const MAX_QUEUES: usize = crate::api::queues::MAX_QUEUES;

/// Starts the supervised `due_soon` loop.
pub(crate) fn start(work: &Supervisor, config: &Config, queue: &RedisDelayQueue) {
    let gauges = DueSoon {
        // Its own connection: its pipelines never queue the pump's calls.
        redis: queue.redis().separate(),
        namespace: config.common.namespace.clone(),
        shards: queue.shard_count(),
        window_ms: i64::try_from(config.due_soon_s.saturating_mul(1000)).unwrap_or(i64::MAX),
        per_queue: config.status.status,
    };
    work.start_loop("due_soon", move |cancel| gauges.clone().run(cancel));
}

/// What one refresh reads.
#[derive(Clone)]
struct DueSoon {
    redis: RedisConn,
    namespace: String,
    shards: usize,
    window_ms: i64,
    /// The task status is on (`KAIROS_STATUS`): the wait sets exist.
    per_queue: bool,
}

/// One refresh's counts.
#[derive(Debug, PartialEq)]
struct Counts {
    /// (queue, tasks due soon), sorted by queue.
    queues: Vec<(String, u64)>,
    schedules: u64,
}

impl DueSoon {
    /// Refreshes the gauges every [`EVERY`] until `cancel`. A failed read
    /// keeps the last values (Redis may be briefly away; `/readyz` says
    /// so) and is tried again on the next round.
    async fn run(self, cancel: CancellationToken) -> Result<(), String> {
        // Queues reported before: one no longer listed is set to 0 rather
        // than left at its last value.
        let mut reported = BTreeSet::new();
        loop {
            match self.count().await {
                Ok(counts) => export(&counts, &mut reported),
                Err(cause) => tracing::debug!(%cause, "due-soon gauges not refreshed"),
            }
            if !sleep_or_cancel(EVERY, &cancel).await {
                return Ok(());
            }
        }
    }

    /// Reads the counts: Redis's clock and the queues, then one pipeline
    /// of `ZCOUNT -inf until` per schedule shard and per queue and shard.
    async fn count(&self) -> Result<Counts, String> {
        let status = StatusKeys::new(&self.namespace);
        let mut first = redis::pipe();
        first.cmd("TIME");
        first.cmd("SMEMBERS").arg(status.queues());
        let (time, known): ((i64, i64), BTreeSet<String>) = self.query(&first).await?;
        let until = (time.0 * 1000 + time.1 / 1000).saturating_add(self.window_ms);
        let queues: Vec<String> = if self.per_queue {
            known.into_iter().take(MAX_QUEUES).collect()
        } else {
            Vec::new()
        };

        let keys = Keys::new(&self.namespace);
        let mut pipe = redis::pipe();
        for s in 0..self.shards {
            zcount(&mut pipe, &keys.schedule_shard(s).next, until);
        }
        for queue in &queues {
            for s in 0..self.shards {
                zcount(&mut pipe, &status.wait(s, queue), until);
            }
        }
        let counts: Vec<u64> = self.query(&pipe).await?;
        Ok(sum_counts(&counts, self.shards, queues))
    }

    async fn query<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, String> {
        let mut con = self.redis.get().await.map_err(|e| e.to_string())?;
        self.redis
            .watch(con.query_pipe(pipe).await)
            .map_err(|e| e.to_string())
    }
}

/// `ZCOUNT key -inf until`.
fn zcount(pipe: &mut redis::Pipeline, key: &str, until: i64) {
    pipe.cmd("ZCOUNT").arg(key).arg("-inf").arg(until);
}

/// Sums the pipeline's replies: `shards` schedule shards first, then
/// `shards` per queue, in the order of `queues`.
fn sum_counts(counts: &[u64], shards: usize, queues: Vec<String>) -> Counts {
    let schedules = counts.iter().take(shards).sum();
    let per_queue = counts[shards.min(counts.len())..].chunks(shards.max(1));
    let queues = queues
        .into_iter()
        .zip(
            per_queue
                .map(|c| c.iter().sum())
                .chain(std::iter::repeat(0)),
        )
        .collect();
    Counts { queues, schedules }
}

/// Sets the gauges; queues in `reported` but no longer counted go to 0.
fn export(counts: &Counts, reported: &mut BTreeSet<String>) {
    metrics::gauge!("kairos_schedules_due_soon").set(counts.schedules as f64);
    let now: BTreeSet<String> = counts.queues.iter().map(|(q, _)| q.clone()).collect();
    for gone in reported.difference(&now) {
        metrics::gauge!("kairos_tasks_due_soon", "queue" => gone.clone()).set(0.0);
    }
    for (queue, n) in &counts.queues {
        metrics::gauge!("kairos_tasks_due_soon", "queue" => queue.clone()).set(*n as f64);
    }
    reported.extend(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_sum_per_schedule_shards_then_per_queue() {
        // 2 shards: schedules 1 + 2, queue a 3 + 0, queue b 0 + 5.
        let c = sum_counts(&[1, 2, 3, 0, 0, 5], 2, vec!["a".into(), "b".into()]);
        assert_eq!(
            c,
            Counts {
                queues: vec![("a".into(), 3), ("b".into(), 5)],
                schedules: 3,
            }
        );
    }

    #[test]
    fn no_queues_counts_only_schedules() {
        let c = sum_counts(&[4], 1, Vec::new());
        assert_eq!(c.schedules, 4);
        assert!(c.queues.is_empty());
    }
}
