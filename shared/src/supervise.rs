//! Supervised background loops.
//!
//! A background loop (the ticker, the outcomes consumer, the wake listener)
//! that panics or returns an error used to end silently: its task was
//! spawned and never looked at again, so a scheduler could stop firing
//! schedules while `/healthz` still said ok. [`supervise`] runs a named
//! loop in a task of its own, and when that task panics, fails, or returns
//! before shutdown, logs it at ERROR, counts it in
//! `kairos_loop_restarts_total{loop="NAME"}` and starts it again after a
//! backoff. [`Health`] records each loop's state for `/readyz`.

use crate::amqp::{sleep_or_cancel, Backoff};
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A run this long counts as recovered: the next failure starts the
/// backoff from its first step again.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Where a supervised loop is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    /// It failed and waits for its restart.
    Restarting,
    /// It ended with the process's shutdown.
    Stopped,
}

/// One loop as `/readyz` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoopHealth {
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

    /// Records that `name`, a loop supervised elsewhere (the AMQP session),
    /// runs.
    pub fn mark_running(&self, name: &str) {
        self.set_running(name);
    }

    /// Records that `name` failed and waits to be started again.
    pub fn mark_failed(&self, name: &str, error: &str) {
        self.set_running(name);
        self.set_failed(name, error);
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

/// Runs the loop `make()` builds under `name` until `cancel`, restarting it
/// (with backoff) whenever it panics, fails, or returns before `cancel`.
/// `make` builds a fresh run each time, so a restart starts from a clean
/// state. The returned handle ends once `cancel` fired and the current run
/// returned.
pub fn supervise<F, Fut>(
    health: &Health,
    name: &'static str,
    cancel: CancellationToken,
    mut make: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let health = health.clone();
    health.set_running(name);
    tokio::spawn(async move {
        let mut backoff = Backoff::new();
        loop {
            health.set_running(name);
            let started = tokio::time::Instant::now();
            let outcome = tokio::spawn(make()).await;
            let error = match outcome {
                Ok(Ok(())) if cancel.is_cancelled() => {
                    health.set_stopped(name);
                    return;
                }
                Ok(Ok(())) => "returned before shutdown".to_string(),
                Ok(Err(err)) => err,
                Err(join) if join.is_panic() => format!("panicked: {}", panic_text(join)),
                Err(join) => format!("was cancelled: {join}"),
            };
            tracing::error!(r#loop = name, cause = %error, "background loop failed; restarting it");
            metrics::counter!("kairos_loop_restarts_total", "loop" => name).increment(1);
            health.set_failed(name, &error);
            if started.elapsed() >= STABLE_AFTER {
                backoff.reset();
            }
            if !sleep_or_cancel(backoff.next_delay(), &cancel).await {
                health.set_stopped(name);
                return;
            }
        }
    })
}

/// The message a panic carried, when it is text.
fn panic_text(join: tokio::task::JoinError) -> String {
    let payload = join.into_panic();
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-text panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_panicking_loop_is_restarted_counted_and_reported() {
        let health = Health::new();
        let cancel = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let (seen, ready) = (runs.clone(), Arc::new(tokio::sync::Notify::new()));
        let ready2 = ready.clone();
        let stop = cancel.clone();
        let handle = supervise(&health, "ticker", cancel.clone(), move || {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let (ready, stop) = (ready2.clone(), stop.clone());
            async move {
                match n {
                    0 => panic!("ShortString exceeds maximum length"),
                    1 => Err("redis went away".to_string()),
                    _ => {
                        ready.notify_one();
                        stop.cancelled().await;
                        Ok(())
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), ready.notified())
            .await
            .expect("the third run starts");
        let h = health.snapshot()["ticker"].clone();
        assert_eq!(h.state, State::Running);
        assert_eq!(h.restarts, 2);
        assert_eq!(h.last_error.as_deref(), Some("redis went away"));
        assert!(health.failing().is_empty());
        cancel.cancel();
        handle.await.unwrap();
        assert_eq!(health.snapshot()["ticker"].state, State::Stopped);
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failed_loop_waiting_for_its_restart_is_failing() {
        let health = Health::new();
        let cancel = CancellationToken::new();
        let handle = supervise(&health, "outcomes", cancel.clone(), || async {
            Err::<(), _>("down".to_string())
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while health.failing().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never reported");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(health.failing(), vec!["outcomes".to_string()]);
        let h = &health.snapshot()["outcomes"];
        assert!(h.last_error.as_deref() == Some("down") && h.last_failure_at.is_some());
        cancel.cancel();
        handle.await.unwrap();
    }
}
