//! Supervised long-lived loops, and the one holder of background work.
//!
//! Every long-lived loop of a process (an AMQP session, the events
//! publisher, the ticker, the outcomes consumer, the HTTP server) is a
//! [`Supervised`]: a name, a way to connect, a session on that connection,
//! and a way to close it. [`run`] drives one: connect, run the session,
//! close, and when the session failed, panicked or returned before
//! shutdown, report it (log, `kairos_loop_restarts_total{loop="NAME"}`,
//! [`Health`] for `/readyz`) and start again after a backoff. The backoff
//! starts from its first step again once a session ran [`HEALTHY_AFTER`].
//!
//! [`Supervisor`] holds a process's background work: its loops and the
//! tasks they leave behind, in one `TaskTracker`, stopped by one
//! `CancellationToken`.

use crate::amqp::{sleep_or_cancel, Backoff};
use futures_util::FutureExt;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

/// A session that ran this long counts as healthy: the next failure starts
/// the backoff from its first step again, so a loop that fails once in a
/// while restarts at once, and only one that keeps failing waits longer.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// How a supervised loop's restart is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// The loop should never end: its end is logged at ERROR (an operator
    /// must look).
    Failure,
    /// A session on a connection, which ends whenever the broker goes
    /// away: its end is logged at WARN as "WHAT ended; reconnecting". A
    /// panic is still logged at ERROR.
    Reconnect(&'static str),
}

/// A long-lived loop as the supervisor runs it: connect, run a session,
/// close; again after a failure.
pub trait Supervised: Send {
    /// What a session runs on (a broker connection, or `()`).
    type Conn: Send;
    /// Why a session ended early.
    type Error: Display + Send;

    /// The loop's name in logs, metrics and `/readyz`.
    fn name(&self) -> &'static str;

    /// How its restarts are reported.
    fn restart(&self) -> Restart {
        Restart::Failure
    }

    /// Connects, retrying as long as it takes; `None` once `cancel` fired.
    fn connect(
        &mut self,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Option<Self::Conn>> + Send;

    /// Runs one session until `cancel` fires (then `Ok`) or it fails.
    fn session(
        &mut self,
        conn: &mut Self::Conn,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Closes what the session ran on; `failed` when it ended early (the
    /// loop reconnects next) rather than with shutdown.
    fn close(&mut self, conn: Self::Conn, failed: bool) -> impl Future<Output = ()> + Send;

    /// Whether the loop has nothing left to do even before shutdown (the
    /// events publisher once every sink is gone): a session that then
    /// returns `Ok` ends the loop.
    fn finished(&self) -> bool {
        false
    }
}

/// Runs `looped` until `cancel` fires: connect, session, close, and after a
/// failure the report and the backoff (see the module doc). Returns once
/// `cancel` fired and the current session closed.
pub async fn run<L: Supervised>(looped: L, health: &Health, cancel: &CancellationToken) {
    run_paced(looped, health, cancel, Pacing::default()).await;
}

/// The backoff between restarts and when a session counts as healthy: the
/// constants in production, shorter in the unit tests.
struct Pacing {
    backoff: Backoff,
    healthy_after: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            backoff: Backoff::new(),
            healthy_after: HEALTHY_AFTER,
        }
    }
}

/// [`run`] with `pacing`.
async fn run_paced<L: Supervised>(
    mut looped: L,
    health: &Health,
    cancel: &CancellationToken,
    mut pacing: Pacing,
) {
    let name = looped.name();
    while let Some(mut conn) = looped.connect(cancel).await {
        health.set_running(name);
        let started = tokio::time::Instant::now();
        let outcome = AssertUnwindSafe(looped.session(&mut conn, cancel))
            .catch_unwind()
            .await;
        let (error, panicked) = match outcome {
            Ok(Ok(())) if cancel.is_cancelled() || looped.finished() => {
                looped.close(conn, false).await;
                break;
            }
            Ok(Ok(())) => ("returned before shutdown".to_string(), false),
            Ok(Err(err)) => (err.to_string(), false),
            Err(panic) => (format!("panicked: {}", panic_text(panic)), true),
        };
        report(name, looped.restart(), panicked, &error);
        health.set_failed(name, &error);
        looped.close(conn, true).await;
        if started.elapsed() >= pacing.healthy_after {
            pacing.backoff.reset();
        }
        if !sleep_or_cancel(pacing.backoff.next_delay(), cancel).await {
            break;
        }
    }
    health.set_stopped(name);
}

/// Logs and counts one restart.
fn report(name: &'static str, restart: Restart, panicked: bool, error: &str) {
    match restart {
        Restart::Reconnect(what) if !panicked => {
            tracing::warn!(r#loop = name, cause = %error, "{what} ended; reconnecting");
        }
        _ => {
            tracing::error!(r#loop = name, cause = %error, "background loop failed; restarting it");
        }
    }
    metrics::counter!("kairos_loop_restarts_total", "loop" => name).increment(1);
}

/// The message a panic carried, when it is text (as `panic!` and
/// `catch_unwind` hand it over).
pub fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-text panic payload".to_string()
    }
}

/// A loop with nothing to connect: each session is a fresh run `make`
/// builds, so a restart starts from a clean state.
struct Restarted<F> {
    name: &'static str,
    make: F,
}

impl<F, Fut> Supervised for Restarted<F>
where
    F: FnMut(CancellationToken) -> Fut + Send,
    Fut: Future<Output = Result<(), String>> + Send,
{
    type Conn = ();
    type Error = String;

    fn name(&self) -> &'static str {
        self.name
    }

    async fn connect(&mut self, cancel: &CancellationToken) -> Option<()> {
        (!cancel.is_cancelled()).then_some(())
    }

    async fn session(&mut self, _: &mut (), cancel: &CancellationToken) -> Result<(), String> {
        (self.make)(cancel.clone()).await
    }

    async fn close(&mut self, _: (), _: bool) {}
}

/// The background work of one process: its supervised loops and the tasks
/// they leave behind (an old session finishing its running tasks), held in
/// one `TaskTracker` and stopped by one `CancellationToken`. Cheap to clone;
/// clones share everything.
#[derive(Clone, Default)]
pub struct Supervisor {
    health: Health,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Supervisor {
    /// Nothing running yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The loops' states, for `/readyz`.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The token that stops everything: fired by [`stop_on`](Self::stop_on)
    /// or [`stop`](Self::stop).
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether shutdown began.
    pub fn is_stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Begins shutdown: every loop stops at its next step.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Begins shutdown once `signal` completes.
    pub fn stop_on(&self, signal: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = signal => cancel.cancel(),
                () = cancel.cancelled() => {}
            }
        });
    }

    /// A guard that begins shutdown when dropped, so that no background
    /// work outlives the `run` that started it, however `run` returns.
    pub fn stop_on_drop(&self) -> DropGuard {
        self.cancel.clone().drop_guard()
    }

    /// Runs `looped` supervised in this task until shutdown (see [`run`]).
    pub async fn run<L: Supervised>(&self, looped: L) {
        run(looped, &self.health, &self.cancel).await;
    }

    /// Runs `looped` supervised in a task of its own.
    pub fn start<L: Supervised + 'static>(&self, looped: L) {
        let this = self.clone();
        self.tracker.spawn(async move { this.run(looped).await });
    }

    /// Supervises a loop with nothing to connect: each run is a fresh
    /// `make(cancel)`, to return once `cancel` fired; it is restarted when
    /// it panics, fails, or returns before shutdown. Shown in `/readyz`
    /// from now on.
    pub fn start_loop<F, Fut>(&self, name: &'static str, make: F)
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.health.set_running(name);
        self.start(Restarted { name, make });
    }

    /// Holds a one-off background task, waited for by [`wait`](Self::wait).
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(task);
    }

    /// Waits until every loop and task ended (after [`stop`](Self::stop)).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Where a supervised loop is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// It runs (or, for a loop on a connection, is connected).
    Running,
    /// It failed and waits for its restart.
    Restarting,
    /// It ended with the process's shutdown.
    Stopped,
}

/// One loop as `/readyz` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoopHealth {
    /// Where it is.
    pub state: State,
    /// Restarts since the process started.
    pub restarts: u64,
    /// Why it last failed (panic message or error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When it last failed, Unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure_at: Option<i64>,
}

/// The loops of one process. Cheap to clone.
#[derive(Clone, Default)]
pub struct Health {
    loops: Arc<Mutex<BTreeMap<String, LoopHealth>>>,
}

impl Health {
    /// No loops yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every loop's state, by name.
    pub fn snapshot(&self) -> BTreeMap<String, LoopHealth> {
        self.lock().clone()
    }

    /// The loops that are not running (failed and waiting for a restart).
    /// Loops stopped by shutdown do not count.
    pub fn failing(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, h)| h.state == State::Restarting)
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, LoopHealth>> {
        // A poisoned lock still holds plain data.
        self.loops.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_running(&self, name: &str) {
        let mut loops = self.lock();
        let entry = loops.entry(name.to_string()).or_insert(LoopHealth {
            state: State::Running,
            restarts: 0,
            last_error: None,
            last_failure_at: None,
        });
        entry.state = State::Running;
    }

    fn set_failed(&self, name: &str, error: &str) {
        let mut loops = self.lock();
        if let Some(entry) = loops.get_mut(name) {
            entry.state = State::Restarting;
            entry.restarts += 1;
            entry.last_error = Some(error.to_string());
            entry.last_failure_at = Some(crate::amqp::now_ms());
        }
    }

    fn set_stopped(&self, name: &str) {
        if let Some(entry) = self.lock().get_mut(name) {
            entry.state = State::Stopped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use tokio::sync::{mpsc, Semaphore};
    use tokio::time::Instant;

    /// What one scripted session does.
    enum Step {
        Fail,
        Panic,
        /// Runs this long, then fails.
        RunThenFail(Duration),
        UntilShutdown,
    }

    /// What the loop did, in order.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Connected(Instant),
        Ended(Instant),
        Closed { failed: bool },
    }

    /// A loop that plays `steps`, one per session, and reports each step
    /// on `seen`. With a `gate`, each connect waits for a permit.
    struct Script {
        steps: VecDeque<Step>,
        seen: mpsc::UnboundedSender<Seen>,
        gate: Option<Arc<Semaphore>>,
    }

    impl Supervised for Script {
        type Conn = ();
        type Error = String;

        fn name(&self) -> &'static str {
            "script"
        }

        async fn connect(&mut self, cancel: &CancellationToken) -> Option<()> {
            if let Some(gate) = &self.gate {
                tokio::select! {
                    permit = gate.acquire() => permit.ok()?.forget(),
                    () = cancel.cancelled() => return None,
                }
            }
            let _ = self.seen.send(Seen::Connected(Instant::now()));
            Some(())
        }

        async fn session(&mut self, _: &mut (), cancel: &CancellationToken) -> Result<(), String> {
            let step = self.steps.pop_front().unwrap_or(Step::UntilShutdown);
            let outcome = match step {
                Step::Fail => Err("redis went away".to_string()),
                Step::Panic => panic!("ShortString exceeds maximum length"),
                Step::RunThenFail(d) => {
                    tokio::time::sleep(d).await;
                    Err("broker went away".to_string())
                }
                Step::UntilShutdown => {
                    cancel.cancelled().await;
                    Ok(())
                }
            };
            let _ = self.seen.send(Seen::Ended(Instant::now()));
            outcome
        }

        async fn close(&mut self, _: (), failed: bool) {
            let _ = self.seen.send(Seen::Closed { failed });
        }
    }

    fn script(
        steps: impl IntoIterator<Item = Step>,
        gate: Option<Arc<Semaphore>>,
    ) -> (Script, mpsc::UnboundedReceiver<Seen>) {
        let (seen, rx) = mpsc::unbounded_channel();
        let steps = steps.into_iter().collect();
        (Script { steps, seen, gate }, rx)
    }

    fn quick() -> Pacing {
        Pacing {
            backoff: Backoff::between(Duration::from_millis(1), Duration::from_millis(2)),
            healthy_after: HEALTHY_AFTER,
        }
    }

    #[tokio::test]
    async fn a_failed_or_panicking_session_is_reported_closed_and_restarted() {
        let gate = Arc::new(Semaphore::new(1));
        let (looped, mut seen) = script([Step::Panic, Step::Fail], Some(gate.clone()));
        let (health, cancel) = (Health::new(), CancellationToken::new());
        let running = {
            let (health, cancel) = (health.clone(), cancel.clone());
            tokio::spawn(async move { run_paced(looped, &health, &cancel, quick()).await })
        };
        for _ in 0..2 {
            assert!(matches!(seen.recv().await, Some(Seen::Connected(_))));
            // The failed (or panicked) session is closed, and the next
            // connect waits at the gate: meanwhile the loop shows as failing.
            loop {
                match seen.recv().await {
                    Some(Seen::Ended(_)) => {}
                    other => {
                        assert_eq!(other, Some(Seen::Closed { failed: true }));
                        break;
                    }
                }
            }
            assert_eq!(health.failing(), vec!["script".to_string()]);
            gate.add_permits(1);
        }
        assert!(matches!(seen.recv().await, Some(Seen::Connected(_))));
        let h = health.snapshot()["script"].clone();
        assert_eq!((h.state, h.restarts), (State::Running, 2));
        assert_eq!(h.last_error.as_deref(), Some("redis went away"));
        assert!(h.last_failure_at.is_some());
        assert!(health.failing().is_empty());
        cancel.cancel();
        running.await.unwrap();
        assert_eq!(health.snapshot()["script"].state, State::Stopped);
    }

    #[tokio::test]
    async fn the_backoff_starts_over_after_a_healthy_session() {
        // Quick failures double the delay (20 ms .. 1.28 s); a session that
        // ran `healthy_after` fails, and the next connect comes after the
        // first step again rather than after the longest.
        let mut steps: Vec<Step> = (0..6).map(|_| Step::Fail).collect();
        steps.push(Step::RunThenFail(Duration::from_millis(250)));
        let (looped, mut seen) = script(steps, None);
        let (health, cancel) = (Health::new(), CancellationToken::new());
        let pacing = Pacing {
            backoff: Backoff::between(Duration::from_millis(20), Duration::from_secs(10)),
            healthy_after: Duration::from_millis(200),
        };
        let running = {
            let (health, cancel) = (health.clone(), cancel.clone());
            tokio::spawn(async move { run_paced(looped, &health, &cancel, pacing).await })
        };
        let mut ends = Vec::new();
        let mut connects = Vec::new();
        while connects.len() < 8 {
            match seen.recv().await {
                Some(Seen::Connected(at)) => connects.push(at),
                Some(Seen::Ended(at)) => ends.push(at),
                Some(Seen::Closed { failed }) => assert!(failed),
                None => panic!("the loop ended"),
            }
        }
        let before_healthy = connects[6] - ends[5];
        let after_healthy = connects[7] - ends[6];
        assert!(
            before_healthy >= Duration::from_millis(320),
            "{before_healthy:?}"
        );
        assert!(
            after_healthy < Duration::from_millis(300),
            "{after_healthy:?}"
        );
        cancel.cancel();
        running.await.unwrap();
        assert_eq!(health.snapshot()["script"].restarts, 7);
    }

    #[tokio::test]
    async fn shutdown_closes_the_session_and_stops_every_loop() {
        let work = Supervisor::new();
        let (session, mut seen) = script([], None);
        work.start(session);
        // A loop that never connects stops too.
        let (waiting, _) = script([], Some(Arc::new(Semaphore::new(0))));
        work.start(waiting);
        let stopped = work.stop_on_drop();
        work.start_loop("ticker", |cancel| async move {
            cancel.cancelled().await;
            Ok(())
        });
        assert!(matches!(seen.recv().await, Some(Seen::Connected(_))));
        assert_eq!(work.health().snapshot()["ticker"].state, State::Running);
        drop(stopped);
        assert!(work.is_stopping());
        work.wait().await;
        assert!(matches!(seen.recv().await, Some(Seen::Ended(_))));
        assert_eq!(seen.recv().await, Some(Seen::Closed { failed: false }));
        let loops = work.health().snapshot();
        assert_eq!(loops["script"].state, State::Stopped);
        assert_eq!(loops["ticker"].state, State::Stopped);
        assert_eq!(loops["script"].restarts + loops["ticker"].restarts, 0);
    }

    #[tokio::test]
    async fn a_loop_returning_before_shutdown_is_restarted() {
        let work = Supervisor::new();
        let (tx, mut runs) = mpsc::unbounded_channel();
        work.start_loop("outcomes", move |_| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(());
                Ok(())
            }
        });
        for _ in 0..3 {
            runs.recv().await.expect("run again");
        }
        work.stop();
        work.wait().await;
        let h = &work.health().snapshot()["outcomes"];
        assert!(h.restarts >= 2);
        assert_eq!(h.last_error.as_deref(), Some("returned before shutdown"));
    }
}
