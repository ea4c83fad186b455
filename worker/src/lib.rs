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
//! A handler may also return a result, ask for its own retry delay, enqueue
//! follow-up tasks, report progress and save checkpoints: see
//! [`TaskContext`], [`TaskOutput`], [`TaskError::retry_after`] and
//! docs/HANDLERS.md.
//!
//! * `handler`: the handler trait, its context and errors, the registry.
//! * `consumer`: one consumer per queue, bounded by the `slots` (tasks at
//!   once) and the `capacity` (resource units, `x-cost`).
//! * `disposition`: ack, retry or dead-letter, in one place.
//! * `builtin`: `kairos.noop`, `kairos.sleep`, `kairos.fail`, `kairos.count`.
//! * `control`: what `NS.control` says: abort a running task (its handler
//!   sees `ctx.cancelled()`), pause or resume a queue.
//! * `task_io`: what a handler's context reaches: the client, progress,
//!   checkpoints.
//! * `session`: one AMQP session: the consumers of every queue and the
//!   tasks they run, finished (acked) before the connection closes.
//! * `prefetch`: each consumer's prefetch, following the pool of slots.
//! * `http`: `/healthz`, `/readyz` and `/metrics` on
//!   `KAIROS_WORKER_HTTP_ADDR`.

// Every public item is documented, and nothing is public that no other
// crate can reach (issue 15).
#![warn(missing_docs, unreachable_pub)]

mod acks;
mod bands;
pub mod builtin;
mod capacity;
mod config;
mod consumer;
mod control;
mod disposition;
mod handler;
mod http;
mod prefetch;
mod session;
mod slots;
mod status;
mod task_io;

pub use config::Config;
pub use handler::{
    Handler, HandlerOutcome, Json, Registry, TaskContext, TaskError, TaskOutput, TaskResult,
};
pub use task_io::CheckpointError;

use control::{Control, ControlListener};
use kairos_shared::contract::Names;
use kairos_shared::events::EventSink;
use kairos_shared::redis::RedisConn;
use kairos_shared::supervise::Supervisor;
use prefetch::Consuming;
use session::AmqpSession;
use slots::Slots;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long a stopping worker waits for its last events to go out (bounded:
/// a task left running past the grace holds a sink).
const EVENTS_FLUSH: Duration = Duration::from_secs(5);

/// How often the autoscaler looks at the backlog.
const AUTOSCALE_TICK: Duration = Duration::from_millis(250);

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A worker needs at least one handler.
    #[error("no handler registered")]
    NoHandlers,
    /// A setting is wrong.
    #[error("{0}")]
    Config(String),
    /// The metrics exporter or the probes' listener could not start.
    #[error(transparent)]
    Metrics(#[from] kairos_shared::metrics::MetricsError),
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
    /// A worker with these settings and no handlers yet.
    pub fn new(config: Config) -> Self {
        Worker {
            config,
            registry: Registry::default(),
        }
    }

    /// Registers `kairos.noop`, `kairos.sleep`, `kairos.fail` and
    /// `kairos.count`.
    pub fn with_builtins(mut self) -> Self {
        builtin::register(&mut self.registry);
        self
    }

    /// Registers `handler` for tasks named `name`.
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
        let worker_id = self.config.worker_id();
        let (names, listener) = self.check(&worker_id)?;
        let work = Supervisor::new();
        let _stop = work.stop_on_drop();
        work.stop_on(shutdown);
        let events = EventSink::start(
            self.config.common.events,
            &self.config.common.broker(),
            &names,
            &work,
        )
        .with_worker(&worker_id);
        let status =
            status::WorkerStatus::start(&self.config, &work).map_err(WorkerError::Config)?;
        let slots = start_autoscale(&work, &self.config);
        let units = Arc::new(capacity::Units::new(
            self.config.capacity(),
            Duration::from_millis(self.config.capacity_reserve_ms),
        ));
        let control = start_control(&work, &self.config, &names)?;
        let consuming = Arc::new(Consuming::default());
        // Serves until `run` returns: probes answer through the shutdown.
        let http_stop = tokio_util::sync::CancellationToken::new();
        let _http_stop = http_stop.clone().drop_guard();
        if let Some(listener) = listener {
            let probes = http::Probes {
                health: work.health().clone(),
                consuming: consuming.clone(),
                control: control.clone(),
                queues: self.config.queues.clone(),
                stopping: work.cancel_token().clone(),
            };
            probes
                .serve(listener, http_stop)
                .map_err(|e| WorkerError::Config(format!("{}: {e}", http::SETTING)))?;
        }
        tracing::info!(namespace = %names.namespace(), worker = %worker_id, queues = ?self.config.queues, concurrency = %self.config.concurrency, capacity = units.capacity(), "worker starting");
        let session = AmqpSession::new(
            self.config,
            names,
            self.registry,
            events.clone(),
            status.clone(),
            slots,
            units,
            control,
            consuming,
            &work,
        );
        work.run(session).await;
        shut_down(work, events, status).await;
        Ok(())
    }

    /// Checks there are handlers and the settings, starts the metrics
    /// exporter (its series labelled `worker`) and binds the probes'
    /// address. Returns the namespace's names and the probes' listener.
    fn check(
        &self,
        worker_id: &str,
    ) -> Result<(Names, Option<std::net::TcpListener>), WorkerError> {
        if self.registry.names().next().is_none() {
            return Err(WorkerError::NoHandlers);
        }
        self.config.common.check().map_err(WorkerError::Config)?;
        let (metrics_addr, http_addr) = (self.config.common.metrics_addr, self.config.http_addr);
        if metrics_addr.is_some() || http_addr.is_some() {
            kairos_shared::metrics::label_process("worker", worker_id);
        }
        if let Some(addr) = metrics_addr {
            kairos_shared::metrics::install(addr)?;
        }
        let listener = match http_addr {
            Some(addr) => {
                // Its /metrics records only with the recorder installed.
                kairos_shared::metrics::recorder();
                Some(kairos_shared::metrics::bind(http::SETTING, addr)?)
            }
            None => None,
        };
        Ok((self.config.common.names(), listener))
    }
}

/// The slots tasks run in, sized by the supervised autoscaler (a failed
/// autoscaler would leave the concurrency where it stood).
fn start_autoscale(work: &Supervisor, config: &Config) -> Arc<Slots> {
    let slots = Slots::new(config.concurrency);
    let scaled = slots.clone();
    work.start_loop("autoscale", move |cancel| {
        let run = scaled.clone().autoscale(AUTOSCALE_TICK, cancel);
        async move {
            run.await;
            Ok(())
        }
    });
    slots
}

/// Aborts and paused queues: the supervised listener on `NS.control`, and
/// the paused set read from Redis (`NS:paused`) at start and every
/// `control::PAUSED_POLL`, on a connection of its own.
fn start_control(
    work: &Supervisor,
    config: &Config,
    names: &Names,
) -> Result<Arc<Control>, WorkerError> {
    let control = Control::new(&config.queues);
    let pool = kairos_shared::redis::redis_pool(
        &config.redis_url,
        &config.common.tls,
        Duration::from_millis(config.redis_timeout_ms),
    )
    .map_err(|e| WorkerError::Config(format!("KAIROS_REDIS_URL: {e}")))?;
    let redis = RedisConn::new(pool);
    let key = kairos_shared::control::paused_key(names);
    let polled = control.clone();
    work.start_loop("paused_queues", move |cancel| {
        let (redis, key) = (redis.clone(), key.clone());
        let read = move || {
            let (redis, key) = (redis.clone(), key.clone());
            async move {
                let mut con = redis.get().await.map_err(|e| e.to_string())?;
                redis
                    .watch(
                        redis::cmd("SMEMBERS")
                            .arg(&key)
                            .query_async::<BTreeSet<String>>(&mut con)
                            .await,
                    )
                    .map_err(|e| e.to_string())
            }
        };
        let poll = control::poll_paused(polled.clone(), read, cancel);
        async move {
            poll.await;
            Ok(())
        }
    });
    work.start(ControlListener::new(
        config.common.broker(),
        names.clone(),
        control.clone(),
    ));
    Ok(control)
}

/// Waits for the rest of the background work (the autoscaler, sessions that
/// ended early finishing their running tasks), then sends the last tasks'
/// `succeeded` events before the process exits.
async fn shut_down(work: Supervisor, events: EventSink, status: status::WorkerStatus) {
    work.wait().await;
    events.close(EVENTS_FLUSH).await;
    status.close().await;
    tracing::info!("worker stopped");
}
