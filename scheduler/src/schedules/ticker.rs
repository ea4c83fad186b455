//! The firing loop. Each round reads the schedules whose next tick falls
//! within the lookahead, plans their ticks in Rust (croner), and hands the
//! occurrences to the delay queue through one compare-and-set script per
//! shard (`redis_io/scripts/sched_fire.lua`). The pump then publishes them at their
//! tick with the delay queue's precision.
//!
//! Every scheduler runs this loop for the schedules of the shards it serves
//! (its share, see [`crate::shards`]); while shards change hands, two may
//! plan the same schedule, and the compare-and-set on the stored next tick
//! (and the definition's SHA-1 digest) lets exactly one of them fire each
//! tick, and the derived task id (`schedule@tick`)
//! plus the stored last-fired tick make a repeat harmless. A definition
//! travels to the scheduler only when its digest is new to it.

use crate::delay::store::QueueError;
use crate::schedules::model::{occurrence, plan, Overlap, Schedule, ScheduleSpec};
use crate::schedules::store::{DueItem, Fire, Occurrence, ScheduleStore};
use kairos_shared::amqp::{sleep_or_cancel, Backoff};
use kairos_shared::contract::ProtocolError;
use kairos_shared::contract::Task;
use kairos_shared::events::{EventKind, EventSink};
use kairos_shared::status::{StatusUpdate, StatusWriter};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Schedules planned per shard in one round. A round's two pipelines (read,
/// then compare-and-set) carry a definition each per schedule: they must
/// stay short enough for an overloaded Redis to answer within the reply
/// timeout, or the whole round is retried. Rounds run back to back while
/// more is due.
pub const MAX_SCHEDULES_PER_SHARD: usize = 100;

/// Schedules planned between two yields to the runtime: planning a whole
/// round (up to [`MAX_SCHEDULES_PER_SHARD`] per shard) in one go would hold
/// a runtime thread for milliseconds, and the pump's publishes and a
/// worker's deliveries on the same runtime would wait behind it
/// (docs/BENCHMARKS.md, "Ticker").
const PLAN_SLICE: usize = 32;

/// The firing loop of one scheduler, with what it needs; cheap to clone
/// (a restart of the loop starts from a clone).
#[derive(Clone)]
pub struct Ticker {
    /// The schedules in Redis.
    pub store: ScheduleStore,
    /// Where `scheduled` and schedule events go.
    pub events: EventSink,
    /// Where occurrences' `scheduled` statuses go.
    pub status: StatusWriter,
    /// The local pump: woken when an occurrence is handed over.
    pub pump_wake: Arc<Notify>,
    /// Notified when a schedule changed through this instance.
    pub changed: Arc<Notify>,
    /// How far ahead of a tick its occurrence is handed to the delay queue.
    pub lookahead_ms: i64,
    /// A tick later than this is late (the misfire policy decides).
    pub grace_ms: i64,
    /// Schedules read per shard in one round.
    pub batch: usize,
    /// The longest sleep between rounds when nothing is due.
    pub idle: Duration,
    /// Definitions parsed in earlier rounds.
    pub parsed: Arc<Mutex<ParsedCache>>,
}

/// Parsed definitions by schedule id, with the digest of the bytes they were
/// parsed from, and what this scheduler stored when it last fired each. A
/// schedule that fires every second is read every second: its JSON is
/// parsed and validated once per definition, not per tick, and what this
/// scheduler fired (digest, last tick) is remembered rather than read back
/// from Redis.
#[derive(Default)]
pub struct ParsedCache {
    by_id: HashMap<String, Cached>,
}

struct Cached {
    digest: String,
    schedule: Arc<Schedule>,
    /// The record every occurrence of this definition stores, built at its
    /// first fire (see [`occurrence::record`]).
    record: Option<Vec<u8>>,
    /// The next tick this scheduler stored when it fired, and the last
    /// tick fired then; `None` until it fires, and again once a
    /// compare-and-set of it failed (another writer changed it).
    fired: Option<(i64, Option<i64>)>,
}

/// Entries kept before the cache starts over (deleted schedules leave
/// theirs behind until then).
const MAX_PARSED: usize = 100_000;

/// What became of a due schedule's definition.
enum Parsed {
    Ready(Arc<Schedule>),
    Unreadable(String),
    /// Neither cached nor read. The cache is trimmed only between rounds,
    /// so a round that found a digest known still has it; should that ever
    /// fail, the schedule waits for the next round (its tick is still a
    /// lookahead away) rather than lose its next tick to an empty fire.
    Unknown,
}

impl ParsedCache {
    fn knows(&self, id: &str, digest: &str) -> bool {
        self.by_id.get(id).is_some_and(|c| c.digest == digest)
    }

    /// The digest and last tick of a schedule whose stored next tick is
    /// `next`, if this scheduler stored it.
    fn fired(&self, id: &str, next: i64) -> Option<(String, Option<i64>)> {
        let c = self.by_id.get(id)?;
        match c.fired {
            Some((n, last)) if n == next => Some((c.digest.clone(), last)),
            _ => None,
        }
    }

    /// After a compare-and-set: what this scheduler stored, or, when it
    /// lost, that it knows nothing of the schedule's state any more.
    fn note_fire(&mut self, fire: &Fire, won: bool) {
        let Some(c) = self.by_id.get_mut(&fire.id) else {
            return;
        };
        c.fired = match (won, fire.new_next) {
            (true, Some(next)) if c.digest == fire.digest => {
                let fired_last = fire.occurrences.iter().map(|o| o.tick).max();
                Some((next, fire.last.max(fired_last)))
            }
            _ => None,
        };
    }

    /// The record of schedule `id`'s occurrences under definition
    /// `digest`: built by `make` the first time, then copied. A failure is
    /// not kept (each tick reports it).
    fn record(
        &mut self,
        id: &str,
        digest: &str,
        make: impl FnOnce() -> Result<Vec<u8>, ProtocolError>,
    ) -> Result<Vec<u8>, ProtocolError> {
        match self.by_id.get_mut(id) {
            Some(c) if c.digest == digest => {
                if let Some(r) = &c.record {
                    return Ok(r.clone());
                }
                let r = make()?;
                c.record = Some(r.clone());
                Ok(r)
            }
            _ => make(),
        }
    }

    /// Called between rounds, so a round never loses what it relies on.
    fn trim(&mut self) {
        if self.by_id.len() >= MAX_PARSED {
            self.by_id.clear();
        }
    }

    fn get(&mut self, item: &DueItem) -> Parsed {
        let Some(def) = &item.def else {
            return match self.by_id.get(&item.id) {
                Some(c) if c.digest == item.digest => Parsed::Ready(c.schedule.clone()),
                _ => Parsed::Unknown,
            };
        };
        match parse(&item.id, def) {
            Ok(schedule) => {
                let schedule = Arc::new(schedule);
                let cached = Cached {
                    digest: item.digest.clone(),
                    schedule: schedule.clone(),
                    record: None,
                    fired: None,
                };
                self.by_id.insert(item.id.clone(), cached);
                Parsed::Ready(schedule)
            }
            Err(reason) => Parsed::Unreadable(reason),
        }
    }
}

impl Ticker {
    /// Fires due ticks round after round until `cancel`, beating the
    /// schedulers' heartbeat between rounds.
    pub async fn run(&self, cancel: CancellationToken) {
        // Beats between rounds too: a round that takes longer than the
        // grace on a loaded machine is no outage. On a thread of their
        // own, so a busy runtime does not hold them up either.
        let beats = cancel.child_token();
        let _stop_beats = beats.clone().drop_guard();
        crate::timing::publish_thread::spawn(self.clone().beat_loop(beats));
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

    /// Tells the other schedulers (and this one's rounds) that a
    /// scheduler runs, a few times per grace: see [`plan`](plan::plan).
    async fn beat_loop(self, cancel: CancellationToken) {
        let every = Duration::from_millis((self.grace_ms / 4).clamp(10, 250) as u64);
        loop {
            if let Err(err) = self.store.beat(self.grace_ms).await {
                tracing::debug!(cause = %err, "heartbeat failed");
            }
            if !sleep_or_cancel(every, &cancel).await {
                return;
            }
        }
    }

    /// One heartbeat, sent from the publish thread as the beat loop's are:
    /// the heartbeat's connection then opens there whichever call opens it,
    /// and its I/O task never waits for a busy shared runtime.
    async fn beat_from_publish_thread(&self) -> Result<i64, QueueError> {
        let (store, gap) = (self.store.clone(), self.grace_ms);
        match crate::timing::publish_thread::spawn(async move { store.beat(gap).await }).await {
            Ok(since) => since,
            // The task could not finish there (the thread's runtime is
            // gone): beat from here.
            Err(_) => self.store.beat(self.grace_ms).await,
        }
    }

    /// One round; returns how long to sleep before the next.
    pub async fn round(&self) -> Result<Duration, QueueError> {
        self.cache().trim();
        // Before the read, so the live period it returns covers the round.
        let alive_since = self.beat_from_publish_thread().await?;
        let due = self
            .store
            .due_known(
                self.lookahead_ms,
                self.batch,
                |id, next| self.cache().fired(id, next),
                |id, digest| self.cache().knows(id, digest),
            )
            .await?;
        let mut fires = Vec::with_capacity(due.items.len());
        let mut tasks: Vec<Vec<Task>> = Vec::with_capacity(due.items.len());
        let mut failed = Vec::new();
        let (mut late_ticks, mut late_schedules) = (0, 0);
        for (n, item) in due.items.into_iter().enumerate() {
            if n % PLAN_SLICE == PLAN_SLICE - 1 {
                tokio::task::yield_now().await;
            }
            if let Some((fire, t, late)) = self.prepare(item, due.now, alive_since, &mut failed) {
                fires.push(fire);
                tasks.push(t);
                if late > 0 {
                    late_ticks += late;
                    late_schedules += 1;
                }
            }
        }
        // One bad definition is its own problem: noted on the schedule for
        // the API, and the round goes on for the others.
        for (id, reason) in &failed {
            metrics::counter!("kairos_scheduler_schedule_failures_total").increment(1);
            if let Err(err) = self.store.mark_failed(id, reason).await {
                tracing::warn!(schedule = %id, cause = %err, "cannot note the schedule's failure");
            }
        }
        if late_ticks > 0 {
            // One line a round: a loaded scheduler may be behind on
            // thousands of schedules.
            tracing::warn!(
                ticks = late_ticks,
                schedules = late_schedules,
                grace_ms = self.grace_ms,
                "ticks fire late: the schedulers fell behind (not an outage, so every tick fires)"
            );
            metrics::counter!("kairos_scheduler_ticks_late_total").increment(late_ticks);
        }
        if !fires.is_empty() {
            let results = self.store.fire(&fires).await?;
            {
                let mut cache = self.cache();
                for (fire, fired) in fires.iter().zip(&results) {
                    cache.note_fire(fire, fired.won);
                }
            }
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
                        if let Some(due) = t.run_at {
                            self.status
                                .record_with(|| StatusUpdate::scheduled(t, due, true));
                        }
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

    /// Only this loop uses the cache; a poisoned lock still holds nothing
    /// but parsed definitions.
    fn cache(&self) -> std::sync::MutexGuard<'_, ParsedCache> {
        self.parsed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Plans one due schedule into its compare-and-set, with the tasks of
    /// its `scheduled` events and how many of its ticks fire more than the
    /// grace late; `None` when its definition is not at hand this round.
    /// A definition that cannot fire is added to `failed` with the reason.
    fn prepare(
        &self,
        item: DueItem,
        now: i64,
        alive_since: i64,
        failed: &mut Vec<(String, String)>,
    ) -> Option<(Fire, Vec<Task>, u64)> {
        let mut fire = Fire {
            shard: item.shard,
            id: item.id.clone(),
            expected_next: item.next,
            digest: item.digest.clone(),
            last: item.last,
            new_next: None,
            overlap_skip: false,
            max_run_ms: 0,
            occurrences: Vec::new(),
        };
        if item.digest.is_empty() {
            // The definition vanished: the compare-and-set drops the tick.
            return Some((fire, Vec::new(), 0));
        }
        let parsed = self.cache().get(&item);
        let schedule = match parsed {
            Parsed::Ready(s) => s,
            Parsed::Unknown => return None,
            Parsed::Unreadable(reason) => {
                // Validation keeps these out; a definition written by hand
                // or by a newer version may still be unreadable: stop it
                // rather than retry it every round.
                tracing::error!(schedule = %item.id, %reason, "unreadable schedule definition; it will not fire until replaced");
                failed.push((item.id.clone(), format!("unreadable definition: {reason}")));
                return Some((fire, Vec::new(), 0));
            }
        };
        if !schedule.spec.enabled {
            return Some((fire, Vec::new(), 0));
        }
        let p = plan::plan(
            &schedule.trigger,
            schedule.spec.misfire,
            item.next,
            now,
            alive_since,
            self.lookahead_ms,
            self.grace_ms,
        );
        if p.missed > 0 {
            tracing::warn!(schedule = %item.id, missed = p.missed, policy = ?schedule.spec.misfire, "ticks missed while no scheduler ran");
            metrics::counter!("kairos_scheduler_ticks_missed_total").increment(p.missed);
        }
        fire.new_next = p.next;
        fire.overlap_skip = schedule.spec.overlap == Overlap::Skip;
        fire.max_run_ms = schedule.max_run_ms();
        let mut tasks = Vec::new();
        // The task itself is only needed for its `scheduled` event and
        // status.
        let events = self.events.enabled() || self.status.enabled();
        for tick in p.fire {
            if item.last.is_some_and(|l| tick <= l) {
                continue;
            }
            let encoded = self
                .cache()
                .record(&item.id, &item.digest, || {
                    occurrence::record(&schedule, tick)
                })
                .and_then(|rec| {
                    let task = events
                        .then(|| occurrence::task(&schedule, tick))
                        .transpose()?;
                    Ok((rec, task))
                });
            match encoded {
                Ok((rec, task)) => {
                    fire.occurrences.push(Occurrence {
                        member: occurrence::occurrence_id(&schedule.id, tick),
                        tick,
                        record: rec,
                    });
                    tasks.extend(task);
                }
                Err(err) => {
                    tracing::error!(schedule = %item.id, tick, cause = %err, "cannot build the occurrence; tick dropped");
                    failed.push((item.id.clone(), format!("cannot build the task: {err}")));
                }
            }
        }
        Some((fire, tasks, p.late))
    }
}

fn parse(id: &str, def: &[u8]) -> Result<Schedule, String> {
    let spec = ScheduleSpec::from_json(def).map_err(|e| e.to_string())?;
    spec.validate(id).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(digest: &str, def: Option<&str>) -> DueItem {
        DueItem {
            shard: 0,
            id: "s".into(),
            next: 0,
            digest: digest.into(),
            def: def.map(|d| d.as_bytes().to_vec()),
            last: None,
        }
    }

    fn ready(p: Parsed) -> Arc<Schedule> {
        match p {
            Parsed::Ready(s) => s,
            Parsed::Unreadable(r) => panic!("unreadable: {r}"),
            Parsed::Unknown => panic!("unknown"),
        }
    }

    #[test]
    fn a_definition_is_parsed_once_until_its_digest_changes() {
        let mut cache = ParsedCache::default();
        let every_second = r#"{"every_ms":1000,"task":{"name":"t"}}"#;
        assert!(!cache.knows("s", "d1"));
        let a = ready(cache.get(&item("d1", Some(every_second))));
        assert!(cache.knows("s", "d1"));
        // Known: the round reads the digest only, and gets the same parse.
        let b = ready(cache.get(&item("d1", None)));
        assert!(Arc::ptr_eq(&a, &b));
        // A new digest is not known, so its bytes come along and are parsed.
        assert!(!cache.knows("s", "d2"));
        let c = ready(cache.get(&item(
            "d2",
            Some(r#"{"every_ms":2000,"task":{"name":"t"}}"#),
        )));
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(matches!(cache.get(&item("d1", None)), Parsed::Unknown));
        assert!(matches!(
            cache.get(&item("d3", Some("{not json"))),
            Parsed::Unreadable(_)
        ));
    }

    #[test]
    fn a_definition_builds_its_record_once_and_a_new_one_builds_afresh() {
        let mut cache = ParsedCache::default();
        ready(cache.get(&item(
            "d1",
            Some(r#"{"every_ms":1000,"task":{"name":"t"}}"#),
        )));
        let mut built = 0;
        for _ in 0..3 {
            let r = cache.record("s", "d1", || {
                built += 1;
                Ok(b"one".to_vec())
            });
            assert_eq!(r.unwrap(), b"one");
        }
        assert_eq!(built, 1, "built once for the definition");
        // Another definition of the same schedule does not get the old
        // record, and a failure is not kept.
        let r = cache.record("s", "d2", || Ok(b"two".to_vec()));
        assert_eq!(r.unwrap(), b"two");
        ready(cache.get(&item(
            "d3",
            Some(r#"{"every_ms":2000,"task":{"name":"t"}}"#),
        )));
        let failed = cache.record("s", "d3", || Err(ProtocolError::BadRecord("no".into())));
        assert!(failed.is_err());
        assert_eq!(
            cache.record("s", "d3", || Ok(b"three".to_vec())).unwrap(),
            b"three"
        );
    }

    fn fire(digest: &str, next: Option<i64>, ticks: &[i64]) -> Fire {
        Fire {
            shard: 0,
            id: "s".into(),
            expected_next: 0,
            digest: digest.into(),
            last: Some(5),
            new_next: next,
            overlap_skip: false,
            max_run_ms: 0,
            occurrences: ticks
                .iter()
                .map(|&tick| Occurrence {
                    member: format!("s@{tick}"),
                    tick,
                    record: Vec::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn what_a_won_fire_stored_is_remembered_until_a_fire_is_lost() {
        let mut cache = ParsedCache::default();
        let def = r#"{"every_ms":1000,"task":{"name":"t"}}"#;
        ready(cache.get(&item("d1", Some(def))));
        // Parsed but never fired here: the state must be read.
        assert_eq!(cache.fired("s", 2000), None);
        cache.note_fire(&fire("d1", Some(2000), &[1000]), true);
        assert_eq!(cache.fired("s", 2000), Some(("d1".into(), Some(1000))));
        // Another next tick stored: someone else wrote it.
        assert_eq!(cache.fired("s", 3000), None);
        // A fire with nothing to hand over keeps the last tick read.
        cache.note_fire(&fire("d1", Some(3000), &[]), true);
        assert_eq!(cache.fired("s", 3000), Some(("d1".into(), Some(5))));
        // A lost compare-and-set: the schedule changed under us.
        cache.note_fire(&fire("d1", Some(4000), &[3000]), false);
        assert_eq!(cache.fired("s", 4000), None);
        assert_eq!(cache.fired("s", 3000), None);
        // Won with a digest other than the parsed one, or exhausted.
        cache.note_fire(&fire("d2", Some(5000), &[4000]), true);
        assert_eq!(cache.fired("s", 5000), None);
        cache.note_fire(&fire("d1", None, &[4000]), true);
        assert!(cache.knows("s", "d1"));
    }
}
