//! The worker's side of task status: its Redis pool, the status writer
//! (`running`, `succeeded`, `dead`, and the error of a failed attempt),
//! and the store that handlers' checkpoints, progress and results go
//! through. Redis being down never stops a task: the writer drops what it
//! cannot write, and store calls return their error to the caller.

use crate::handler::TaskOutput;
use crate::task_io::result_fields;
use crate::Config;
use kairos_shared::contract::Task;
use kairos_shared::limits::HandlerLimits;
use kairos_shared::redis::RedisConn;
use kairos_shared::status::{ShardCount, StatusStore, StatusUpdate, StatusWriter};
use kairos_shared::supervise::Supervisor;
use std::sync::Arc;
use std::time::Duration;

/// How long a stopping worker waits for its last status updates.
const STATUS_FLUSH: Duration = Duration::from_secs(5);

/// What the consumer and the disposition use to record status, and what
/// handlers' checkpoints, progress and results go through.
#[derive(Clone)]
pub(crate) struct WorkerStatus {
    /// Updates, recorded off the hot path.
    pub(crate) writer: StatusWriter,
    /// Reads and awaited writes (the handler context's checkpoints,
    /// progress and results).
    pub(crate) store: StatusStore,
    /// This worker's name in statuses (`KAIROS_WORKER_ID` or `HOST:PID`).
    pub(crate) worker_id: Arc<str>,
    /// The result bound (`KAIROS_MAX_RESULT_BYTES`).
    pub(crate) limits: HandlerLimits,
}

impl WorkerStatus {
    /// Connects nothing yet (the pool connects on first use): the pool of
    /// `KAIROS_REDIS_URL`, the writer (off with `KAIROS_STATUS=false`)
    /// supervised under `work`, and the store. Registers the worker's
    /// queues in `NS:queues` in the background.
    pub(crate) fn start(config: &Config, work: &Supervisor) -> Result<Self, String> {
        let pool = kairos_shared::redis::redis_pool(
            &config.redis_url,
            &config.common.tls,
            Duration::from_millis(config.redis_timeout_ms),
        )
        .map_err(|e| format!("KAIROS_REDIS_URL: {e}"))?;
        let redis = RedisConn::new(pool);
        let ns = &config.common.namespace;
        let shards = ShardCount::lookup();
        let writer =
            StatusWriter::start(&config.status, redis.separate(), ns, shards.clone(), work);
        let store = StatusStore::new(redis.clone(), ns, shards, config.status.status_ttl_s);
        let (key, queues) = (store.keys().queues(), config.queues.clone());
        work.spawn(async move {
            let added = match redis.get().await {
                Ok(mut con) => redis.watch(
                    redis::cmd("SADD")
                        .arg(&key)
                        .arg(&queues)
                        .query_async::<()>(&mut con)
                        .await,
                ),
                Err(e) => Err(redis::RedisError::from(std::io::Error::other(
                    e.to_string(),
                ))),
            };
            if let Err(cause) = added {
                tracing::warn!(%cause, "cannot register the worker's queues in Redis");
            }
        });
        Ok(WorkerStatus {
            writer,
            store,
            worker_id: config.worker_id().into(),
            limits: config.handler_limits,
        })
    }

    /// An attempt of `task` started here.
    pub(crate) fn running(&self, task: &Task) {
        self.writer
            .record_with(|| StatusUpdate::running(task, &self.worker_id));
    }

    /// `task` succeeded, leaving `output` as its result (see
    /// [`result_fields`]).
    pub(crate) fn succeeded(&self, task: &Task, output: TaskOutput) {
        let limits = self.limits;
        self.writer.record_with(|| {
            let mut u = StatusUpdate::succeeded(task);
            for (name, value) in result_fields(&task.id, output, &limits) {
                u.set_bytes(name, value);
            }
            u
        });
    }

    /// An attempt of `task` failed and went to the retry intake.
    pub(crate) fn failed(&self, task: &Task, error: &str) {
        self.writer
            .record_with(|| StatusUpdate::failed(task, error));
    }

    /// `task` was dead-lettered by this worker.
    pub(crate) fn dead(&self, task: &Task, error: &str) {
        self.writer.record_with(|| StatusUpdate::dead(task, error));
    }

    /// Waits (bounded) for the last updates; call it once the sessions
    /// are gone.
    pub(crate) async fn close(self) {
        self.writer.close(STATUS_FLUSH).await;
    }
}
