//! The consumer: takes deliveries from one task queue and runs each
//! through its handler once its resource units (`crate::capacity`) and a
//! task slot (`crate::slots`) are free. Each delivery waits for them in a
//! task of its own, so lighter deliveries behind a heavy one can start
//! while it waits; the prefetch bounds how many wait.
//!
//! If the process dies while a handler runs, the delivery is unacked and
//! RabbitMQ redelivers it to another consumer.
//!
//! A queue with priority bands (quorum mode) is consumed band by band, each
//! on a channel of its own, and its deliveries wait in a `crate::bands`
//! gate before the units and slots ([`consume_bands`]).

use crate::acks::Acks;
use crate::bands::Gate;
use crate::capacity::{OverCapacity, Units, UnitsPermit, UnitsWait};
use crate::control::{abortable, Control};
use crate::disposition::{Disposition, DispositionError};
use crate::handler::{Registry, TaskContext, TaskError};
use crate::prefetch::{ConsumerSetup, PooledConsumer};
use crate::slots::Slots;
use crate::status::WorkerStatus;
use crate::task_io::TaskIo;
use futures_util::FutureExt;
use kairos_shared::amqp::now_ms;
use kairos_shared::contract::{Names, Task};
use kairos_shared::events::{EventKind, EventSink};
use kairos_shared::metrics::seconds_between;
use kairos_shared::queue_mode::Band;
use kairos_shared::supervise::panic_text;
use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use lapin::Channel;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// What every delivery of a session shares.
pub(crate) struct Shared {
    pub(crate) names: Names,
    pub(crate) registry: Registry,
    pub(crate) disposition: Disposition,
    pub(crate) events: EventSink,
    /// Task status: the writer, and the store handlers' checkpoints,
    /// progress and results go through.
    pub(crate) status: WorkerStatus,
    pub(crate) slots: Arc<Slots>,
    /// The worker's resource units (`x-cost`, `KAIROS_CAPACITY`).
    pub(crate) units: Arc<Units>,
    /// Time limit of an attempt without `x-timeout-ms`.
    pub(crate) default_timeout: Duration,
    /// `KAIROS_BAND_STARVATION_LIMIT`, for queues with priority bands.
    pub(crate) band_starvation_limit: u32,
    /// Fired when an ack or a replacement publish failed: the session must
    /// reconnect (its channel is gone, deliveries will come back).
    pub(crate) broken: CancellationToken,
    /// Fired when the session's running tasks must stop: its connection
    /// is gone (RabbitMQ has requeued their deliveries already) or the
    /// grace period is over. Their handlers are dropped and their slots
    /// freed, so a handler that never returns cannot hold a slot the next
    /// session needs.
    pub(crate) abandon: CancellationToken,
    /// The worker is stopping: pauses end early.
    pub(crate) shutdown: CancellationToken,
    /// Running attempts by task id, for aborts (`crate::control`).
    pub(crate) control: Arc<Control>,
    /// What handlers reach through their context (a client...).
    pub(crate) io: TaskIo,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsumeError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker cancelled the consumer of {0}")]
    Cancelled(String),
    /// `KAIROS_QUEUES` is checked at start; a worker built in code with a
    /// name that cannot be a queue name gets this.
    #[error("KAIROS_QUEUES: {0}")]
    BadQueue(#[from] kairos_shared::contract::ProtocolError),
}

/// One band's consumer channel and the acks of its deliveries.
pub(crate) struct BandChannel {
    pub(crate) band: Band,
    pub(crate) channel: Channel,
    pub(crate) acks: Arc<Acks>,
}

/// Consumes every band queue of `queue` (`NS.q.QUEUE`, `.p4`, `.p7`), each
/// on its own channel, until `stop` fires or one of them ends; the others
/// then stop too. Their deliveries wait in one gate, which starts them band
/// first without starving the lower bands (`crate::bands`).
///
/// Each band consumer has the prefetch of a single queue (the pool's, or
/// `KAIROS_PREFETCH`): so a high-band delivery can arrive while the low
/// band's window is full of waiting deliveries, which is the point of the
/// bands. The worker then holds at most three prefetch windows for this
/// queue (running tasks included): each window is bounded by the pool
/// (`crate::prefetch`), so what one worker hides from the others stays a
/// small multiple of what it can run.
pub(crate) async fn consume_bands(
    bands: &[BandChannel],
    shared: Arc<Shared>,
    queue: &str,
    setup: &ConsumerSetup,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> Result<(), ConsumeError> {
    let gate = Gate::new(queue, shared.band_starvation_limit);
    // Ends every band's consumer and the dispatcher when one of them ends
    // (the session then starts again) or on `stop`.
    let run = stop.child_token();
    let dispatch = gate
        .clone()
        .dispatch(shared.units.clone(), shared.slots.clone(), run.clone());
    let consumers = bands.iter().map(|b| {
        let (shared, gate, run) = (shared.clone(), gate.clone(), run.clone());
        async move {
            let admit = Admit::Band(gate, b.band);
            let r = consume(
                &b.channel,
                shared,
                b.acks.clone(),
                queue,
                admit,
                setup,
                tracker,
                run.clone(),
            )
            .await;
            run.cancel();
            r
        }
    });
    let (results, ()) = tokio::join!(futures_util::future::join_all(consumers), dispatch);
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(())
}

/// How a consumer's deliveries reach the units and slots.
pub(crate) enum Admit {
    /// In delivery order, straight away: a queue without bands.
    Direct,
    /// Through the gate of the queue's bands, as deliveries of this band.
    Band(Arc<Gate>, Band),
}

/// Consumes `NS.q.QUEUE` (or, with [`Admit::Band`], that band's queue) on
/// `channel` until `stop` fires, spawning each delivery onto `tracker`,
/// where it waits for its units and a slot. On stop it cancels the
/// consumer and hands back the deliveries that had not been taken, but
/// leaves the channel open: running tasks still ack on it, and the session
/// closes it after they finished. The prefetch follows the pool unless
/// `setup` fixes it (`crate::prefetch`).
// The session's pieces, each needed here.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn consume(
    channel: &Channel,
    shared: Arc<Shared>,
    acks: Arc<Acks>,
    queue: &str,
    how: Admit,
    setup: &ConsumerSetup,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> Result<(), ConsumeError> {
    let queue_name = match &how {
        Admit::Direct => shared.names.queue_name(queue)?,
        Admit::Band(_, band) => shared.names.band_queue(queue, *band)?,
    };
    let mut consumer = PooledConsumer::start(channel, queue_name.clone(), queue, setup).await?;
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => break,
            d = consumer.next() => d,
        };
        let delivery = match delivery {
            Some(d) => d?,
            None => {
                let name = match how {
                    Admit::Direct => queue.to_string(),
                    Admit::Band(..) => queue_name.to_string(),
                };
                return Err(ConsumeError::Cancelled(name));
            }
        };
        // Registered at once, in delivery order, though it may wait for
        // units and a slot: a `multiple` ack covers every unacked tag below
        // it, so a waiting delivery must hold back the acked prefix (a
        // delivery handed back goes through `Acks::requeue`, which nacks it
        // before any ack that could cover it).
        acks.register(delivery.delivery_tag);
        // Its places in the units and slots queues are taken here, in
        // delivery order; the wait itself goes on in the delivery's own
        // task, so this loop takes further deliveries (up to the prefetch)
        // that may overtake a heavy one within the reserve bound
        // (`crate::capacity`).
        let admission = admit(&shared, queue, &how, &delivery);
        let (shared, acks, stop) = (shared.clone(), acks.clone(), stop.clone());
        let queue = queue.to_string();
        tracker.spawn(async move {
            let tag = delivery.delivery_tag;
            tokio::select! {
                _ = deliver(&shared, &acks, &queue, delivery, admission, &stop) => {}
                _ = shared.abandon.cancelled() => {
                    // Never acked: returned by the next flush (nack,
                    // requeue) before any `multiple` ack could cover it;
                    // on a lost connection RabbitMQ requeued it already.
                    acks.requeue(tag);
                    tracing::warn!(queue = %queue, "task stopped with its session; it will be redelivered");
                }
            }
        });
    }
    consumer.cancel().await?;
    // Whatever the broker had already sent goes back at once, so another
    // worker can take it while this one finishes its running tasks. These
    // were never registered: their tags are above every registered one, so
    // no `multiple` ack covers them.
    for d in consumer.buffered() {
        requeue(&d).await;
    }
    Ok(())
}

async fn requeue(d: &Delivery) {
    let _ = d
        .acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await;
}

/// What a delivery needs before it can run, decided as it arrives.
enum Admission {
    /// Not a usable task: dead-lettered as it came.
    Unusable(String),
    /// Costs more units than the worker has: dead-lettered.
    OverCapacity(Box<Task>, OverCapacity),
    /// Waits for its units, then a slot (its places in both queues are
    /// taken already).
    Wait(Box<Task>, Admitting),
}

/// Units, then a slot: what a delivery holds while it runs.
pub(crate) type Admitted = (UnitsPermit, OwnedSemaphorePermit);

/// The wait for a delivery's units and slot.
pub(crate) type Admitting = Pin<Box<dyn Future<Output = Admitted> + Send>>;

/// Starts the wait for units, then a slot, here in the consumer loop, up to
/// where it must wait: its places in the units queue and in the slots'
/// semaphore queue are taken now, in delivery order. Waiting only in the
/// delivery's own task would take the places in the order tokio first runs
/// those tasks, which is not the spawn order (it runs the task spawned last
/// first), and a lower-priority delivery would start ahead of a higher one
/// sent before it. The wait goes on, with the task's own waker, in that
/// task.
///
/// Units first: a delivery waiting for units holds no slot, so the slots'
/// backlog (what grows the pool) counts only tasks that more concurrency
/// would start.
pub(crate) fn start_admission(units: UnitsWait, slots: Arc<Slots>) -> Admitting {
    let mut wait = Box::pin(async move {
        let units = units.granted().await;
        (units, slots.acquire().await)
    });
    match wait.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(admitted) => Box::pin(std::future::ready(admitted)),
        Poll::Pending => wait,
    }
}

/// `queue` is the logical queue this consumer serves. It names the task's
/// queue rather than the routing key, which differs when a client published
/// straight to `NS.q.QUEUE` through the default exchange (or to a band's
/// queue).
fn admit(shared: &Shared, queue: &str, how: &Admit, delivery: &Delivery) -> Admission {
    let task = match Task::decode(queue, &delivery.properties, &delivery.data) {
        Err(err) => return Admission::Unusable(err.to_string()),
        Ok(task) => task,
    };
    let Admit::Band(gate, band) = how else {
        return admit_direct(shared, task);
    };
    let capacity = shared.units.capacity();
    if task.cost > capacity {
        let over = OverCapacity {
            cost: task.cost,
            capacity,
        };
        return Admission::OverCapacity(Box::new(task), over);
    }
    // Its place in the gate is taken here, in delivery order.
    let wait = gate.enter(*band, task.cost);
    Admission::Wait(Box::new(task), Box::pin(wait))
}

/// Takes the task's places in the units and slots queues now.
fn admit_direct(shared: &Shared, task: Task) -> Admission {
    match shared.units.request(task.cost) {
        Ok(wait) => Admission::Wait(Box::new(task), start_admission(wait, shared.slots.clone())),
        Err(over) => Admission::OverCapacity(Box::new(task), over),
    }
}

/// Disposes of a delivery that cannot run, or waits for its units and a
/// slot and runs it. A stop (shutdown, or the queue paused) before it
/// started hands it back to the queue at once.
async fn deliver(
    shared: &Shared,
    acks: &Acks,
    queue: &str,
    delivery: Delivery,
    admission: Admission,
    stop: &CancellationToken,
) {
    let tag = delivery.delivery_tag;
    let d = &shared.disposition;
    // The permits are held until the delivery is settled or handed back
    // (through a refused replacement's pause too).
    let (result, _permits) = match admission {
        Admission::Unusable(error) => (d.unusable(&delivery, acks, queue, &error).await, None),
        Admission::OverCapacity(task, over) => {
            let span = kairos_shared::trace::task_span(&task);
            let disposed = d.over_capacity(&delivery, acks, &task, over);
            (disposed.instrument(span).await, None)
        }
        Admission::Wait(task, admitted) => {
            let permits = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    // Not started: back to the queue at once (dropping the
                    // wait leaves the units and slots queues).
                    acks.requeue(tag);
                    return;
                }
                p = admitted => p,
            };
            let span = kairos_shared::trace::task_span(&task);
            let ran = run_task(shared, acks, &delivery, *task).instrument(span);
            (ran.await, Some(permits))
        }
    };
    settle_failure(shared, acks, queue, tag, result).await;
}

/// What a disposition that did not settle its delivery means for it.
async fn settle_failure(
    shared: &Shared,
    acks: &Acks,
    queue: &str,
    tag: u64,
    result: Result<(), DispositionError>,
) {
    match result {
        Ok(()) => {}
        Err(err @ DispositionError::Refused(_)) => {
            // Not a channel failure: reconnecting would change nothing.
            // Hold the delivery (and its slot and units, if it ran) a
            // while, then hand it back.
            let pause = shared.disposition.refusal_pause();
            tracing::warn!(cause = %err, retry_in_ms = pause.as_millis() as u64, "replacement refused; the delivery goes back to its queue after a pause");
            metrics::counter!("kairos_worker_replacement_refused_total", "queue" => queue.to_string())
                .increment(1);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shared.broken.cancelled() => {}
                _ = shared.shutdown.cancelled() => {}
            }
            acks.requeue(tag);
        }
        Err(err) => {
            tracing::warn!(cause = %err, "cannot settle a delivery; reconnecting so it is redelivered");
            acks.requeue(tag);
            shared.broken.cancel();
        }
    }
}

async fn run_task(
    shared: &Shared,
    acks: &Acks,
    delivery: &Delivery,
    task: Task,
) -> Result<(), DispositionError> {
    let d = &shared.disposition;
    let Some(handler) = shared.registry.get(&task.name) else {
        let error = TaskError::permanent(format!("no handler for task name {:?}", task.name));
        return d.failed(delivery, acks, &task, &error).await;
    };
    shared.events.task(EventKind::Started, &task, None, None);
    shared.status.running(&task);
    let started_ms = now_ms();
    metrics::counter!("kairos_worker_started_total", "queue" => task.queue.clone()).increment(1);
    if let Some(due) = task.run_at {
        metrics::histogram!("kairos_worker_lateness_seconds", "queue" => task.queue.clone())
            .record(seconds_between(due, started_ms));
    }
    let limit = task
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(shared.default_timeout);
    let running = shared.control.register(&task.id);
    let io = match load_checkpoint(&shared.io, &task, delivery.redelivered).await {
        Ok(checkpoint) => shared.io.for_task(checkpoint),
        Err(error) => return d.failed(delivery, acks, &task, &error).await,
    };
    let mut ctx = TaskContext::from_task(&task).with_io(io);
    ctx.timeout = limit;
    ctx.redelivered = delivery.redelivered;
    ctx.cancel = running.token().clone();
    // A panic in the handler is caught here as a failed attempt, and a
    // timeout drops (cancels) the handler's future. Running it inline rather
    // than in a task of its own saves a spawn and a wake-up per task.
    let run = AssertUnwindSafe(handler.call(ctx, task.body.clone())).catch_unwind();
    let timed = tokio::time::timeout(limit, run);
    let Some(timed) = abortable(timed, running.token()).await else {
        return d.cancelled(delivery, acks, &task).await;
    };
    let outcome = match timed {
        Ok(finished) => finished,
        Err(_) => {
            metrics::counter!("kairos_worker_timeouts_total", "queue" => task.queue.clone())
                .increment(1);
            Ok(Err(TaskError::Retry(format!(
                "timed out after {} ms",
                limit.as_millis()
            ))))
        }
    };
    metrics::histogram!("kairos_worker_task_seconds", "queue" => task.queue.clone())
        .record(seconds_between(started_ms, now_ms()));
    match outcome {
        Ok(Ok(output)) => d.succeeded(delivery, acks, &task, output).await,
        Ok(Err(error)) => d.failed(delivery, acks, &task, &error).await,
        Err(payload) => {
            let error = TaskError::retry(format!("handler panicked: {}", panic_text(payload)));
            d.failed(delivery, acks, &task, &error).await
        }
    }
}

/// The task's last checkpoint, when this attempt may follow one that saved
/// it: a retry (attempt > 1) or a redelivery (a worker died in it). A first
/// delivery of a first attempt has none and costs no Redis call. When
/// Redis cannot say, the attempt fails (and is retried) rather than start
/// over from nothing: a task that checkpoints is one that is costly to
/// redo.
async fn load_checkpoint(
    io: &TaskIo,
    task: &Task,
    redelivered: bool,
) -> Result<Option<Vec<u8>>, TaskError> {
    let Some(store) = &io.store else {
        return Ok(None);
    };
    if task.attempt <= 1 && !redelivered {
        return Ok(None);
    }
    store
        .load_checkpoint(&task.id)
        .await
        .map_err(|e| TaskError::retry(format!("cannot load the task's checkpoint: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kairos_shared::config::Concurrency;
    use std::sync::Mutex;

    #[tokio::test]
    async fn deliveries_take_slots_in_delivery_order_whatever_order_their_tasks_run() {
        let slots = Slots::new(Concurrency { min: 1, max: 1 });
        let units = Units::new(10, Duration::from_secs(1));
        let held = slots.acquire().await;
        let waits: Vec<_> = (0..3)
            .map(|_| start_admission(units.request(1).expect("fits"), slots.clone()))
            .collect();
        // Their tasks first run last delivery first.
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, wait) in waits.into_iter().enumerate().rev() {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let permits = wait.await;
                order.lock().unwrap().push(i);
                drop(permits);
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
    }
}
