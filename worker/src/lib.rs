//! # kairos-worker
//!
//! Runs tasks from the contract's priority queues. Use it as a library to
//! register your own handlers:
//!
//! ```no_run
//! use kairos_worker::{Config, TaskContext, TaskError, Worker};
//!
//! async fn send_email(ctx: TaskContext, body: Vec<u8>) -> Result<(), TaskError> {
//!     let _ = (ctx.id, body);
//!     Ok(())
//! }
//!
//! # async fn demo() -> Result<(), kairos_worker::WorkerError> {
//! Worker::new(Config::for_namespace("kairos"))
//!     .with_builtins()
//!     .handler("email.send", send_email)
//!     .run(kairos_shared::shutdown::signal())
//!     .await
//! # }
//! ```
//!
//! * `handler`: the handler trait, its context and errors, the registry.
//! * `consumer`: one consumer per queue, bounded by the `slots`.
//! * `disposition`: ack, retry or dead-letter, in one place.
//! * `builtin`: `kairos.noop`, `kairos.sleep`, `kairos.fail`.

pub mod acks;
pub mod builtin;
pub mod config;
pub mod consumer;
pub mod disposition;
pub mod handler;
pub mod slots;

pub use config::Config;
pub use handler::{Handler, Registry, TaskContext, TaskError, TaskResult};

use acks::Acks;
use consumer::{consume, ConsumeError, Shared};
use disposition::Disposition;
use kairos_shared::amqp::{close_connection, connect_with_retry, sleep_or_cancel, Backoff};
use kairos_shared::events::EventSink;
use kairos_shared::topology;
use slots::Slots;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The longest wait for the broker to confirm a connection close.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("no handler registered")]
    NoHandlers,
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Metrics(String),
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("{0}")]
    Consume(#[from] ConsumeError),
    #[error("{0}")]
    Declare(#[from] kairos_shared::topology::DeclareError),
    #[error("a delivery could not be settled")]
    Broken,
}

/// Runs `kairos-worker`: the built-in handlers only.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    Worker::new(config).with_builtins().run(shutdown).await
}

/// A worker being assembled: settings plus handlers.
pub struct Worker {
    config: Config,
    registry: Registry,
}

impl Worker {
    pub fn new(config: Config) -> Self {
        Worker {
            config,
            registry: Registry::default(),
        }
    }

    /// Registers `kairos.noop`, `kairos.sleep` and `kairos.fail`.
    pub fn with_builtins(mut self) -> Self {
        builtin::register(&mut self.registry);
        self
    }

    pub fn handler(mut self, name: impl Into<String>, handler: impl Handler) -> Self {
        self.registry.register(name, handler);
        self
    }

    /// Runs until `shutdown` completes, reconnecting whenever the broker
    /// connection drops. On shutdown: stop taking deliveries, give running
    /// tasks the grace period, leave the rest unacked.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), WorkerError> {
        if self.registry.names().next().is_none() {
            return Err(WorkerError::NoHandlers);
        }
        self.config.common.check().map_err(WorkerError::Config)?;
        let names = self.config.common.names();
        if let Some(addr) = self.config.common.metrics_addr {
            kairos_shared::metrics::install(addr).map_err(WorkerError::Metrics)?;
        }
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            shutdown.await;
            trigger.cancel();
        });
        let config = self.config;
        let broker = config.common.broker();
        let events = EventSink::start(config.common.events, &broker, &names, cancel.clone());
        let slots = Slots::new(config.concurrency);
        // Supervised: a failed autoscaler would leave the concurrency
        // where it stood.
        let health = kairos_shared::supervise::Health::new();
        let (scaled, scale_cancel) = (slots.clone(), cancel.clone());
        kairos_shared::supervise::supervise(&health, "autoscale", cancel.clone(), move || {
            let run = scaled
                .clone()
                .autoscale(Duration::from_millis(250), scale_cancel.clone());
            async move {
                run.await;
                Ok(())
            }
        });
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        tracing::info!(namespace = %names.namespace(), queues = ?config.queues, concurrency = %config.concurrency, "worker starting");

        let mut backoff = Backoff::new();
        while !cancel.is_cancelled() {
            let Some(conn) = connect_with_retry(&broker, "kairos-worker", &cancel).await else {
                break;
            };
            let tracker = TaskTracker::new();
            let broken = CancellationToken::new();
            let abandon = CancellationToken::new();
            let started = tokio::time::Instant::now();
            // One per consumer channel; closed (the last acks flushed) once
            // the running tasks are done, however the session ended.
            let mut acks: Vec<Arc<Acks>> = Vec::new();
            // Every channel of the session, kept open until the connection
            // closed (see `finish_running`) and until the running tasks are
            // done (they ack and publish replacements on them).
            let mut channels: Vec<lapin::Channel> = Vec::new();
            let session = async {
                let channel = conn.create_channel().await?;
                channels.push(channel.clone());
                topology::declare_base(&channel, &names).await?;
                for q in &config.queues {
                    topology::declare_task_queue(&channel, &names, q).await?;
                }
                let shared = Arc::new(Shared {
                    names: names.clone(),
                    registry: self.registry.clone(),
                    disposition: Disposition::open(&conn, names.clone(), events.clone()).await?,
                    events: events.clone(),
                    slots: slots.clone(),
                    default_timeout: Duration::from_millis(config.task_timeout_ms),
                    broken: broken.clone(),
                    abandon: abandon.clone(),
                    shutdown: cancel.clone(),
                });
                channels.push(shared.disposition.channel().clone());
                tracing::info!("connected to RabbitMQ");
                let stop = CancellationToken::new();
                let prefetch = config.prefetch();
                let mut consumer_channels = Vec::with_capacity(config.queues.len());
                for _ in &config.queues {
                    let channel = conn.create_channel().await?;
                    acks.push(Acks::start(channel.clone(), broken.clone()));
                    channels.push(channel.clone());
                    consumer_channels.push(channel);
                }
                let consumers = config
                    .queues
                    .iter()
                    .zip(consumer_channels)
                    .zip(acks.clone())
                    .map(|((q, channel), acks)| {
                        let stop = stop.clone();
                        let shared = shared.clone();
                        let tracker = &tracker;
                        async move {
                            let r =
                                consume(&channel, shared, acks, q, prefetch, tracker, stop.clone())
                                    .await;
                            stop.cancel();
                            r
                        }
                    });
                let all = futures_util::future::join_all(consumers);
                tokio::pin!(all);
                // Consumers end on their own (connection lost, consumer
                // cancelled) or when told to: shutdown, or a delivery that
                // could not be settled.
                let results = tokio::select! {
                    r = &mut all => r,
                    _ = cancel.cancelled() => { stop.cancel(); all.await }
                    _ = broken.cancelled() => { stop.cancel(); all.await }
                };
                if broken.is_cancelled() {
                    return Err(SessionError::Broken);
                }
                results.into_iter().collect::<Result<Vec<()>, _>>()?;
                Ok::<(), SessionError>(())
            };
            let result = session.await;
            tracker.close();
            let finish_running = async move {
                // Let running tasks finish while the connection can still
                // ack; the session's channels stay open too.
                wait_running(&tracker, &conn, &abandon, grace).await;
                for a in &acks {
                    if let Err(err) = a.close().await {
                        tracing::warn!(cause = %err, "cannot ack the last settled deliveries; RabbitMQ redelivers them");
                    }
                }
                close_connection(&conn, "bye", CLOSE_WITHIN).await;
                // Only now: a channel dropped while the connection closes
                // closes itself at that moment, which lapin can trip over.
                drop((acks, channels));
            };
            match result {
                Ok(()) => finish_running.await,
                Err(err) => {
                    // Reconnect at once; tasks still running finish on the
                    // old connection in the background (their acks fail if
                    // it is gone, and RabbitMQ redelivers them).
                    tokio::spawn(finish_running);
                    if started.elapsed() > Duration::from_secs(10) {
                        backoff.reset();
                    }
                    tracing::warn!(cause = %err, "AMQP session ended; reconnecting");
                    sleep_or_cancel(backoff.next_delay(), &cancel).await;
                }
            }
        }
        // The last tasks' `succeeded` events go out before the process
        // exits (bounded: a task left running past the grace holds a sink).
        events.close(Duration::from_secs(5)).await;
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// Waits for the session's running tasks, for at most `grace`, then stops
/// those left (`abandon`). Once the connection is gone RabbitMQ has requeued
/// their deliveries and no ack can reach it: they stop at once and free
/// their slots for the next session, where a handler that never returns
/// would otherwise hold its slot for good.
async fn wait_running(
    tracker: &TaskTracker,
    conn: &lapin::Connection,
    abandon: &CancellationToken,
    grace: Duration,
) {
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        if !conn.status().connected() {
            break;
        }
        tokio::select! {
            _ = tracker.wait() => return,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(
                    running = tracker.len(),
                    "grace period over; stopping running tasks, leaving them unacked"
                );
                break;
            }
            // lapin signals a lost connection through its status only.
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    abandon.cancel();
    // A dropped handler ends at once, unless it blocks its thread.
    if tokio::time::timeout(CLOSE_WITHIN, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = tracker.len(),
            "running tasks do not stop (a handler blocks its thread)"
        );
    }
}
