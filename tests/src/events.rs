//! Knowing what happened: [`EventTap`] collects the lifecycle events a
//! namespace publishes on `NS.events`; [`RunLog`] records what a test's
//! own handler ran, for tests whose signal must survive a broker restart.

use crate::namespace::TestEnv;
use futures_util::StreamExt;
use kairos_shared::contract::Names;
use kairos_shared::events::EventKind;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::Connection;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// One lifecycle event as received.
#[derive(Clone, Debug)]
pub struct SeenEvent {
    /// `event`: the [`EventKind`] as text (`started`, `succeeded`...).
    pub kind: String,
    /// The task id.
    pub id: String,
    /// The task name.
    pub name: String,
    /// The attempt, 1 for the first run.
    pub attempt: u64,
    /// When it happened, Unix ms.
    pub at: i64,
    /// When the task was due, for events that have one.
    pub due_at: Option<i64>,
    /// The failure, for events that have one.
    pub error: Option<String>,
    /// The whole event.
    pub raw: Value,
}

/// A private queue bound to `NS.events`; collects events as they arrive.
pub struct EventTap {
    rx: tokio::sync::mpsc::UnboundedReceiver<SeenEvent>,
    /// Every event received so far, in arrival order.
    pub seen: Vec<SeenEvent>,
    _task: JoinHandle<()>,
}

impl EventTap {
    /// A tap on the test's namespace, on its broker.
    pub async fn new(env: &TestEnv) -> Self {
        Self::on(&env.conn, &env.names).await
    }

    /// A tap on another broker (one a test started itself).
    pub async fn on(conn: &Connection, names: &Names) -> Self {
        let ch = conn.create_channel().await.expect("channel");
        let queue = kairos_shared::admin::listen_to_events(
            &ch,
            names,
            kairos_shared::admin::ALL_TASK_EVENTS,
        )
        .await
        .expect("event queue");
        let mut consumer = ch
            .basic_consume(
                queue,
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume events");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _keep = ch;
            while let Some(Ok(d)) = consumer.next().await {
                let Ok(v) = serde_json::from_slice::<Value>(&d.data) else {
                    continue;
                };
                let ev = SeenEvent {
                    kind: v["event"].as_str().unwrap_or_default().to_string(),
                    id: v["id"].as_str().unwrap_or_default().to_string(),
                    name: v["name"].as_str().unwrap_or_default().to_string(),
                    attempt: v["attempt"].as_u64().unwrap_or_default(),
                    at: v["at"].as_i64().unwrap_or_default(),
                    due_at: v["due_at"].as_i64(),
                    error: v["error"].as_str().map(str::to_string),
                    raw: v,
                };
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        EventTap {
            rx,
            seen: Vec::new(),
            _task: task,
        }
    }

    /// Waits until `done(seen)` holds, or panics after `within`.
    pub async fn wait_until(
        &mut self,
        within: Duration,
        what: &str,
        done: impl Fn(&[SeenEvent]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.seen.push(ev),
                Ok(None) => panic!("event stream ended while waiting for {what}"),
                Err(_) => panic!(
                    "timed out after {within:?} waiting for {what}; saw {} events",
                    self.seen.len()
                ),
            }
        }
    }

    /// Waits for `n` events of `kind` with distinct ids.
    pub async fn wait_distinct(&mut self, kind: EventKind, n: usize, within: Duration) {
        let k = kind.as_str();
        self.wait_until(within, &format!("{n} distinct {k} events"), |seen| {
            distinct_ids(seen, k) >= n
        })
        .await;
    }

    /// Like [`EventTap::wait_until`], but says whether `done` held in time
    /// instead of panicking, for tests that explain a shortfall themselves.
    pub async fn try_wait_until(
        &mut self,
        within: Duration,
        done: impl Fn(&[SeenEvent]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while !done(&self.seen) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) => self.seen.push(ev),
                Ok(None) | Err(_) => return false,
            }
        }
        true
    }

    /// Keeps collecting for `quiet`: for checks that nothing more arrives
    /// (a duplicate would come right behind what was awaited).
    pub async fn collect_for(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            self.seen.push(ev);
        }
    }

    /// The first event of `kind` for task `id` seen so far; panics when
    /// there is none.
    pub fn first(&self, kind: EventKind, id: &str) -> SeenEvent {
        self.seen
            .iter()
            .find(|e| e.kind == kind.as_str() && e.id == id)
            .unwrap_or_else(|| panic!("no {} event for {id}", kind.as_str()))
            .clone()
    }

    /// Events of one kind.
    pub fn of(&self, kind: EventKind) -> Vec<&SeenEvent> {
        self.seen
            .iter()
            .filter(|e| e.kind == kind.as_str())
            .collect()
    }
}

/// How many distinct task ids have an event of `kind`.
pub fn distinct_ids(seen: &[SeenEvent], kind: &str) -> usize {
    let mut ids: HashMap<&str, ()> = HashMap::new();
    for e in seen.iter().filter(|e| e.kind == kind) {
        ids.insert(&e.id, ());
    }
    ids.len()
}

/// Records which task ids a handler ran, for tests whose completion signal
/// must survive a broker restart (events travel through the broker).
#[derive(Clone, Default)]
pub struct RunLog {
    runs: Arc<Mutex<HashMap<String, usize>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl RunLog {
    /// Records one run of task `id`.
    pub fn record(&self, id: &str) {
        if let Ok(mut runs) = self.runs.lock() {
            *runs.entry(id.to_string()).or_default() += 1;
        }
        self.notify.notify_waiters();
    }

    /// How many distinct task ids ran.
    pub fn distinct(&self) -> usize {
        self.runs.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// How often task `id` ran.
    pub fn runs_of(&self, id: &str) -> usize {
        self.runs
            .lock()
            .map(|r| r.get(id).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Runs of all tasks together.
    pub fn total(&self) -> usize {
        self.runs.lock().map(|r| r.values().sum()).unwrap_or(0)
    }

    /// Waits until `n` distinct ids ran.
    pub async fn wait_distinct(&self, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.notify.notified();
            if self.distinct() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "only {} of {n} tasks ran within {within:?}",
                    self.distinct()
                );
            }
        }
    }

    /// A handler that records the task id, then sleeps `ms`.
    pub fn handler(&self, ms: u64) -> impl kairos_worker::Handler {
        let log = self.clone();
        move |ctx: kairos_worker::TaskContext, _body: Vec<u8>| {
            let log = log.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                log.record(&ctx.id);
                Ok(())
            }
        }
    }
}

impl RunLog {
    /// Every id that ran, with its run count.
    pub fn snapshot(&self) -> HashMap<String, usize> {
        self.runs.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Ticks of schedule `id` that ran (task ids `id@tick`), sorted.
    pub fn ticks_of(&self, schedule: &str) -> Vec<i64> {
        let mut ticks: Vec<i64> = self
            .snapshot()
            .keys()
            .filter_map(|k| {
                let (s, t) = k.rsplit_once('@')?;
                (s == schedule).then(|| t.parse().ok()).flatten()
            })
            .collect();
        ticks.sort_unstable();
        ticks
    }

    /// Waits until `done(self)` holds.
    pub async fn wait_for(&self, within: Duration, what: &str, done: impl Fn(&RunLog) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "timed out after {within:?} waiting for {what}; ran: {:?}",
                    self.snapshot()
                );
            }
        }
    }
}
