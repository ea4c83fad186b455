//! Starting and stopping the scheduler: the steps of `run`, the AMQP
//! session, and the in-process API for kairosctl.

use crate::api::handler_io::HandlerIo;
use crate::api::{self, tasks::TaskApi};
use crate::delay::hold::Holder;
use crate::delay::intake::{Intake, IntakeError, Source};
use crate::delay::publisher::Publisher;
use crate::delay::pump::{Pump, PumpError};
use crate::delay::store::{QueueError, RedisDelayQueue};
use crate::delay::wake;
use crate::redis_io;
use crate::schedules::admin::Admin;
use crate::schedules::outcomes::Outcomes;
use crate::schedules::store::ScheduleStore;
use crate::schedules::{self, ticker};
use crate::shards::{self, Ownership, ShardSet};
use crate::Config;
use kairos_shared::amqp::{
    close_connection, connect_with_retry, sleep_or_cancel, Backoff, Blocked, Broker, CLOSE_WITHIN,
};
use kairos_shared::contract::Names;
use kairos_shared::events::EventSink;
use kairos_shared::redis::{RedisConn, RedisPool};
use kairos_shared::status::{ShardCount, StatusStore, StatusWriter};
use kairos_shared::supervise::{Restart, Supervised, Supervisor};
use kairos_shared::topology;
use lapin::Connection;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long a stopping scheduler waits for its last events to go out.
const EVENTS_FLUSH: Duration = Duration::from_secs(5);

/// How long a close waits while the broker blocks the connection: lapin
/// cannot even send the close then.
const CLOSE_WHILE_BLOCKED: Duration = Duration::from_millis(500);

/// How often the `kairos_scheduler_pending` gauge is refreshed.
const PENDING_EVERY: Duration = Duration::from_secs(5);

/// Why the scheduler could not start.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A setting is wrong.
    #[error("{0}")]
    Config(String),
    /// The Redis URL or its TLS settings are unusable.
    #[error("KAIROS_REDIS_URL: {0}")]
    Redis(#[from] redis_io::conn::RedisSetupError),
    /// The delay queue refused the settings (shard count, eviction policy)
    /// or failed.
    #[error("{0}")]
    Queue(#[from] QueueError),
    /// The metrics exporter could not start.
    #[error("{0}")]
    Metrics(#[from] kairos_shared::metrics::MetricsError),
    /// The HTTP API's address could not be bound.
    #[error("KAIROS_HTTP_ADDR: cannot listen on {addr}: {cause}")]
    Http {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        #[source]
        cause: std::io::Error,
    },
}

/// Runs the scheduler until `shutdown` completes. On shutdown, intake stops
/// taking deliveries (unacked ones return to RabbitMQ) and the pump finishes
/// the batches it claimed before returning.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SchedulerError> {
    let scheduler = Scheduler::new(config)?;
    let _stop = scheduler.work.stop_on_drop();
    scheduler.work.stop_on(shutdown);
    let http = scheduler.bind_http().await?;
    let pool = redis_pool(&scheduler.config)?;
    let queue = scheduler.delay_queue(&pool);
    if !scheduler.wait_for_redis(&queue).await? {
        return Ok(());
    }
    let wake = scheduler.start_redis_loops(&queue)?;
    let events = EventSink::start(
        scheduler.config.common.events,
        &scheduler.broker,
        &scheduler.names,
        &scheduler.work,
    );
    let status = scheduler.status_writer(&pool);
    let pump = scheduler.pump(&queue, &events, &status, wake);
    scheduler.start_schedules(pool, &pump, http).await;
    scheduler.run_sessions(queue, pump).await;
    scheduler.shut_down(events, status).await;
    Ok(())
}

/// The scheduler while it starts and runs: its settings and its
/// background work.
struct Scheduler {
    config: Config,
    names: Names,
    broker: Broker,
    work: Supervisor,
}

impl Scheduler {
    /// Checks the settings and starts the metrics exporter.
    fn new(config: Config) -> Result<Self, SchedulerError> {
        config.common.check().map_err(SchedulerError::Config)?;
        config
            .check_api_exposure()
            .map_err(SchedulerError::Config)?;
        // Recorded from the start, served at `/metrics` on the HTTP API.
        let _ = kairos_shared::metrics::recorder();
        if let Some(addr) = config.common.metrics_addr {
            kairos_shared::metrics::install(addr)?;
        }
        Ok(Scheduler {
            names: config.common.names(),
            broker: config.common.broker(),
            config,
            work: Supervisor::new(),
        })
    }

    /// Binds the HTTP API's address first: a taken address is a
    /// configuration error, reported at once rather than after waiting for
    /// Redis. Only the default address may be taken (a second scheduler on
    /// one host): then the scheduler runs without the API (`None`).
    async fn bind_http(&self) -> Result<Option<TcpListener>, SchedulerError> {
        let addr = self.config.http_addr;
        match TcpListener::bind(addr).await {
            Ok(listener) => Ok(Some(listener)),
            Err(cause) if self.config.http_addr_required => {
                Err(SchedulerError::Http { addr, cause })
            }
            Err(cause) => {
                tracing::warn!(%addr, %cause, "default KAIROS_HTTP_ADDR is taken; running without the HTTP API (set KAIROS_HTTP_ADDR to serve it)");
                Ok(None)
            }
        }
    }

    /// The delay queue on `pool`, with the settings' replica wait and
    /// timeouts. Its claims (and the ticker's reads) start with no shard:
    /// the ownership loop fills its serve set ([`start_ownership`]).
    fn delay_queue(&self, pool: &RedisPool) -> RedisDelayQueue {
        let c = &self.config;
        let shards = usize::from(c.shards);
        RedisDelayQueue::new(pool.clone(), &c.common.namespace, shards)
            .serving(Arc::new(ShardSet::none(shards)))
            .with_replica_wait(
                c.redis_wait,
                Duration::from_millis(c.redis_wait_timeout_ms),
                Duration::from_millis(c.redis_timeout_ms),
            )
    }

    /// Waits until Redis answers and agrees with the settings (shard
    /// count, eviction policy): Redis may still be starting, so it is
    /// waited for like RabbitMQ, but a configuration error stops the
    /// scheduler. `false` when shutdown came first.
    async fn wait_for_redis(&self, queue: &RedisDelayQueue) -> Result<bool, SchedulerError> {
        let mut backoff = Backoff::new();
        loop {
            let checked = match queue.check_shard_count().await {
                Ok(()) => {
                    let allow = self.config.redis_allow_eviction;
                    redis_io::setup::check_eviction_policy(queue.redis(), allow).await
                }
                Err(err) => Err(err),
            };
            match checked {
                Ok(()) => return Ok(true),
                Err(QueueError::Config(msg)) => return Err(QueueError::Config(msg).into()),
                Err(err) => {
                    let cause = err.to_string();
                    tracing::warn!(%cause, hint = kairos_shared::tls::hint(&cause), "waiting for Redis");
                    if !sleep_or_cancel(backoff.next_delay(), self.work.cancel_token()).await {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Starts the loops that watch Redis: the pending and due-soon gauges
    /// and the wake listener. Returns what the listener notifies: the pump's wake-up.
    fn start_redis_loops(&self, queue: &RedisDelayQueue) -> Result<Arc<Notify>, SchedulerError> {
        let pending = queue.clone();
        self.work.start_loop("report_pending", move |cancel| {
            let queue = pending.clone();
            async move {
                report_pending(queue, cancel).await;
                Ok(())
            }
        });
        crate::due_soon::start(&self.work, &self.config, queue);
        let wake = Arc::new(Notify::new());
        let client = redis_io::conn::client(&self.config.redis_url, &self.config.common.tls)
            .map_err(redis_io::conn::RedisSetupError::Client)?;
        let (channel, notify) = (queue.wake_channel().to_string(), wake.clone());
        self.work.start_loop("wake", move |cancel| {
            let listen = wake::listen(client.clone(), channel.clone(), notify.clone(), cancel);
            async move {
                listen.await;
                Ok(())
            }
        });
        Ok(wake)
    }

    /// The task status writer (off with `KAIROS_STATUS=false`), on a
    /// Redis connection of its own.
    fn status_writer(&self, pool: &RedisPool) -> StatusWriter {
        StatusWriter::start(
            &self.config.status,
            RedisConn::new(pool.clone()),
            self.names.namespace(),
            ShardCount::known(usize::from(self.config.shards)),
            &self.work,
        )
    }

    /// The pump, on a Redis connection of its own: its claims and
    /// completions run every few ms under load, not behind an intake batch
    /// on the same socket.
    fn pump(
        &self,
        queue: &RedisDelayQueue,
        events: &EventSink,
        status: &StatusWriter,
        wake: Arc<Notify>,
    ) -> Pump {
        let c = &self.config;
        Pump {
            queue: queue.with_own_connection(),
            events: events.clone(),
            status: status.clone(),
            wake,
            batch: usize::from(c.batch),
            batch_bytes: bytes(c.claim_batch_bytes),
            lease_ms: c.lease_ms,
            idle: Duration::from_millis(c.idle_ms),
            refusals: Default::default(),
        }
    }

    /// Syncs the schedule file, then starts the ticker, the HTTP API and
    /// the outcomes consumer. Occurrences go to the pump's delay queue, and
    /// the pump is woken when one is handed over.
    async fn start_schedules(&self, pool: RedisPool, pump: &Pump, http: Option<TcpListener>) {
        let redis = pool.clone();
        let store = ScheduleStore::new(pool.clone(), self.names.namespace(), &pump.queue);
        let changed = Arc::new(Notify::new());
        let admin = Admin {
            store: store.clone(),
            changed: changed.clone(),
        };
        if let Some(path) = &self.config.schedule_file {
            schedules::file::sync(&admin, path).await;
        }
        self.start_ownership(&pool, pump, changed.clone());
        self.start_ticker(store.clone(), pump, changed);
        if let Some(listener) = http {
            let io = handler_io(&self.config, pool);
            self.start_http(listener, admin, pump, io, redis);
        }
        self.work.start(Outcomes {
            broker: self.broker.clone(),
            names: self.names.clone(),
            store,
        });
    }

    /// Starts the ownership loop (supervised as `shard_ownership`): it keeps
    /// the pump's serve set (shared with the ticker's store) to the shards
    /// this instance holds, and wakes the pump and the ticker (`changed`)
    /// when it gains one.
    fn start_ownership(&self, pool: &RedisPool, pump: &Pump, changed: Arc<Notify>) {
        let queue = &pump.queue;
        let ownership = Ownership::new(
            RedisConn::new(pool.clone()),
            self.names.namespace(),
            queue.shard_count(),
            shards::lease::instance_id(queue.claimer()),
            self.config.shard_lease_ms,
            queue.serve_set().clone(),
        )
        .waking(pump.wake.clone())
        .waking(changed);
        tracing::info!(instance = %ownership.id(), lease_ms = self.config.shard_lease_ms, "splitting the shards with the other schedulers");
        self.work.start_loop("shard_ownership", move |cancel| {
            let ownership = ownership.clone();
            async move {
                ownership.run(cancel).await;
                Ok(())
            }
        });
    }

    /// Starts the ticker: it fires the schedules of `store`, and looks
    /// again at once when `changed` is notified.
    fn start_ticker(&self, store: ScheduleStore, pump: &Pump, changed: Arc<Notify>) {
        let c = &self.config;
        let ticker = ticker::Ticker {
            store,
            events: pump.events.clone(),
            status: pump.status.clone(),
            pump_wake: pump.wake.clone(),
            changed,
            lookahead_ms: c.schedule_lookahead_ms as i64,
            grace_ms: c.schedule_grace_ms as i64,
            batch: usize::from(c.batch).min(ticker::MAX_SCHEDULES_PER_SHARD),
            idle: Duration::from_millis(c.idle_ms),
            parsed: Default::default(),
        };
        self.work.start_loop("ticker", move |cancel| {
            let ticker = ticker.clone();
            async move {
                ticker.run(cancel).await;
                Ok(())
            }
        });
    }

    /// Starts the HTTP API on `listener`. Delayed tasks it takes go
    /// straight into the delay queue (the pump's, on a connection of their
    /// own).
    fn start_http(
        &self,
        listener: TcpListener,
        admin: Admin,
        pump: &Pump,
        io: HandlerIo,
        redis: RedisPool,
    ) {
        tracing::info!(addr = ?listener.local_addr().ok(), "HTTP API listening");
        let holder = Holder {
            queue: pump.queue.with_own_connection(),
            events: pump.events.clone(),
            status: pump.status.clone(),
            limits: self.config.limits(),
        };
        let tasks = TaskApi::new(self.broker.clone(), self.names.clone())
            .with_limits(holder.limits)
            .with_holder(holder);
        let probes = api::probes::Probes::new(
            self.work.health().clone(),
            redis.clone(),
            self.broker.clone(),
            self.work.cancel_token().clone(),
        );
        let events = api::events::EventStreams::new(
            self.broker.clone(),
            self.names.clone(),
            self.work.cancel_token().clone(),
        );
        let status = api::status::StatusApi::new(
            redis,
            self.names.namespace(),
            usize::from(self.config.shards),
            &self.config.status,
        );
        let control = api::control::ControlApi::new(
            self.broker.clone(),
            self.names.clone(),
            pump.queue.redis().separate(),
            pump.queue.shard_count(),
            status.clone(),
        );
        let router = api::router(
            admin,
            tasks,
            status,
            Some(probes),
            Some(events),
            io,
            control,
            self.config.api_token.clone(),
        );
        // The first run serves the listener bound at start; a restart
        // binds the same address again.
        let first = Mutex::new(Some(listener));
        let addr = self.config.http_addr;
        self.work.start_loop("http", move |cancel| {
            let listener = first.lock().ok().and_then(|mut l| l.take());
            serve(router.clone(), listener, addr, cancel)
        });
    }

    /// Runs AMQP sessions (intake and pump) until shutdown, reconnecting
    /// whenever one ends early.
    async fn run_sessions(&self, queue: RedisDelayQueue, pump: Pump) {
        let c = &self.config;
        tracing::info!(namespace = %self.names.namespace(), shards = c.shards, intake_prefetch = c.intake_prefetch_effective(), max_body_bytes = c.max_body_bytes, "scheduler starting");
        let session = AmqpSession {
            config: c.clone(),
            names: self.names.clone(),
            broker: self.broker.clone(),
            queue,
            pump,
        };
        self.work.run(session).await;
    }

    /// Waits for the background loops to stop, then for the last events
    /// and statuses to go out.
    async fn shut_down(self, events: EventSink, status: StatusWriter) {
        self.work.wait().await;
        events.close(EVENTS_FLUSH).await;
        status.close(EVENTS_FLUSH).await;
        tracing::info!("scheduler stopped");
    }
}

/// Serves `router` until `cancel`: on `listener` when given (the first
/// run), else on `addr` bound again (a restart).
async fn serve(
    router: axum::Router,
    listener: Option<TcpListener>,
    addr: SocketAddr,
    cancel: CancellationToken,
) -> Result<(), String> {
    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
        .map_err(|e| format!("HTTP API stopped: {e}"))
}

/// Why an AMQP session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("intake: {0}")]
    Intake(#[from] IntakeError),
    #[error("pump: {0}")]
    Pump(#[from] PumpError),
}

/// The scheduler's AMQP session, supervised as `amqp_session`: the two
/// intakes (`NS.delay`, `NS.retry`) and the pump on one connection.
struct AmqpSession {
    config: Config,
    names: Names,
    broker: Broker,
    queue: RedisDelayQueue,
    pump: Pump,
}

impl Supervised for AmqpSession {
    /// A blocked connection writes nothing, not even its close: the close
    /// is then not waited for long (see [`close_within`]).
    type Conn = (Connection, Blocked);
    type Error = SessionError;

    fn name(&self) -> &'static str {
        "amqp_session"
    }

    fn restart(&self) -> Restart {
        Restart::Reconnect("AMQP session")
    }

    async fn connect(&mut self, cancel: &CancellationToken) -> Option<(Connection, Blocked)> {
        let conn = connect_with_retry(&self.broker, "kairos-scheduler", cancel).await?;
        let blocked = Blocked::watch(&conn);
        Some((conn, blocked))
    }

    /// Declares the topology, then runs both intakes and the pump until
    /// shutdown or until one of them fails. Each stops when another fails;
    /// the pump then still finishes the batches it claimed.
    async fn session(
        &mut self,
        (conn, _): &mut (Connection, Blocked),
        cancel: &CancellationToken,
    ) -> Result<(), SessionError> {
        let channel = conn.create_channel().await?;
        topology::declare_base(&channel, &self.names).await?;
        let publisher = Arc::new(Publisher::open(conn, self.names.clone()).await?);
        let delay = self.intake(Source::Delay, &publisher);
        let retry = self.intake(Source::Retry, &publisher);
        tracing::info!("connected to RabbitMQ");
        let roles = cancel.child_token();
        let (a, b, c) = tokio::join!(
            until_failure(&roles, delay.run(conn, roles.clone())),
            until_failure(&roles, retry.run(conn, roles.clone())),
            until_failure(&roles, self.pump.run(publisher.clone(), roles.clone())),
        );
        a.and(b).and(c)
    }

    async fn close(&mut self, (conn, blocked): (Connection, Blocked), failed: bool) {
        let reason = if failed { "reconnecting" } else { "shutdown" };
        close_connection(&conn, reason, close_within(&blocked)).await;
    }
}

impl AmqpSession {
    /// The intake of `source`, publishing dead letters with `publisher`.
    fn intake(&self, source: Source, publisher: &Arc<Publisher>) -> Intake {
        let c = &self.config;
        Intake {
            source,
            names: self.names.clone(),
            queue: self.queue.clone(),
            publisher: publisher.clone(),
            policy: c.retry_policy(),
            events: self.pump.events.clone(),
            status: self.pump.status.clone(),
            wake: self.pump.wake.clone(),
            prefetch: c.intake_prefetch_effective(),
            batch: usize::from(c.batch),
            batch_bytes: bytes(c.intake_batch_bytes),
            limits: c.limits(),
        }
    }
}

/// Runs one role of a session; when it fails, `roles` is cancelled so the
/// session's other roles stop too.
async fn until_failure<E: Into<SessionError>>(
    roles: &CancellationToken,
    role: impl Future<Output = Result<(), E>>,
) -> Result<(), SessionError> {
    let outcome = role.await.map_err(Into::into);
    if outcome.is_err() {
        roles.cancel();
    }
    outcome
}

/// How long to wait for the broker to confirm a close: not long while it
/// blocks the connection, as lapin cannot even send the close then.
fn close_within(blocked: &Blocked) -> Duration {
    if blocked.is_blocked() {
        CLOSE_WHILE_BLOCKED
    } else {
        CLOSE_WITHIN
    }
}

/// A byte setting as a size on this host.
fn bytes(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Keeps the `kairos_scheduler_pending` gauge (tasks waiting or leased in
/// the delay queue) fresh.
async fn report_pending(queue: RedisDelayQueue, cancel: CancellationToken) {
    loop {
        if let Ok(n) = queue.pending().await {
            metrics::gauge!("kairos_scheduler_pending").set(n as f64);
        }
        if !sleep_or_cancel(PENDING_EVERY, &cancel).await {
            return;
        }
    }
}

/// The scheduler's HTTP API without a server or a running scheduler: the
/// same routes over the same Redis and RabbitMQ, for `kairosctl` to call in
/// process when no scheduler address is given. Schedules changed this way
/// are picked up by running schedulers on their next look at Redis (within
/// `KAIROS_IDLE_MS`).
pub async fn local_api(config: &Config) -> Result<axum::Router, SchedulerError> {
    config.common.check().map_err(SchedulerError::Config)?;
    let names = config.common.names();
    let pool = redis_pool(config)?;
    let queue = RedisDelayQueue::new(pool.clone(), names.namespace(), usize::from(config.shards));
    queue.check_shard_count().await?;
    let status = api::status::StatusApi::new(
        pool.clone(),
        names.namespace(),
        usize::from(config.shards),
        &config.status,
    );
    let io = handler_io(config, pool.clone());
    let admin = Admin {
        store: ScheduleStore::new(pool, names.namespace(), &queue),
        changed: Arc::new(Notify::new()),
    };
    let control = api::control::ControlApi::new(
        config.common.broker(),
        names.clone(),
        queue.redis().separate(),
        queue.shard_count(),
        status.clone(),
    );
    // No holder: without a running scheduler's event sink, delayed tasks go
    // through `NS.delay`, whose intake reports them.
    let tasks = TaskApi::new(config.common.broker(), names).with_limits(config.limits());
    // In process, nobody else can call it: no token, but the same checks
    // of what is sent.
    Ok(api::router(
        admin, tasks, status, None, None, io, control, None,
    ))
}

/// What the handler routes (`/v1/tasks/{id}/checkpoint|progress|result`)
/// write to: the task status store on `pool`.
fn handler_io(config: &Config, pool: RedisPool) -> HandlerIo {
    let store = StatusStore::new(
        RedisConn::new(pool),
        &config.common.namespace,
        ShardCount::known(usize::from(config.shards)),
        config.status.status_ttl_s,
    );
    HandlerIo {
        store,
        limits: config.handler_limits,
    }
}

/// The Redis pool with `KAIROS_REDIS_TIMEOUT_MS` as its reply timeout.
fn redis_pool(config: &Config) -> Result<RedisPool, SchedulerError> {
    redis_io::conn::redis_pool(
        &config.redis_url,
        &config.common.tls,
        Duration::from_millis(config.redis_timeout_ms),
    )
    .map_err(SchedulerError::Redis)
}
