//! What a handler's context reaches beyond its task: the client for
//! follow-up tasks, and the status store its progress and checkpoints go
//! to. One [`TaskIo`] per session, made per task with
//! [`TaskIo::for_task`] (each task has its own checkpoint cell).

use crate::handler::TaskOutput;
use futures_util::future::BoxFuture;
use kairos_shared::client::Enqueuer;
use kairos_shared::limits::HandlerLimits;
use kairos_shared::status::{StatusUpdate, TaskResultValue};
use std::sync::{Arc, Mutex};

/// Where progress and checkpoints go: the worker's status store (see
/// `crate::status`); a fake in unit tests. Errors are text: the handler
/// sees them as [`CheckpointError::Store`].
pub(crate) trait HandlerStore: Send + Sync + 'static {
    /// The last checkpoint of task `id`.
    fn load_checkpoint<'a>(&'a self, id: &'a str)
        -> BoxFuture<'a, Result<Option<Vec<u8>>, String>>;
    /// Saves the checkpoint of task `id`: durable when the future is done.
    fn save_checkpoint<'a>(
        &'a self,
        id: &'a str,
        bytes: &'a [u8],
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Records progress of task `id` without waiting (dropped when the
    /// store cannot keep up or status is off).
    fn progress(&self, id: &str, percent: u8, message: &str);
}

/// Why a checkpoint was not saved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Over `KAIROS_MAX_CHECKPOINT_BYTES` (the sizes): no attempt can save
    /// it, so `?` makes it a permanent failure.
    #[error("{0}")]
    TooLarge(String),
    /// Redis did not take it (why); `?` makes it a retryable failure.
    #[error("checkpoint not saved: {0}")]
    Store(String),
    /// The value could not be serialized as JSON (why).
    #[error("checkpoint is not serializable as JSON: {0}")]
    Json(String),
    /// A context not made by a worker (a unit test's) has nowhere to save.
    #[error("no checkpoint store: this context was not made by a worker")]
    Unavailable,
}

impl From<CheckpointError> for crate::TaskError {
    fn from(e: CheckpointError) -> Self {
        match e {
            CheckpointError::TooLarge(_) | CheckpointError::Json(_) => {
                crate::TaskError::permanent(e)
            }
            CheckpointError::Store(_) | CheckpointError::Unavailable => crate::TaskError::retry(e),
        }
    }
}

/// What a context reaches beyond its task, set by the worker: empty in a
/// context made with `TaskContext::from_task` (a unit test's).
#[derive(Clone, Default)]
pub(crate) struct TaskIo {
    /// Enqueues follow-up tasks on the worker's connection.
    pub(crate) client: Option<Arc<Enqueuer>>,
    /// Progress and checkpoints.
    pub(crate) store: Option<Arc<dyn HandlerStore>>,
    /// The checkpoint bound.
    pub(crate) limits: HandlerLimits,
    /// This task's last checkpoint: loaded before the handler runs, replaced
    /// by each save.
    pub(crate) checkpoint: Arc<Mutex<Option<Vec<u8>>>>,
}

impl TaskIo {
    /// The session's services for one task, whose last checkpoint is
    /// `checkpoint`.
    pub(crate) fn for_task(&self, checkpoint: Option<Vec<u8>>) -> TaskIo {
        TaskIo {
            checkpoint: Arc::new(Mutex::new(checkpoint)),
            ..self.clone()
        }
    }

    /// The task's last checkpoint.
    pub(crate) fn checkpoint(&self) -> Option<Vec<u8>> {
        self.checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Checks and saves a checkpoint of task `id`; remembered as the last
    /// one once Redis took it.
    pub(crate) async fn save_checkpoint(
        &self,
        id: &str,
        bytes: Vec<u8>,
    ) -> Result<(), CheckpointError> {
        self.limits
            .check_checkpoint(bytes.len())
            .map_err(CheckpointError::TooLarge)?;
        let store = self.store.as_ref().ok_or(CheckpointError::Unavailable)?;
        store
            .save_checkpoint(id, &bytes)
            .await
            .map_err(CheckpointError::Store)?;
        *self.checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes);
        Ok(())
    }

    /// Records progress of task `id`, if there is a store.
    pub(crate) fn progress(&self, id: &str, percent: u8, message: &str) {
        if let Some(store) = &self.store {
            let message = kairos_shared::limits::progress_message(message);
            store.progress(id, percent.min(100), message);
        }
    }
}

impl std::fmt::Debug for TaskIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskIo")
            .field("client", &self.client.is_some())
            .field("store", &self.store.is_some())
            .field("checkpoint_bytes", &self.checkpoint().map(|c| c.len()))
            .finish()
    }
}

/// The worker's status store: checkpoints awaited in Redis, progress
/// through the writer (never waited for).
impl HandlerStore for crate::status::WorkerStatus {
    fn load_checkpoint<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
        Box::pin(async move {
            self.store
                .load_checkpoint(id)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn save_checkpoint<'a>(
        &'a self,
        id: &'a str,
        bytes: &'a [u8],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.store
                .save_checkpoint(id, bytes)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn progress(&self, id: &str, percent: u8, message: &str) {
        self.writer
            .record_with(|| StatusUpdate::progress(id, percent, Some(message)));
    }
}

/// The status fields a successful attempt's `output` is kept in:
/// `result` and `result_type`, none without a result. A result over
/// `KAIROS_MAX_RESULT_BYTES` is dropped, not the task: its work is done
/// (failing it now would run it again, side effects and all), so it
/// succeeds without a result, its status's `error` says why, and the
/// worker logs a warning and counts it
/// (`kairos_worker_results_dropped_total`).
pub(crate) fn result_fields(
    id: &str,
    output: TaskOutput,
    limits: &HandlerLimits,
) -> Vec<(&'static str, Vec<u8>)> {
    let value = match output {
        TaskOutput::None => return Vec::new(),
        TaskOutput::Json(v) => TaskResultValue::Json(v),
        TaskOutput::Bytes(b) => TaskResultValue::Bytes(b),
    };
    let fields = value.fields();
    let len = fields
        .iter()
        .find(|(n, _)| *n == "result")
        .map_or(0, |(_, v)| v.len());
    match limits.check_result(len) {
        Ok(()) => fields.into(),
        Err(reason) => {
            tracing::warn!(task_id = %id, bytes = len, "the task's result is dropped: {reason}");
            metrics::counter!("kairos_worker_results_dropped_total").increment(1);
            vec![("error", format!("result dropped: {reason}").into_bytes())]
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Checkpoints in memory; progress recorded; fails saves when told.
    #[derive(Default)]
    pub(crate) struct MemStore {
        pub(crate) checkpoints: Mutex<HashMap<String, Vec<u8>>>,
        pub(crate) progress: Mutex<Vec<(String, u8, String)>>,
        pub(crate) failing: std::sync::atomic::AtomicBool,
    }

    impl HandlerStore for MemStore {
        fn load_checkpoint<'a>(
            &'a self,
            id: &'a str,
        ) -> BoxFuture<'a, Result<Option<Vec<u8>>, String>> {
            Box::pin(async move { Ok(self.checkpoints.lock().unwrap().get(id).cloned()) })
        }
        fn save_checkpoint<'a>(
            &'a self,
            id: &'a str,
            bytes: &'a [u8],
        ) -> BoxFuture<'a, Result<(), String>> {
            Box::pin(async move {
                if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err("redis down".to_string());
                }
                self.checkpoints
                    .lock()
                    .unwrap()
                    .insert(id.to_string(), bytes.to_vec());
                Ok(())
            })
        }
        fn progress(&self, id: &str, percent: u8, message: &str) {
            self.progress
                .lock()
                .unwrap()
                .push((id.to_string(), percent, message.to_string()));
        }
    }

    pub(crate) fn io_with(store: &Arc<MemStore>, max_checkpoint_bytes: u64) -> TaskIo {
        TaskIo {
            store: Some(store.clone()),
            limits: HandlerLimits {
                max_checkpoint_bytes,
                ..HandlerLimits::default()
            },
            ..TaskIo::default()
        }
    }

    #[tokio::test]
    async fn a_saved_checkpoint_is_the_last_one() {
        let store = Arc::new(MemStore::default());
        let io = io_with(&store, 8).for_task(Some(b"old".to_vec()));
        assert_eq!(io.checkpoint().as_deref(), Some(&b"old"[..]));
        io.save_checkpoint("t", b"new".to_vec()).await.unwrap();
        assert_eq!(io.checkpoint().as_deref(), Some(&b"new"[..]));
        assert_eq!(store.checkpoints.lock().unwrap()["t"], b"new");
    }

    #[tokio::test]
    async fn an_oversized_or_lost_checkpoint_is_an_error_and_not_the_last() {
        let store = Arc::new(MemStore::default());
        let io = io_with(&store, 8).for_task(None);
        let err = io.save_checkpoint("t", vec![0; 9]).await.unwrap_err();
        assert!(
            matches!(err, CheckpointError::TooLarge(ref m) if m.contains("KAIROS_MAX_CHECKPOINT_BYTES")),
            "{err}"
        );
        assert!(matches!(
            crate::TaskError::from(err),
            crate::TaskError::Permanent(_)
        ));
        store
            .failing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let err = io.save_checkpoint("t", vec![1]).await.unwrap_err();
        assert!(matches!(
            crate::TaskError::from(err),
            crate::TaskError::Retry(_)
        ));
        assert_eq!(io.checkpoint(), None);
        let none = TaskIo::default().save_checkpoint("t", vec![1]).await;
        assert_eq!(none, Err(CheckpointError::Unavailable));
    }

    #[test]
    fn results_are_kept_within_their_bound() {
        let limits = HandlerLimits {
            max_result_bytes: 8,
            ..HandlerLimits::default()
        };
        assert!(result_fields("t", TaskOutput::None, &limits).is_empty());
        let json = result_fields("t", TaskOutput::Json(serde_json::json!([1, 2])), &limits);
        assert_eq!(
            json,
            vec![
                ("result", b"[1,2]".to_vec()),
                ("result_type", b"json".to_vec())
            ]
        );
        let bytes = result_fields("t", TaskOutput::Bytes(vec![0, 1]), &limits);
        assert_eq!(
            bytes,
            vec![("result", vec![0, 1]), ("result_type", b"bytes".to_vec())]
        );
        let over = result_fields("t", TaskOutput::Bytes(vec![0; 9]), &limits);
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].0, "error");
        let reason = String::from_utf8_lossy(&over[0].1).into_owned();
        assert!(reason.contains("KAIROS_MAX_RESULT_BYTES"), "{reason}");
    }

    #[test]
    fn progress_is_clamped_and_cut() {
        let store = Arc::new(MemStore::default());
        let io = io_with(&store, 8).for_task(None);
        io.progress("t", 250, &"x".repeat(5000));
        let p = store.progress.lock().unwrap();
        assert_eq!(p[0].1, 100);
        assert_eq!(
            p[0].2.len(),
            kairos_shared::limits::MAX_PROGRESS_MESSAGE_BYTES
        );
    }
}
