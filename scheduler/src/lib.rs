//! # kairos-scheduler
//!
//! The trigger service: holds delayed and retrying tasks in the sharded Redis
//! delay queue and publishes them to RabbitMQ when they fall due.
//!
//! * `intake`: consumes `NS.delay` and `NS.retry` into the delay queue.
//! * `retry`: the backoff policy and the retry-or-dead decision.
//! * `delay_queue`: the Redis store (`scripts/*.lua`).
//! * `pump`: claims due tasks, publishes with confirms, deletes.
//! * `publisher`: the confirming AMQP channel.
//! * `wake`: cross-instance wake-ups over Redis pub/sub.
//! * `schedule`: timed triggers (model, ticks, DST, misfire plan), pure;
//!   `schedule_store` keeps them in Redis, `ticker` fires them through the
//!   delay queue, `schedule_admin` / `http` / `schedule_file` change them,
//!   `outcomes` learns what became of their occurrences.
//! * `supervisor` (in this file): one AMQP session at a time, rebuilt on
//!   failure.

pub mod config;
pub mod delay_queue;
pub mod hold;
pub mod http;
pub mod intake;
pub mod outcomes;
pub mod precise_timer;
pub mod publish_thread;
pub mod publisher;
pub mod pump;
pub mod redis_clock;
pub mod redis_conn;
pub mod retry;
pub mod schedule;
pub mod schedule_admin;
pub mod schedule_file;
pub mod schedule_store;
pub mod task_api;
pub mod ticker;
pub mod wake;

pub use config::Config;

use delay_queue::RedisDelayQueue;
use intake::{Intake, IntakeError, Source};
use kairos_shared::amqp::{close_connection, connect_with_retry, sleep_or_cancel, Backoff};
use kairos_shared::events::EventSink;
use kairos_shared::topology;
use publisher::Publisher;
use pump::{Pump, PumpError};
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
    if let Some(addr) = config.common.metrics_addr {
        kairos_shared::metrics::install(addr).map_err(SchedulerError::Metrics)?;
    }
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    let names = config.common.names();
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
    let pool = deadpool_redis::Config::from_url(&config.redis_url)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|e| SchedulerError::Redis(e.to_string()))?;
    let queue = RedisDelayQueue::new(
        pool.clone(),
        &config.common.namespace,
        usize::from(config.shards),
    );
    // Redis may still be starting: wait for it like RabbitMQ, but stop on a
    // configuration error.
    let mut backoff = Backoff::new();
    loop {
        match queue.check_shard_count().await {
            Ok(()) => break,
            Err(delay_queue::QueueError::Config(msg)) => {
                return Err(delay_queue::QueueError::Config(msg).into())
            }
            Err(err) => {
                tracing::warn!(cause = %err, "waiting for Redis");
                if !sleep_or_cancel(backoff.next_delay(), &cancel).await {
                    return Ok(());
                }
            }
        }
    }
    tokio::spawn(report_pending(queue.clone(), cancel.clone()));
    let wake = Arc::new(Notify::new());
    let redis_client = redis::Client::open(config.redis_url.as_str())
        .map_err(|e| SchedulerError::Redis(e.to_string()))?;
    let listener = tokio::spawn(wake::listen(
        redis_client,
        queue.wake_channel().to_string(),
        wake.clone(),
        cancel.clone(),
    ));
    let events = EventSink::start(
        config.common.events,
        &config.common.amqp_url,
        &names,
        cancel.clone(),
    );
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
    };
    let schedules = start_schedules(&config, &names, pool, &pump, http_listener, &cancel).await;
    tracing::info!(namespace = %names.namespace(), shards = config.shards, intake_prefetch = config.intake_prefetch_effective(), max_body_bytes = config.max_body_bytes, "scheduler starting");

    let mut backoff = Backoff::new();
    while !cancel.is_cancelled() {
        let Some(conn) =
            connect_with_retry(&config.common.amqp_url, "kairos-scheduler", &cancel).await
        else {
            break;
        };
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
                close_connection(&conn, "reconnecting", CLOSE_WITHIN).await;
                sleep_or_cancel(backoff.next_delay(), &cancel).await;
                continue;
            }
        }
        close_connection(&conn, "shutdown", CLOSE_WITHIN).await;
    }
    listener.abort();
    for task in schedules {
        let _ = task.await;
    }
    drop(pump);
    events.close(EVENTS_FLUSH).await;
    tracing::info!("scheduler stopped");
    Ok(())
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
/// outcomes consumer; each stops on `cancel`. Occurrences go to the pump's
/// delay queue, and the pump is woken when one is handed over.
async fn start_schedules(
    config: &Config,
    names: &kairos_shared::contract::Names,
    pool: deadpool_redis::Pool,
    pump: &Pump,
    http_listener: Option<tokio::net::TcpListener>,
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
    let http_cancel = cancel.clone();
    let (http_amqp_url, http_names) = (config.common.amqp_url.clone(), names.clone());
    let holder = hold::Holder {
        queue: pump.queue.with_own_connection(),
        events: pump.events.clone(),
        limits: config.limits(),
    };
    let mut tasks = vec![tokio::spawn(async move { ticker.run(tick_cancel).await })];
    if let Some(http_listener) = http_listener {
        let addr = http_listener.local_addr().ok();
        tracing::info!(addr = ?addr, "HTTP API listening");
        tasks.push(tokio::spawn(async move {
            let api = task_api::TaskApi::new(&http_amqp_url, http_names)
                .with_limits(holder.limits)
                .with_holder(holder);
            let router = http::router(admin).merge(task_api::router(api));
            let served = axum::serve(http_listener, router)
                .with_graceful_shutdown(http_cancel.cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::error!(cause = %err, "HTTP API stopped");
            }
        }));
    }
    tasks.push(tokio::spawn(outcomes::run(
        config.common.amqp_url.clone(),
        names.clone(),
        store,
        cancel.clone(),
    )));
    tasks
}

/// The scheduler's HTTP API without a server or a running scheduler: the
/// same routes over the same Redis and RabbitMQ, for `kairosctl` to call in
/// process when no scheduler address is given. Schedules changed this way
/// are picked up by running schedulers on their next look at Redis (within
/// `KAIROS_IDLE_MS`).
pub async fn local_api(config: &Config) -> Result<axum::Router, SchedulerError> {
    let names = config.common.names();
    let pool = deadpool_redis::Config::from_url(&config.redis_url)
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|e| SchedulerError::Redis(e.to_string()))?;
    let queue = RedisDelayQueue::new(pool.clone(), names.namespace(), usize::from(config.shards));
    queue.check_shard_count().await?;
    let admin = schedule_admin::Admin {
        store: schedule_store::ScheduleStore::new(pool, names.namespace(), &queue),
        changed: Arc::new(Notify::new()),
    };
    // No holder: without a running scheduler's event sink, delayed tasks go
    // through `NS.delay`, whose intake reports them.
    let tasks = task_api::TaskApi::new(&config.common.amqp_url, names).with_limits(config.limits());
    Ok(http::router(admin).merge(task_api::router(tasks)))
}
