//! One AMQP session of the worker, supervised as `amqp_session`: the
//! consumers of every queue on one connection, and the tasks they run.
//!
//! A session that ends early (connection lost, a delivery that could not
//! be settled) leaves its running tasks to finish in the background on the
//! old connection while the next session connects; at shutdown they are
//! given the grace period before the connection closes.

use crate::acks::Acks;
use crate::capacity::Units;
use crate::consumer::{consume, consume_bands, Admit, BandChannel, ConsumeError, Shared};
use crate::control::Control;
use crate::disposition::Disposition;
use crate::prefetch::{ConsumerSetup, Consuming};
use crate::slots::Slots;
use crate::status::WorkerStatus;
use crate::task_io::TaskIo;
use crate::{Config, Registry};
use kairos_shared::amqp::{close_connection, connect_with_retry, Broker, CLOSE_WITHIN};
use kairos_shared::client::Enqueuer;
use kairos_shared::contract::Names;
use kairos_shared::events::EventSink;
use kairos_shared::queue_mode::QueueMode;
use kairos_shared::supervise::{Restart, Supervised, Supervisor};
use kairos_shared::topology;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often a waiting session looks whether its connection is gone:
/// lapin signals a lost connection through its status only.
const CONNECTION_POLL: Duration = Duration::from_millis(250);

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("{0}")]
    Consume(#[from] ConsumeError),
    #[error("{0}")]
    Declare(#[from] kairos_shared::topology::DeclareError),
    #[error("a delivery could not be settled")]
    Broken,
    #[error("handlers' client: {0}")]
    Client(#[from] kairos_shared::client::ClientError),
}

/// The worker's AMQP session loop.
pub(crate) struct AmqpSession {
    config: Config,
    names: Names,
    broker: Broker,
    registry: Registry,
    events: EventSink,
    /// Task status: the writer and the store.
    status: WorkerStatus,
    slots: Arc<Slots>,
    /// Resource units (`KAIROS_CAPACITY`).
    units: Arc<Units>,
    /// Aborts and paused queues (`crate::control`).
    control: Arc<Control>,
    /// The queues consumed right now, for `/readyz`.
    consuming: Arc<Consuming>,
    /// Where a session that ended early finishes its running tasks, and
    /// the worker's shutdown.
    work: Supervisor,
}

impl AmqpSession {
    /// The session loop of a worker with these settings and handlers.
    // What every session shares, handed over once at start.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Config,
        names: Names,
        registry: Registry,
        events: EventSink,
        status: WorkerStatus,
        slots: Arc<Slots>,
        units: Arc<Units>,
        control: Arc<Control>,
        consuming: Arc<Consuming>,
        work: &Supervisor,
    ) -> Self {
        AmqpSession {
            control,
            consuming,
            broker: config.common.broker(),
            config,
            names,
            registry,
            events,
            status,
            slots,
            units,
            work: work.clone(),
        }
    }

    /// Declares the topology and opens the session's consumer channels, one
    /// per queue and band (one band unless quorum mode gives the queue
    /// three), and what every delivery shares.
    async fn open(
        &self,
        s: &mut Connected,
    ) -> Result<(Arc<Shared>, Vec<Vec<BandChannel>>), SessionError> {
        let channel = s.conn.create_channel().await?;
        s.channels.push(channel.clone());
        topology::declare_base(&channel, &self.names).await?;
        for q in &self.config.queues {
            topology::declare_task_queue(&channel, &self.names, q).await?;
        }
        let disposition = Disposition::open(
            &s.conn,
            self.names.clone(),
            self.events.clone(),
            self.status.clone(),
        )
        .await?;
        s.channels.push(disposition.channel().clone());
        let client = Enqueuer::open(&s.conn, self.names.clone()).await?;
        s.channels.push(client.channel().clone());
        let shared = Arc::new(Shared {
            names: self.names.clone(),
            registry: self.registry.clone(),
            disposition,
            events: self.events.clone(),
            status: self.status.clone(),
            slots: self.slots.clone(),
            units: self.units.clone(),
            default_timeout: Duration::from_millis(self.config.task_timeout_ms),
            band_starvation_limit: self.config.band_starvation_limit,
            broken: s.broken.clone(),
            abandon: s.abandon.clone(),
            shutdown: self.work.cancel_token().clone(),
            control: self.control.clone(),
            io: TaskIo {
                client: Some(Arc::new(client)),
                store: Some(Arc::new(self.status.clone())),
                limits: self.config.handler_limits,
                ..TaskIo::default()
            },
        });
        let mut consumer_channels = Vec::with_capacity(self.config.queues.len());
        for q in &self.config.queues {
            // A channel (and acks) per band: delivery tags are per channel,
            // and the acks' `multiple` prefix rule needs them registered in
            // tag order, which one consumer loop per channel gives.
            let mut bands = Vec::new();
            for band in self.names.bands(q) {
                let channel = s.conn.create_channel().await?;
                let acks = Acks::start(channel.clone(), s.broken.clone());
                s.acks.push(acks.clone());
                s.channels.push(channel.clone());
                bands.push(BandChannel {
                    band: *band,
                    channel,
                    acks,
                });
            }
            consumer_channels.push(bands);
        }
        Ok((shared, consumer_channels))
    }
}

/// One connection and what its session leaves to finish.
pub(crate) struct Connected {
    conn: lapin::Connection,
    /// The session's running tasks.
    tracker: TaskTracker,
    /// Fired when a delivery could not be settled.
    broken: CancellationToken,
    /// Fired to stop the running tasks (see `Shared::abandon`).
    abandon: CancellationToken,
    /// One per consumer channel; closed (the last acks flushed) once the
    /// running tasks are done, however the session ended.
    acks: Vec<Arc<Acks>>,
    /// Every channel of the session, kept open until the connection closed
    /// and until the running tasks are done (they ack and publish
    /// replacements on them).
    channels: Vec<lapin::Channel>,
}

impl Supervised for AmqpSession {
    type Conn = Connected;
    type Error = SessionError;

    fn name(&self) -> &'static str {
        "amqp_session"
    }

    fn restart(&self) -> Restart {
        Restart::Reconnect("AMQP session")
    }

    async fn connect(&mut self, cancel: &CancellationToken) -> Option<Connected> {
        let conn = connect_with_retry(&self.broker, "kairos-worker", cancel).await?;
        Some(Connected {
            conn,
            tracker: TaskTracker::new(),
            broken: CancellationToken::new(),
            abandon: CancellationToken::new(),
            acks: Vec::new(),
            channels: Vec::new(),
        })
    }

    /// Consumes every queue until shutdown, until a consumer ends (the
    /// connection is lost, the broker cancelled it) or until a delivery
    /// could not be settled.
    async fn session(
        &mut self,
        s: &mut Connected,
        cancel: &CancellationToken,
    ) -> Result<(), SessionError> {
        let (shared, channels) = self.open(s).await?;
        tracing::info!("connected to RabbitMQ");
        let stop = CancellationToken::new();
        let setup = ConsumerSetup {
            fixed: self.config.prefetch(),
            floor: match self.names.mode() {
                QueueMode::Quorum => crate::prefetch::QUORUM_MIN_PREFETCH,
                QueueMode::Classic => 0,
            },
            slots: self.slots.clone(),
            consuming: self.consuming.clone(),
        };
        let setup = &setup;
        let tracker = &s.tracker;
        let consumers = self.config.queues.iter().zip(channels).map(|(q, bands)| {
            let (stop, shared) = (stop.clone(), shared.clone());
            let control = self.control.clone();
            async move {
                // A paused queue's consumers (every band) are
                // cancelled, and started again on resume
                // (`crate::control`).
                let r = control
                    .serve_queue(q, &stop, |run| {
                        let shared = shared.clone();
                        let bands = &bands;
                        async move {
                            match bands.as_slice() {
                                [one] => {
                                    consume(
                                        &one.channel,
                                        shared,
                                        one.acks.clone(),
                                        q,
                                        Admit::Direct,
                                        setup,
                                        tracker,
                                        run,
                                    )
                                    .await
                                }
                                bands => consume_bands(bands, shared, q, setup, tracker, run).await,
                            }
                        }
                    })
                    .await;
                stop.cancel();
                r
            }
        });
        let all = futures_util::future::join_all(consumers);
        tokio::pin!(all);
        // Consumers end on their own (connection lost, consumer cancelled)
        // or when told to: shutdown, or a delivery that could not be
        // settled.
        let results = tokio::select! {
            r = &mut all => r,
            () = cancel.cancelled() => { stop.cancel(); all.await }
            () = s.broken.cancelled() => { stop.cancel(); all.await }
        };
        if s.broken.is_cancelled() {
            return Err(SessionError::Broken);
        }
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// At shutdown, lets the running tasks finish (within the grace) before
    /// the connection closes. After an early end, the next session connects
    /// at once and they finish in the background on the old connection
    /// (their acks fail if it is gone, and RabbitMQ redelivers them).
    async fn close(&mut self, s: Connected, failed: bool) {
        let grace = Duration::from_millis(self.config.shutdown_grace_ms);
        if failed {
            self.work.spawn(s.finish(grace));
        } else {
            s.finish(grace).await;
        }
    }
}

impl Connected {
    /// Lets the running tasks finish while the connection can still ack
    /// (the session's channels stay open too), flushes the last acks, then
    /// closes the connection.
    async fn finish(self, grace: Duration) {
        self.tracker.close();
        wait_running(&self.tracker, &self.conn, &self.abandon, grace).await;
        for a in &self.acks {
            if let Err(err) = a.close().await {
                tracing::warn!(cause = %err, "cannot ack the last settled deliveries; RabbitMQ redelivers them");
            }
        }
        close_connection(&self.conn, "bye", CLOSE_WITHIN).await;
        // Only now: a channel dropped while the connection closes closes
        // itself at that moment, which lapin can trip over.
        drop((self.acks, self.channels));
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
            _ = tokio::time::sleep(CONNECTION_POLL) => {}
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
