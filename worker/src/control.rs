//! What the control exchange tells this worker: abort a running task, pause
//! or resume a queue (see `kairos_shared::control`).
//!
//! * [`Control`] holds the running attempts (task id -> their abort token)
//!   and the set of paused queues, which the consumers watch.
//! * [`ControlListener`] is the supervised loop (`control`) that consumes
//!   this worker's own queue on `NS.control`, on a connection of its own,
//!   rebuilt whenever it drops. A message that is not a control message is
//!   logged and dropped.
//! * The paused set is also read from Redis (`NS:paused`) before the
//!   consumers start and every [`PAUSED_POLL`], so a message lost while
//!   this worker was away is made up for. The first read waits for the
//!   listener to be bound (at most [`LISTEN_WAIT`]): bound, read, consume,
//!   so the consumers take no task before an abort of it can reach them.
//!
//! An aborted attempt's handler sees it in its context
//! (`ctx.cancelled()`, `ctx.is_cancelled()`) and gets [`ABORT_GRACE`] to
//! return; a handler that ignores it is dropped then (at the await it is
//! stopped at). Either way the delivery is acked, the task is not retried,
//! and it ends `cancelled`.

use crate::consumer::ConsumeError;
use kairos_shared::amqp::{close_connection, connect_with_retry, Broker, CLOSE_WITHIN};
use kairos_shared::contract::Names;
use kairos_shared::control::{self, ControlMessage};
use kairos_shared::supervise::{Restart, Supervised};
use kairos_shared::topology;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long an aborted handler gets to return by itself before it is
/// dropped: enough to clean up after seeing `ctx.cancelled()`, short
/// enough that an abort frees the slot within about a second.
pub(crate) const ABORT_GRACE: Duration = Duration::from_secs(1);

/// How often the paused queues are read again from Redis.
pub(crate) const PAUSED_POLL: Duration = Duration::from_secs(5);

/// How long the first read of the paused queues waits for the listener to
/// be bound to `NS.control` (so that no message falls between the read
/// and the bind); past it the worker starts without it.
pub(crate) const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// The paused queues as the consumers see them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Paused {
    /// Whether the paused set was read once (or could not be, and the
    /// worker goes on without it): consumers wait for it before starting.
    pub(crate) loaded: bool,
    /// Paused logical queues (of any worker, not only this one's).
    pub(crate) queues: BTreeSet<String>,
}

/// The running attempts and the paused queues of one worker, shared by
/// every session.
pub(crate) struct Control {
    /// This worker's queues: only their pauses are logged.
    queues: Vec<String>,
    running: Mutex<HashMap<String, Vec<(u64, CancellationToken)>>>,
    serial: AtomicU64,
    paused: watch::Sender<Paused>,
    /// Bumped by every pause or resume message, so that a Redis read that
    /// began before one does not undo it.
    changes: AtomicU64,
    /// Whether the listener's queue was bound to `NS.control` once.
    listening: watch::Sender<bool>,
}

/// One running attempt's place in [`Control`]: its abort token, removed
/// when dropped.
pub(crate) struct Running {
    control: Arc<Control>,
    id: String,
    serial: u64,
    token: CancellationToken,
}

impl Running {
    /// The token an abort fires.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.control.lock_running();
        if let Some(tokens) = running.get_mut(&self.id) {
            tokens.retain(|(s, _)| *s != self.serial);
            if tokens.is_empty() {
                running.remove(&self.id);
            }
        }
    }
}

impl Control {
    /// No task running, no queue paused yet, the paused set not read.
    pub(crate) fn new(queues: &[String]) -> Arc<Self> {
        for q in queues {
            metrics::gauge!("kairos_worker_queue_paused", "queue" => q.clone()).set(0.0);
        }
        Arc::new(Control {
            queues: queues.to_vec(),
            running: Mutex::default(),
            serial: AtomicU64::new(0),
            paused: watch::Sender::new(Paused::default()),
            changes: AtomicU64::new(0),
            listening: watch::Sender::new(false),
        })
    }

    fn lock_running(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Vec<(u64, CancellationToken)>>> {
        // A poisoned lock still holds plain data.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a running attempt of task `id` until the guard drops.
    pub(crate) fn register(self: &Arc<Self>, id: &str) -> Running {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        self.lock_running()
            .entry(id.to_string())
            .or_default()
            .push((serial, token.clone()));
        Running {
            control: self.clone(),
            id: id.to_string(),
            serial,
            token,
        }
    }

    /// Acts on one control message.
    pub(crate) fn apply(&self, message: ControlMessage) {
        metrics::counter!("kairos_worker_control_messages_total", "op" => op(&message))
            .increment(1);
        match message {
            ControlMessage::Abort { id } => self.abort(&id),
            ControlMessage::Pause { queue } => {
                self.changes.fetch_add(1, Ordering::SeqCst);
                self.paused
                    .send_if_modified(|p| p.queues.insert(queue.clone()));
                self.report(&queue, true);
            }
            ControlMessage::Resume { queue } => {
                self.changes.fetch_add(1, Ordering::SeqCst);
                self.paused.send_if_modified(|p| p.queues.remove(&queue));
                self.report(&queue, false);
            }
        }
    }

    /// Cancels every running attempt of task `id` on this worker (two, if
    /// a redelivery runs beside the first).
    fn abort(&self, id: &str) {
        let running = self.lock_running();
        let Some(tokens) = running.get(id) else {
            tracing::debug!(task_id = %id, "abort: not running here");
            return;
        };
        for (_, token) in tokens {
            token.cancel();
        }
        tracing::info!(task_id = %id, "abort requested; cancelling the running task");
        metrics::counter!("kairos_worker_aborts_total").increment(1);
    }

    /// Logs and shows a pause or resume of one of this worker's queues.
    fn report(&self, queue: &str, paused: bool) {
        if !self.queues.iter().any(|q| q == queue) {
            return;
        }
        if paused {
            tracing::info!(queue = %queue, "queue paused: no new task is taken from it");
        } else {
            tracing::info!(queue = %queue, "queue resumed");
        }
        metrics::gauge!("kairos_worker_queue_paused", "queue" => queue.to_string())
            .set(if paused { 1.0 } else { 0.0 });
    }

    /// A token to pass to [`set_paused`](Self::set_paused) with what a
    /// Redis read started now finds.
    pub(crate) fn read_begins(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// Replaces the paused set with `queues` (read from Redis), unless a
    /// message changed it since the read began (`began`, from
    /// [`read_begins`](Self::read_begins)): the next read converges then.
    pub(crate) fn set_paused(&self, queues: BTreeSet<String>, began: u64) {
        if self.changes.load(Ordering::SeqCst) != began {
            return;
        }
        let before = self.paused.borrow().queues.clone();
        for q in queues.symmetric_difference(&before) {
            self.report(q, queues.contains(q));
        }
        self.paused.send_if_modified(|p| {
            let changed = !p.loaded || p.queues != queues;
            p.loaded = true;
            p.queues = queues;
            changed
        });
    }

    /// Lets the consumers start without the paused set (it could not be
    /// read): a paused queue is paused once a read succeeds.
    pub(crate) fn start_without_paused(&self) {
        self.paused
            .send_if_modified(|p| !std::mem::replace(&mut p.loaded, true));
    }

    /// Whether `queue` is paused now (for `/readyz`: a paused queue is
    /// not consumed on purpose).
    pub(crate) fn is_paused(&self, queue: &str) -> bool {
        self.paused.borrow().queues.contains(queue)
    }

    /// Serves `queue` until `stop`: waits until the paused set is known
    /// and `queue` is not paused, then runs `consume` with a token that
    /// fires on a pause (the consumer is cancelled and the deliveries it
    /// had not started go back to the queue; running tasks finish), and
    /// again after a resume. Returns when `stop` fired or `consume` failed.
    pub(crate) async fn serve_queue<F, Fut>(
        &self,
        queue: &str,
        stop: &CancellationToken,
        mut consume: F,
    ) -> Result<(), ConsumeError>
    where
        F: FnMut(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), ConsumeError>>,
    {
        let mut paused = self.paused.subscribe();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                ok = wait_paused(&mut paused, queue, false) => if !ok { return Ok(()) },
            }
            let run = stop.child_token();
            let consumer = consume(run.clone());
            tokio::pin!(consumer);
            tokio::select! {
                r = &mut consumer => return r,
                _ = wait_paused(&mut paused, queue, true) => {
                    run.cancel();
                    consumer.await?;
                }
            }
            if stop.is_cancelled() {
                return Ok(());
            }
            tracing::debug!(queue = %queue, "consumer cancelled while the queue is paused");
        }
    }
}

/// Reads the paused queues with `read` now and every [`PAUSED_POLL`] until
/// `cancel`. The consumers wait for the first read; when it fails they start
/// without it (a pause then takes effect at the first read that succeeds,
/// or with the next message), and the failure is logged once until a read
/// succeeds again.
pub(crate) async fn poll_paused<R, Fut>(
    control: Arc<Control>,
    mut read: R,
    cancel: CancellationToken,
) where
    R: FnMut() -> Fut,
    Fut: Future<Output = Result<BTreeSet<String>, String>>,
{
    // Bound first, then read, then consume: a message sent after the read
    // reaches this worker, and the consumers start only once it hears
    // aborts for the tasks they take.
    let mut listening = control.listening.subscribe();
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = listening.wait_for(|l| *l) => {}
        _ = tokio::time::sleep(LISTEN_WAIT) => {
            tracing::warn!("not listening to NS.control yet; consuming anyway");
        }
    }
    let mut failing = false;
    loop {
        let began = control.read_begins();
        match read().await {
            Ok(queues) => {
                if failing {
                    tracing::info!("paused queues read from Redis again");
                }
                failing = false;
                control.set_paused(queues, began);
            }
            Err(cause) => {
                if !failing {
                    tracing::warn!(%cause, "cannot read the paused queues from Redis; going on with what is known");
                }
                failing = true;
                control.start_without_paused();
            }
        }
        if !kairos_shared::amqp::sleep_or_cancel(PAUSED_POLL, &cancel).await {
            return;
        }
    }
}

/// Waits until `queue` is paused (`want`) or not (and the paused set was
/// read); false if the sender is gone.
async fn wait_paused(rx: &mut watch::Receiver<Paused>, queue: &str, want: bool) -> bool {
    rx.wait_for(|p| {
        if want {
            p.queues.contains(queue)
        } else {
            p.loaded && !p.queues.contains(queue)
        }
    })
    .await
    .is_ok()
}

fn op(message: &ControlMessage) -> &'static str {
    match message {
        ControlMessage::Abort { .. } => "abort",
        ControlMessage::Pause { .. } => "pause",
        ControlMessage::Resume { .. } => "resume",
    }
}

/// Runs `attempt` unless `abort` fires first; once it fired the attempt
/// gets [`ABORT_GRACE`] to return before it is dropped, and the answer is
/// `None` however it ended (an aborted task is cancelled, whatever its
/// handler made of it).
pub(crate) async fn abortable<F: Future>(
    attempt: F,
    abort: &CancellationToken,
) -> Option<F::Output> {
    tokio::pin!(attempt);
    let finished = tokio::select! {
        out = &mut attempt => Some(out),
        _ = abort.cancelled() => None,
    };
    if let Some(out) = finished {
        // A handler that returns on seeing the abort may end in the same
        // poll as the token fires: it was aborted all the same.
        return (!abort.is_cancelled()).then_some(out);
    }
    if tokio::time::timeout(ABORT_GRACE, attempt).await.is_err() {
        tracing::warn!(
            grace_ms = ABORT_GRACE.as_millis() as u64,
            "aborted handler did not return within the grace; dropped"
        );
    }
    None
}

/// The supervised loop that consumes this worker's queue on `NS.control`.
pub(crate) struct ControlListener {
    broker: Broker,
    names: Names,
    control: Arc<Control>,
}

impl ControlListener {
    pub(crate) fn new(broker: Broker, names: Names, control: Arc<Control>) -> Self {
        ControlListener {
            broker,
            names,
            control,
        }
    }
}

/// Why the control listener's session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ListenError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker cancelled the control consumer")]
    Cancelled,
}

impl Supervised for ControlListener {
    type Conn = lapin::Connection;
    type Error = ListenError;

    fn name(&self) -> &'static str {
        "control"
    }

    fn restart(&self) -> Restart {
        Restart::Reconnect("control listener")
    }

    async fn connect(&mut self, cancel: &CancellationToken) -> Option<lapin::Connection> {
        connect_with_retry(&self.broker, "kairos-worker-control", cancel).await
    }

    async fn session(
        &mut self,
        conn: &mut lapin::Connection,
        cancel: &CancellationToken,
    ) -> Result<(), ListenError> {
        use futures_util::StreamExt;
        let channel = conn.create_channel().await?;
        topology::declare_base(&channel, &self.names).await?;
        let queue = control::listen(&channel, &self.names).await?;
        // No acks: a control message is acted on at once, and one lost
        // with the connection is made up for by the paused set in Redis
        // (an abort is simply asked again).
        let mut consumer = channel
            .basic_consume(
                queue,
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        self.control.listening.send_replace(true);
        loop {
            let delivery = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                d = consumer.next() => d,
            };
            let delivery = delivery.ok_or(ListenError::Cancelled)??;
            match ControlMessage::decode(&delivery.data) {
                Ok(message) => self.control.apply(message),
                Err(err) => {
                    tracing::warn!(cause = %err, bytes = delivery.data.len(), "control message dropped");
                    metrics::counter!("kairos_worker_control_messages_total", "op" => "invalid")
                        .increment(1);
                }
            }
        }
    }

    async fn close(&mut self, conn: lapin::Connection, _failed: bool) {
        close_connection(&conn, "bye", CLOSE_WITHIN).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn abort_cancels_every_running_attempt_of_the_id_only() {
        let control = Control::new(&["q".to_string()]);
        let a = control.register("t-1");
        let b = control.register("t-1");
        let other = control.register("t-2");
        control.apply(ControlMessage::Abort { id: "t-1".into() });
        assert!(a.token().is_cancelled() && b.token().is_cancelled());
        assert!(!other.token().is_cancelled());
        drop((a, b));
        assert!(!control.lock_running().contains_key("t-1"));
        // Aborting what no longer runs here does nothing.
        control.apply(ControlMessage::Abort { id: "t-1".into() });
    }

    #[tokio::test]
    async fn an_aborted_attempt_gets_the_grace_then_is_dropped() {
        let token = CancellationToken::new();
        token.cancel();
        let started = tokio::time::Instant::now();
        let out = abortable(std::future::pending::<()>(), &token).await;
        assert_eq!(out, None);
        assert!(started.elapsed() >= ABORT_GRACE);
        let fresh = CancellationToken::new();
        assert_eq!(abortable(async { 7 }, &fresh).await, Some(7));
        // A handler that returns because it saw the abort is aborted.
        let seen = CancellationToken::new();
        let handler = {
            let seen = seen.clone();
            async move {
                seen.cancelled().await;
                7
            }
        };
        seen.cancel();
        assert_eq!(abortable(handler, &seen).await, None);
    }

    #[test]
    fn a_read_older_than_a_message_does_not_undo_it() {
        let control = Control::new(&[]);
        let began = control.read_begins();
        control.apply(ControlMessage::Pause { queue: "q".into() });
        control.set_paused(BTreeSet::new(), began);
        assert!(control.is_paused("q"));
        let began = control.read_begins();
        control.set_paused(BTreeSet::new(), began);
        assert!(!control.is_paused("q"));
    }

    #[tokio::test]
    async fn a_paused_queue_stops_its_consumer_and_a_resume_starts_it_again() {
        let control = Control::new(&["q".to_string()]);
        let stop = CancellationToken::new();
        let (runs_tx, mut runs) = tokio::sync::mpsc::unbounded_channel();
        let serve = {
            let (control, stop) = (control.clone(), stop.clone());
            tokio::spawn(async move {
                control
                    .serve_queue("q", &stop, |run| {
                        let runs_tx = runs_tx.clone();
                        async move {
                            let _ = runs_tx.send("start");
                            run.cancelled().await;
                            let _ = runs_tx.send("stop");
                            Ok(())
                        }
                    })
                    .await
            })
        };
        // Nothing starts before the paused set is known.
        tokio::task::yield_now().await;
        assert!(runs.try_recv().is_err());
        let began = control.read_begins();
        control.set_paused(BTreeSet::from(["q".to_string()]), began);
        tokio::task::yield_now().await;
        assert!(runs.try_recv().is_err(), "paused at start");
        control.apply(ControlMessage::Resume { queue: "q".into() });
        assert_eq!(runs.recv().await, Some("start"));
        control.apply(ControlMessage::Pause { queue: "q".into() });
        assert_eq!(runs.recv().await, Some("stop"));
        control.apply(ControlMessage::Resume { queue: "q".into() });
        assert_eq!(runs.recv().await, Some("start"));
        stop.cancel();
        assert_eq!(runs.recv().await, Some("stop"));
        serve.await.unwrap().unwrap();
    }
}
