//! Starting and stopping the scheduler: the steps of `run`, the AMQP session
//! and the background loops, and the in-process API for kairosctl.

use crate::api::{guard as api_guard, schedules as http, tasks as task_api};
use crate::delay::intake::{Intake, IntakeError, Source};
use crate::delay::publisher::Publisher;
use crate::delay::pump::{Pump, PumpError};
use crate::delay::store::{self as delay_queue, RedisDelayQueue};
use crate::delay::{hold, wake};
use crate::redis_io::{conn as redis_conn, setup as redis_setup};
use crate::schedules::{
    admin as schedule_admin, file as schedule_file, outcomes, store as schedule_store, ticker,
};
use crate::Config;
use kairos_shared::amqp::{
    close_connection, connect_with_retry, sleep_or_cancel, Backoff, Blocked,
};
use kairos_shared::events::EventSink;
use kairos_shared::supervise::{supervise, Health};
use kairos_shared::topology;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("intake: {0}")]
    Intake(#[from] IntakeError),
    #[error("pump: {0}")]
    Pump(#[from] PumpError),
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("{0}")]
    Config(String),
    #[error("KAIROS_REDIS_URL: {0}")]
    Redis(String),
    #[error("{0}")]
    Queue(#[from] delay_queue::QueueError),
    #[error("{0}")]
    Metrics(String),
    #[error("KAIROS_HTTP_ADDR: cannot listen on {addr}: {cause}")]
    Http {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
}

/// Runs the scheduler until `shutdown` completes. On shutdown, intake stops
/// taking deliveries (unacked ones return to RabbitMQ) and the pump finishes
/// the batches it claimed before returning.
/// How long a stopping scheduler waits for its last events to go out.
const EVENTS_FLUSH: Duration = Duration::from_secs(5);

/// The longest wait for the broker to confirm a connection close.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SchedulerError> {
    config.common.check().map_err(SchedulerError::Config)?;
    config
        .check_api_exposure()
        .map_err(SchedulerError::Config)?;
    let names = config.common.names();
    if let Some(addr) = config.common.metrics_addr {
        kairos_shared::metrics::install(addr).map_err(SchedulerError::Metrics)?;
    }
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    let health = Health::new();
    // Bind first: a taken address is a configuration error, reported at
    // once rather than after waiting for Redis. Only the default address may
    // be taken (a second scheduler on one host): then run without the API.
    let http_listener = match tokio::net::TcpListener::bind(config.http_addr).await {
        Ok(l) => Some(l),
        Err(cause) if config.http_addr_required => {
            return Err(SchedulerError::Http {
                addr: config.http_addr,
                cause,
            })
        }
        Err(cause) => {
            tracing::warn!(addr = %config.http_addr, %cause, "default KAIROS_HTTP_ADDR is taken; running without the HTTP API (set KAIROS_HTTP_ADDR to serve it)");
            None
        }
    };
    let pool = redis_pool(&config)?;
    let queue = RedisDelayQueue::new(
        pool.clone(),
        &config.common.namespace,
        usize::from(config.shards),
    )
    .with_replica_wait(
        config.redis_wait,
        Duration::from_millis(config.redis_wait_timeout_ms),
        Duration::from_millis(config.redis_timeout_ms),
    );
    // Redis may still be starting: wait for it like RabbitMQ, but stop on a
    // configuration error.
    let mut backoff = Backoff::new();
    loop {
        let checked = match queue.check_shard_count().await {
            Ok(()) => {
                redis_setup::check_eviction_policy(queue.redis(), config.redis_allow_eviction).await
            }
            Err(err) => Err(err),
        };
        match checked {
            Ok(()) => break,
            Err(delay_queue::QueueError::Config(msg)) => {
                return Err(delay_queue::QueueError::Config(msg).into())
            }
            Err(err) => {
                let cause = err.to_string();
                tracing::warn!(%cause, hint = kairos_shared::tls::hint(&cause), "waiting for Redis");
                if !sleep_or_cancel(backoff.next_delay(), &cancel).await {
                    return Ok(());
                }
            }
        }
    }
    let pending = {
        let (queue, cancel) = (queue.clone(), cancel.clone());
        supervise(&health, "report_pending", cancel.clone(), move || {
            let (queue, cancel) = (queue.clone(), cancel.clone());
            async move {
                report_pending(queue, cancel).await;
                Ok(())
            }
        })
    };
    let wake = Arc::new(Notify::new());
    let redis_client = redis_conn::client(&config.redis_url, &config.common.tls)
        .map_err(|e| SchedulerError::Redis(e.to_string()))?;
    let listener = {
        let (channel, wake, cancel) = (
            queue.wake_channel().to_string(),
            wake.clone(),
            cancel.clone(),
        );
        supervise(&health, "wake", cancel.clone(), move || {
            let (client, channel, wake, cancel) = (
                redis_client.clone(),
                channel.clone(),
                wake.clone(),
                cancel.clone(),
            );
            async move {
                wake::listen(client, channel, wake, cancel).await;
                Ok(())
            }
        })
    };
    let broker = config.common.broker();
    let events = EventSink::start(config.common.events, &broker, &names, cancel.clone());
    let pump = Pump {
        // The claims and completions run every few ms under load: not
        // behind an intake batch on the same socket.
        queue: queue.with_own_connection(),
        events: events.clone(),
        wake: wake.clone(),
        batch: usize::from(config.batch),
        batch_bytes: bytes(config.claim_batch_bytes),
        lease_ms: config.lease_ms,
        idle: Duration::from_millis(config.idle_ms),
        refusals: Default::default(),
    };
    let schedules = start_schedules(
        &config,
        &names,
        pool,
        &pump,
        http_listener,
        &health,
        &cancel,
    )
    .await;
    tracing::info!(namespace = %names.namespace(), shards = config.shards, intake_prefetch = config.intake_prefetch_effective(), max_body_bytes = config.max_body_bytes, "scheduler starting");

    let mut backoff = Backoff::new();
    while !cancel.is_cancelled() {
        let Some(conn) = connect_with_retry(&broker, "kairos-scheduler", &cancel).await else {
            break;
        };
        // A blocked connection writes nothing, not even its close: the
        // close is then not waited for long (see `close_within`).
        let blocked = Blocked::watch(&conn);
        let session = async {
            let channel = conn.create_channel().await?;
            topology::declare_base(&channel, &names).await?;
            let publisher = Arc::new(Publisher::open(&conn, names.clone()).await?);
            let make = |source| Intake {
                source,
                names: names.clone(),
                queue: queue.clone(),
                publisher: publisher.clone(),
                policy: config.retry_policy(),
                events: events.clone(),
                wake: wake.clone(),
                prefetch: config.intake_prefetch_effective(),
                batch: usize::from(config.batch),
                batch_bytes: bytes(config.intake_batch_bytes),
                limits: config.limits(),
            };
            let (delay, retry) = (make(Source::Delay), make(Source::Retry));
            tracing::info!("connected to RabbitMQ");
            health.mark_running("amqp_session");
            // Each role stops on shutdown or when another role fails; the
            // pump then still finishes the batches it claimed.
            let session_cancel = cancel.child_token();
            let stop_on_err = |r: Result<(), SessionError>| {
                if r.is_err() {
                    session_cancel.cancel();
                }
                r
            };
            let (a, b, c) = tokio::join!(
                async {
                    stop_on_err(
                        delay
                            .run(&conn, session_cancel.clone())
                            .await
                            .map_err(Into::into),
                    )
                },
                async {
                    stop_on_err(
                        retry
                            .run(&conn, session_cancel.clone())
                            .await
                            .map_err(Into::into),
                    )
                },
                async {
                    stop_on_err(
                        pump.run(publisher.clone(), session_cancel.clone())
                            .await
                            .map_err(Into::into),
                    )
                },
            );
            a.and(b).and(c)
        };
        let started = tokio::time::Instant::now();
        match session.await {
            Ok(()) => {}
            Err(err) => {
                if started.elapsed() > Duration::from_secs(10) {
                    backoff.reset();
                }
                tracing::warn!(cause = %err, "AMQP session ended; reconnecting");
                health.mark_failed("amqp_session", &err.to_string());
                close_connection(&conn, "reconnecting", close_within(&blocked)).await;
                sleep_or_cancel(backoff.next_delay(), &cancel).await;
                continue;
            }
        }
        close_connection(&conn, "shutdown", close_within(&blocked)).await;
    }
    let _ = listener.await;
    let _ = pending.await;
    for task in schedules {
        let _ = task.await;
    }
    drop(pump);
    events.close(EVENTS_FLUSH).await;
    tracing::info!("scheduler stopped");
    Ok(())
}

/// How long to wait for the broker to confirm a close: not long while it
/// blocks the connection, as lapin cannot even send the close then.
fn close_within(blocked: &Blocked) -> Duration {
    if blocked.is_blocked() {
        Duration::from_millis(500)
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
        if !sleep_or_cancel(Duration::from_secs(5), &cancel).await {
            return;
        }
    }
}

/// Syncs the schedule file, then starts the ticker, the HTTP API and the
/// outcomes consumer, each supervised; each stops on `cancel`. Occurrences
/// go to the pump's delay queue, and the pump is woken when one is handed
/// over.
async fn start_schedules(
    config: &Config,
    names: &kairos_shared::contract::Names,
    pool: deadpool_redis::Pool,
    pump: &Pump,
    http_listener: Option<tokio::net::TcpListener>,
    health: &Health,
    cancel: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let store = schedule_store::ScheduleStore::new(pool, names.namespace(), &pump.queue);
    let changed = Arc::new(Notify::new());
    let admin = schedule_admin::Admin {
        store: store.clone(),
        changed: changed.clone(),
    };
    if let Some(path) = &config.schedule_file {
        schedule_file::sync(&admin, path).await;
    }
    let ticker = ticker::Ticker {
        store: store.clone(),
        events: pump.events.clone(),
        pump_wake: pump.wake.clone(),
        changed,
        lookahead_ms: config.schedule_lookahead_ms as i64,
        grace_ms: config.schedule_grace_ms as i64,
        batch: usize::from(config.batch).min(ticker::MAX_SCHEDULES_PER_SHARD),
        idle: Duration::from_millis(config.idle_ms),
        parsed: Default::default(),
    };
    let tick_cancel = cancel.clone();
    let holder = hold::Holder {
        queue: pump.queue.with_own_connection(),
        events: pump.events.clone(),
        limits: config.limits(),
    };
    let mut tasks = vec![supervise(health, "ticker", cancel.clone(), move || {
        let (ticker, cancel) = (ticker.clone(), tick_cancel.clone());
        async move {
            ticker.run(cancel).await;
            Ok(())
        }
    })];
    if let Some(http_listener) = http_listener {
        let addr = http_listener.local_addr().ok();
        tracing::info!(addr = ?addr, "HTTP API listening");
        let api = task_api::TaskApi::new(config.common.broker(), names.clone())
            .with_limits(holder.limits)
            .with_holder(holder);
        let router = api_guard::guard(
            http::router(admin)
                .merge(task_api::router(api))
                .merge(http::probes(health.clone())),
            config.api_token.clone(),
        );
        // The first run serves the listener bound at start; a restart
        // binds the same address again.
        let first = Arc::new(std::sync::Mutex::new(Some(http_listener)));
        let (bind_addr, http_cancel) = (config.http_addr, cancel.clone());
        tasks.push(supervise(health, "http", cancel.clone(), move || {
            let (router, cancel) = (router.clone(), http_cancel.clone());
            let taken = first.lock().ok().and_then(|mut l| l.take());
            async move {
                let listener = match taken {
                    Some(l) => l,
                    None => tokio::net::TcpListener::bind(bind_addr)
                        .await
                        .map_err(|e| format!("cannot listen on {bind_addr}: {e}"))?,
                };
                axum::serve(listener, router)
                    .with_graceful_shutdown(cancel.cancelled_owned())
                    .await
                    .map_err(|e| format!("HTTP API stopped: {e}"))
            }
        }));
    }
    let (broker, names, out_cancel) = (config.common.broker(), names.clone(), cancel.clone());
    tasks.push(supervise(health, "outcomes", cancel.clone(), move || {
        let run = outcomes::run(
            broker.clone(),
            names.clone(),
            store.clone(),
            out_cancel.clone(),
        );
        async move {
            run.await;
            Ok(())
        }
    }));
    tasks
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
    let admin = schedule_admin::Admin {
        store: schedule_store::ScheduleStore::new(pool, names.namespace(), &queue),
        changed: Arc::new(Notify::new()),
    };
    // No holder: without a running scheduler's event sink, delayed tasks go
    // through `NS.delay`, whose intake reports them.
    let tasks = task_api::TaskApi::new(config.common.broker(), names).with_limits(config.limits());
    // In process, nobody else can call it: no token, but the same checks
    // of what is sent.
    Ok(api_guard::guard(
        http::router(admin).merge(task_api::router(tasks)),
        None,
    ))
}

/// The Redis pool with `KAIROS_REDIS_TIMEOUT_MS` as its reply timeout.
fn redis_pool(config: &Config) -> Result<deadpool_redis::Pool, SchedulerError> {
    redis_conn::pool(
        &config.redis_url,
        &config.common.tls,
        Duration::from_millis(config.redis_timeout_ms),
    )
    .map_err(SchedulerError::Redis)
}
