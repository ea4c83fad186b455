//! The firing loop. Each round reads the schedules whose next tick falls
//! within the lookahead, plans their ticks in Rust (croner), and hands the
//! occurrences to the delay queue through one compare-and-set script per
//! shard (`scripts/sched_fire.lua`). The pump then publishes them at their
//! tick with the delay queue's precision.
//!
//! Every scheduler runs this loop for every schedule; the compare-and-set
//! on the stored next tick lets exactly one of them fire each tick, and the
//! derived task id (`schedule@tick`) plus the stored last-fired tick make a
//! repeat harmless.

use crate::delay_queue::QueueError;
use crate::schedule::{occurrence, plan, Overlap, Schedule, ScheduleSpec};
use crate::schedule_store::{DueItem, Fire, Occurrence, ScheduleStore};
use kairos_shared::amqp::{sleep_or_cancel, Backoff};
use kairos_shared::contract::Task;
use kairos_shared::events::{EventKind, EventSink};
use kairos_shared::record;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Schedules planned per shard in one round. A round's two pipelines (read,
/// then compare-and-set) carry every definition twice; a scheduler that
/// fell behind at 500 per shard (the task batch) sent pipelines that an
/// overloaded Redis did not answer within the client's 500 ms response
/// timeout, and the whole round was retried. Smaller rounds, run back to
/// back while more is due, keep every pipeline short.
pub const MAX_SCHEDULES_PER_SHARD: usize = 100;

#[derive(Clone)]
pub struct Ticker {
    pub store: ScheduleStore,
    pub events: EventSink,
    /// The local pump: woken when an occurrence is handed over.
    pub pump_wake: Arc<Notify>,
    /// Notified when a schedule changed through this instance.
    pub changed: Arc<Notify>,
    pub lookahead_ms: i64,
    pub grace_ms: i64,
    pub batch: usize,
    pub idle: Duration,
    /// Definitions parsed in earlier rounds.
    pub parsed: Arc<Mutex<ParsedCache>>,
}

/// Parsed definitions by schedule id, with the bytes they were parsed from.
/// A schedule that fires every second is read every second; parsing and
/// validating its JSON each time cost more than planning its tick.
#[derive(Default)]
pub struct ParsedCache {
    by_id: HashMap<String, (Vec<u8>, Arc<Schedule>)>,
}

/// Entries kept before the cache starts over (deleted schedules leave
/// theirs behind until then).
const MAX_PARSED: usize = 100_000;

impl ParsedCache {
    fn get(&mut self, item: &DueItem) -> Result<Arc<Schedule>, String> {
        if let Some((def, schedule)) = self.by_id.get(&item.id) {
            if *def == item.def {
                return Ok(schedule.clone());
            }
        }
        let schedule = Arc::new(parse(item)?);
        if self.by_id.len() >= MAX_PARSED {
            self.by_id.clear();
        }
        self.by_id
            .insert(item.id.clone(), (item.def.clone(), schedule.clone()));
        Ok(schedule)
    }
}

impl Ticker {
    pub async fn run(&self, cancel: CancellationToken) {
        let mut backoff = Backoff::new();
        while !cancel.is_cancelled() {
            let started = Instant::now();
            let wait = match self.round().await {
                Ok(w) => {
                    backoff.reset();
                    w
                }
                Err(err) => {
                    tracing::warn!(cause = %err, "schedule round failed; retrying");
                    if !sleep_or_cancel(backoff.next_delay(), &cancel).await {
                        return;
                    }
                    continue;
                }
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep_until(started + wait) => {}
            }
        }
    }

    /// One round; returns how long to sleep before the next.
    async fn round(&self) -> Result<Duration, QueueError> {
        let due = self.store.due(self.lookahead_ms, self.batch).await?;
        let mut fires = Vec::with_capacity(due.items.len());
        let mut tasks: Vec<Vec<Task>> = Vec::with_capacity(due.items.len());
        for item in due.items {
            let (fire, t) = self.prepare(item, due.now);
            fires.push(fire);
            tasks.push(t);
        }
        if !fires.is_empty() {
            let results = self.store.fire(&fires).await?;
            let mut woke = false;
            for ((fire, fired), tasks) in fires.iter().zip(&results).zip(&tasks) {
                if !fired.won {
                    continue;
                }
                if fired.skipped > 0 {
                    tracing::info!(schedule = %fire.id, skipped = fired.skipped, "tick skipped: the previous occurrence still runs");
                }
                if fired.enqueued > 0 {
                    woke = true;
                    for t in tasks {
                        self.events.task(EventKind::Scheduled, t, t.run_at, None);
                    }
                }
            }
            if woke {
                self.pump_wake.notify_one();
            }
        }
        if due.more {
            return Ok(Duration::ZERO);
        }
        // The next ticks just stored count too: `next_tick` was read before
        // them, and a fast interval's next tick may come before it.
        let earliest = fires
            .iter()
            .filter_map(|f| f.new_next)
            .chain(due.next_tick)
            .min();
        let wait = earliest
            .map(|t| t - self.lookahead_ms - due.now)
            .unwrap_or(i64::MAX)
            .clamp(self.min_gap_ms(), self.idle.as_millis() as i64);
        Ok(Duration::from_millis(wait as u64))
    }

    /// The shortest pause between rounds. With many schedules some tick
    /// is always about to enter the lookahead, and a round for each would
    /// run thousands of tiny rounds a second (each costs a script per
    /// shard). Rounds at most a fifth of the lookahead apart still hand
    /// every occurrence over at least four fifths of it ahead of its tick;
    /// a schedule changed through this instance wakes the loop at once.
    fn min_gap_ms(&self) -> i64 {
        (self.lookahead_ms / 5).min(self.idle.as_millis() as i64)
    }

    /// Plans one due schedule into its compare-and-set.
    fn prepare(&self, item: DueItem, now: i64) -> (Fire, Vec<Task>) {
        let mut fire = Fire {
            shard: item.shard,
            id: item.id.clone(),
            expected_next: item.next,
            def: item.def.clone(),
            new_next: None,
            overlap_skip: false,
            max_run_ms: 0,
            occurrences: Vec::new(),
        };
        if item.def.is_empty() {
            return (fire, Vec::new());
        }
        // Only this loop uses the cache; a poisoned lock still holds
        // nothing but parsed definitions.
        let parsed = self
            .parsed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&item);
        let schedule = match parsed {
            Ok(s) => s,
            Err(reason) => {
                // Validation keeps these out; a definition written by hand
                // or by a newer version may still be unreadable: stop it
                // rather than retry it every round.
                tracing::error!(schedule = %item.id, %reason, "unreadable schedule definition; it will not fire until replaced");
                return (fire, Vec::new());
            }
        };
        if !schedule.spec.enabled {
            return (fire, Vec::new());
        }
        let p = plan::plan(
            &schedule.trigger,
            schedule.spec.misfire,
            item.next,
            now,
            self.lookahead_ms,
            self.grace_ms,
        );
        if p.missed > 0 {
            tracing::warn!(schedule = %item.id, missed = p.missed, policy = ?schedule.spec.misfire, "ticks missed while no scheduler ran");
        }
        fire.new_next = p.next;
        fire.overlap_skip = schedule.spec.overlap == Overlap::Skip;
        fire.max_run_ms = schedule.max_run_ms();
        let mut tasks = Vec::new();
        for tick in p.fire {
            if item.last.is_some_and(|l| tick <= l) {
                continue;
            }
            let encoded =
                occurrence::task(&schedule, tick).and_then(|t| record::encode(&t).map(|r| (t, r)));
            match encoded {
                Ok((task, rec)) => {
                    fire.occurrences.push(Occurrence {
                        member: task.id.clone(),
                        tick,
                        record: rec,
                    });
                    tasks.push(task);
                }
                Err(err) => {
                    tracing::error!(schedule = %item.id, tick, cause = %err, "cannot build the occurrence; tick dropped");
                }
            }
        }
        (fire, tasks)
    }
}

fn parse(item: &DueItem) -> Result<Schedule, String> {
    let spec = ScheduleSpec::from_json(&item.def).map_err(|e| e.to_string())?;
    spec.validate(&item.id).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(def: &str) -> DueItem {
        DueItem {
            shard: 0,
            id: "s".into(),
            next: 0,
            def: def.as_bytes().to_vec(),
            last: None,
        }
    }

    #[test]
    fn a_definition_is_parsed_once_until_it_changes() {
        let mut cache = ParsedCache::default();
        let every_second = item(r#"{"every_ms":1000,"task":{"name":"t"}}"#);
        let a = cache.get(&every_second).unwrap();
        let b = cache.get(&every_second).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the same bytes reuse the parse");
        let replaced = item(r#"{"every_ms":2000,"task":{"name":"t"}}"#);
        let c = cache.get(&replaced).unwrap();
        assert!(!Arc::ptr_eq(&a, &c), "new bytes are parsed again");
        assert!(cache.get(&item("{not json")).is_err());
    }
}
