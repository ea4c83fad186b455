//! A recording handler: notes, per task id, when each run started and how
//! late it was (`now - x-run-at`). Cheaper than events, which travel through
//! the broker the benchmark is loading, and it sees exactly what a handler
//! sees.

use kairos_worker::{Handler, TaskContext};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::Notify;

#[derive(Default)]
struct Inner {
    /// Occurrences due outside [from, to) are not recorded (W5's window).
    window: Option<(i64, i64)>,
    /// Runs per id.
    runs: HashMap<String, u32>,
    /// Lateness of each first run, ms (only tasks with a due time).
    lateness: Vec<i64>,
    /// When the last run ended (its ack follows at once).
    last_done: Option<Instant>,
}

impl Inner {
    fn note(&mut self, id: &str, late: Option<i64>) {
        let n = self.runs.entry(id.to_string()).or_default();
        *n += 1;
        if let (1, Some(late)) = (*n, late) {
            self.lateness.push(late);
        }
        self.last_done = Some(Instant::now());
    }
}

#[derive(Clone, Default)]
pub(crate) struct Recorder {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

/// What a recorder saw, for the report.
pub(crate) struct Seen {
    pub(crate) distinct: usize,
    pub(crate) duplicated: usize,
    pub(crate) lateness: Vec<i64>,
    pub(crate) last_done: Option<Instant>,
}

impl Recorder {
    /// A recorder with room for `n` runs: growing its map while tasks run
    /// would stall every recording handler for the rehash, inside the
    /// measurement.
    pub(crate) fn with_capacity(n: usize) -> Self {
        let rec = Recorder::default();
        if let Ok(mut inner) = rec.inner.lock() {
            inner.runs.reserve(n);
            inner.lateness.reserve(n);
        }
        rec
    }

    /// The handler to register (under `kairos.noop` or a bench task name).
    pub(crate) fn handler(&self) -> impl Handler {
        let rec = self.clone();
        move |ctx: TaskContext, _body: Vec<u8>| {
            let rec = rec.clone();
            async move {
                let started = kairos_shared::amqp::now_ms();
                rec.record(&ctx.id, ctx.due_at.map(|due| started - due));
                Ok(())
            }
        }
    }

    /// A handler for schedule fires: records per occurrence, keyed by
    /// `x-schedule-id` and `x-run-at` (the occurrence's instant), so a
    /// schedule that fires the same instant twice counts as duplicated
    /// whatever task ids the two fires got.
    pub(crate) fn occurrence_handler(&self) -> impl Handler {
        let rec = self.clone();
        move |ctx: TaskContext, _body: Vec<u8>| {
            let rec = rec.clone();
            async move {
                let started = kairos_shared::amqp::now_ms();
                let schedule = ctx
                    .headers
                    .inner()
                    .get(kairos_shared::contract::H_SCHEDULE_ID)
                    .map(kairos_shared::contract::value_to_string)
                    .unwrap_or_default();
                let at = ctx.due_at.unwrap_or_default();
                rec.record_due(
                    &format!("{schedule}@{at}"),
                    at,
                    ctx.due_at.map(|due| started - due),
                );
                Ok(())
            }
        }
    }

    /// From now on, [`occurrence_handler`](Self::occurrence_handler)
    /// records only occurrences due in [from, to) (Unix ms).
    pub(crate) fn only_due_in(&self, from: i64, to: i64) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.window = Some((from, to));
        }
    }

    /// Records an occurrence due at `due` unless it is outside the window.
    fn record_due(&self, id: &str, due: i64, late: Option<i64>) {
        if let Ok(mut inner) = self.inner.lock() {
            if inner
                .window
                .is_none_or(|(from, to)| (from..to).contains(&due))
            {
                inner.note(id, late);
            }
        }
        self.notify.notify_waiters();
    }

    fn record(&self, id: &str, late: Option<i64>) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.note(id, late);
        }
        self.notify.notify_waiters();
    }

    pub(crate) fn distinct(&self) -> usize {
        self.inner.lock().map(|i| i.runs.len()).unwrap_or(0)
    }

    /// Waits until `n` distinct ids ran or `until` passes; returns whether
    /// all ran.
    pub(crate) async fn wait_distinct(&self, n: usize, until: tokio::time::Instant) -> bool {
        loop {
            let notified = self.notify.notified();
            if self.distinct() >= n {
                return true;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.distinct() >= n;
            }
        }
    }

    pub(crate) fn seen(&self) -> Seen {
        let Ok(inner) = self.inner.lock() else {
            return Seen {
                distinct: 0,
                duplicated: 0,
                lateness: Vec::new(),
                last_done: None,
            };
        };
        let mut lateness = inner.lateness.clone();
        lateness.sort_unstable();
        Seen {
            distinct: inner.runs.len(),
            duplicated: inner.runs.values().filter(|&&n| n > 1).count(),
            lateness,
            last_done: inner.last_done,
        }
    }
}
