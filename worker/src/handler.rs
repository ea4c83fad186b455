//! What a handler sees and returns, and the registry that finds it by name.

use crate::task_io::{CheckpointError, TaskIo};
use futures_util::future::BoxFuture;
use kairos_shared::client::{ClientError, Enqueuer};
use kairos_shared::contract::Task;
use lapin::types::FieldTable;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Everything about the delivery a handler may want, besides the body.
#[derive(Clone, Debug)]
pub struct TaskContext {
    /// The task's id (`message_id`): the same on every attempt, so a
    /// handler can use it to make a repeated run harmless.
    pub id: String,
    /// The task name (`type`) the handler was registered under.
    pub name: String,
    /// The logical queue the task came from (`QUEUE` of `NS.q.QUEUE`).
    pub queue: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The AMQP priority, 0 (lowest) to the contract's maximum.
    pub priority: u8,
    /// All headers of the message, the contract's `x-` ones included.
    pub headers: FieldTable,
    /// When the task was meant to run (`x-run-at`), Unix ms, where known.
    pub due_at: Option<i64>,
    /// Retries allowed after the first attempt (`x-max-retries`); `None`
    /// when the task sets none and the scheduler's retry policy decides.
    pub max_retries: Option<u32>,
    /// The body's media type (`content_type`), as the client set it.
    pub content_type: Option<String>,
    /// The body's encoding (`content_encoding`), as the client set it.
    pub content_encoding: Option<String>,
    /// The client's `correlation_id`, passed through untouched.
    pub correlation_id: Option<String>,
    /// This attempt's time limit (`x-timeout-ms`, else the worker's
    /// `KAIROS_TASK_TIMEOUT_MS`): the handler is dropped when it runs out.
    pub timeout: Duration,
    /// RabbitMQ delivered this attempt before (a worker died or lost its
    /// connection while running it): the handler may have run part of it
    /// already; [`checkpoint`](Self::checkpoint) holds what it saved.
    pub redelivered: bool,
    /// What the worker lends the handler: a client, the status store.
    io: TaskIo,
    /// Fired when the task is aborted (`POST /v1/tasks/{id}/abort`).
    pub(crate) cancel: CancellationToken,
}

impl TaskContext {
    /// The context of a decoded task; the time limit falls back to the
    /// worker's default when the task has no `x-timeout-ms`.
    pub fn from_task(task: &Task) -> Self {
        TaskContext {
            id: task.id.clone(),
            name: task.name.clone(),
            queue: task.queue.clone(),
            attempt: task.attempt,
            priority: task.priority,
            headers: task.headers(),
            due_at: task.run_at,
            max_retries: task.max_retries,
            content_type: task
                .properties
                .content_type()
                .as_ref()
                .map(|s| s.to_string()),
            content_encoding: task
                .properties
                .content_encoding()
                .as_ref()
                .map(|s| s.to_string()),
            correlation_id: task
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.to_string()),
            timeout: Duration::from_millis(
                task.timeout_ms
                    .unwrap_or(crate::config::DEFAULT_TASK_TIMEOUT_MS),
            ),
            redelivered: false,
            io: TaskIo::default(),
            cancel: CancellationToken::new(),
        }
    }

    /// Lends the context what the worker has: set before the handler runs.
    pub(crate) fn with_io(mut self, io: TaskIo) -> Self {
        self.io = io;
        self
    }

    /// A client to enqueue follow-up tasks with, on the worker's own
    /// connection; each enqueue waits for the broker's confirm. An error
    /// only in a context the worker did not make (a unit test's), and
    /// `?` turns it, like an enqueue's error, into a retryable failure:
    ///
    /// ```no_run
    /// # use kairos_worker::{TaskContext, TaskError};
    /// # use kairos_shared::client::NewTask;
    /// async fn order(ctx: TaskContext, body: Vec<u8>) -> Result<(), TaskError> {
    ///     // ... take the order, then:
    ///     let email = NewTask::new("email.send").queue("emails").body(body);
    ///     // A stable id: a retry of this attempt enqueues it once.
    ///     ctx.client()?.enqueue(email.id(format!("{}-email", ctx.id))).await?;
    ///     Ok(())
    /// }
    /// ```
    pub fn client(&self) -> Result<&Enqueuer, TaskError> {
        self.io
            .client
            .as_deref()
            .ok_or_else(|| TaskError::retry("no client: this context was not made by a worker"))
    }

    /// Reports progress: `percent` (0 to 100; more counts as 100) and a
    /// message (cut at 1 KiB), shown in the task's status (`progress`,
    /// `progress_message`), the dashboard and `kairosctl task show`. It
    /// never waits for Redis nor fails: when Redis is down or status is
    /// off (`KAIROS_STATUS=false`) it is dropped.
    pub async fn progress(&self, percent: u8, message: impl AsRef<str>) {
        self.io.progress(&self.id, percent, message.as_ref());
    }

    /// The task's last saved checkpoint: the one an earlier attempt (or an
    /// earlier delivery of this one, whose worker died) saved, loaded
    /// before the handler started, or the last this attempt saved. `None`
    /// on a first attempt.
    pub fn checkpoint(&self) -> Option<Vec<u8>> {
        self.io.checkpoint()
    }

    /// The last checkpoint read as JSON (`None` without one; an error when
    /// it is not `T`'s JSON).
    pub fn checkpoint_json<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Option<Result<T, serde_json::Error>> {
        self.checkpoint().map(|c| serde_json::from_slice(&c))
    }

    /// Saves a checkpoint: where the task got to, so that the next attempt
    /// (after a failure, a timeout, or a worker that died) resumes from
    /// there with [`checkpoint`](Self::checkpoint) instead of starting
    /// over. Durable in Redis when it returns `Ok`; kept as long as the
    /// task's status (`KAIROS_STATUS_TTL_S`) and at most
    /// `KAIROS_MAX_CHECKPOINT_BYTES` (1 MiB by default). `?` turns an
    /// error into a failed attempt: permanent for one too large,
    /// retryable when Redis did not take it.
    pub async fn save_checkpoint(&self, bytes: impl Into<Vec<u8>>) -> Result<(), CheckpointError> {
        self.io.save_checkpoint(&self.id, bytes.into()).await
    }

    /// [`save_checkpoint`](Self::save_checkpoint) of `value` as JSON.
    pub async fn save_checkpoint_json<T: serde::Serialize>(
        &self,
        value: &T,
    ) -> Result<(), CheckpointError> {
        let bytes = serde_json::to_vec(value).map_err(|e| CheckpointError::Json(e.to_string()))?;
        self.save_checkpoint(bytes).await
    }

    /// Whether the task was aborted: the handler should stop soon. It gets
    /// a short grace to return (`crate::control::ABORT_GRACE`, 1 s), then
    /// it is dropped; either way the task ends `cancelled` and is not
    /// retried.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Completes when the task is aborted, for a handler to `select!` on
    /// and clean up (see [`is_cancelled`](Self::is_cancelled)).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
}

/// How an attempt failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// Worth another attempt (after a backoff) while retries remain.
    #[error("{0}")]
    Retry(String),
    /// No attempt can succeed: dead-letter at once.
    #[error("{0}")]
    Permanent(String),
    /// Worth another attempt after `after` rather than the computed backoff
    /// (Retry-After: a rate limit, a service that said when to come back),
    /// while retries remain. See [`TaskError::retry_after`].
    #[error("{error}")]
    RetryAfter {
        /// How long to wait before the next attempt.
        after: Duration,
        /// Why this attempt failed (`x-error`).
        error: String,
    },
}

impl TaskError {
    /// A failure worth another attempt, with `e` as its reason (`x-error`).
    pub fn retry(e: impl std::fmt::Display) -> Self {
        TaskError::Retry(e.to_string())
    }

    /// A failure no attempt can get past, with `e` as its reason: the task
    /// is dead-lettered at once.
    pub fn permanent(e: impl std::fmt::Display) -> Self {
        TaskError::Permanent(e.to_string())
    }

    /// A failure worth another attempt after `after`, which replaces the
    /// backoff for this one retry (the scheduler receives it as
    /// `x-retry-after-ms`). It does not add a retry: with none left, the
    /// task is dead-lettered as usual. A delay beyond the scheduler's
    /// `KAIROS_MAX_DELAY_MS` is ignored and the backoff applies.
    pub fn retry_after(after: Duration, e: impl std::fmt::Display) -> Self {
        TaskError::RetryAfter {
            after,
            error: e.to_string(),
        }
    }

    /// The reason, as `x-error` carries it.
    pub fn message(&self) -> &str {
        match self {
            TaskError::Retry(e) | TaskError::Permanent(e) => e,
            TaskError::RetryAfter { error, .. } => error,
        }
    }
}

/// An enqueue that failed (from [`TaskContext::client`]) fails the attempt
/// with a retry: the broker is likely to take it a little later.
impl From<ClientError> for TaskError {
    fn from(e: ClientError) -> Self {
        TaskError::retry(format!("enqueue failed: {e}"))
    }
}

/// What a handler returns: `Ok` acks the task, an error retries or
/// dead-letters it (see [`TaskError`]). A handler may return a result
/// instead of `()`: see [`TaskOutput`].
pub type TaskResult = Result<(), TaskError>;

/// What a successful attempt leaves behind, kept with the task's status
/// (`GET /v1/tasks/{id}` answers it as `result`). A handler returns
/// anything that converts into it: `()` (no result), a
/// [`serde_json::Value`], [`Json`] of any `Serialize` value, `Vec<u8>`
/// (bytes), a `String` (a JSON string), or an `Option` of those.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum TaskOutput {
    /// No result.
    #[default]
    None,
    /// A JSON result.
    Json(serde_json::Value),
    /// A result of raw bytes (shown as `{"base64": ...}` over HTTP).
    Bytes(Vec<u8>),
}

impl TaskOutput {
    /// The result's size as it is stored: the JSON text or the bytes.
    pub fn len(&self) -> usize {
        match self {
            TaskOutput::None => 0,
            TaskOutput::Json(v) => v.to_string().len(),
            TaskOutput::Bytes(b) => b.len(),
        }
    }

    /// True for [`TaskOutput::None`] and an empty byte result.
    pub fn is_empty(&self) -> bool {
        matches!(self, TaskOutput::None) || matches!(self, TaskOutput::Bytes(b) if b.is_empty())
    }
}

impl From<()> for TaskOutput {
    fn from((): ()) -> Self {
        TaskOutput::None
    }
}

impl From<serde_json::Value> for TaskOutput {
    fn from(v: serde_json::Value) -> Self {
        TaskOutput::Json(v)
    }
}

/// Stored as a JSON string.
impl From<String> for TaskOutput {
    fn from(s: String) -> Self {
        TaskOutput::Json(serde_json::Value::String(s))
    }
}

/// Stored as a JSON string.
impl From<&'static str> for TaskOutput {
    fn from(s: &'static str) -> Self {
        TaskOutput::Json(serde_json::Value::String(s.to_string()))
    }
}

impl From<Vec<u8>> for TaskOutput {
    fn from(b: Vec<u8>) -> Self {
        TaskOutput::Bytes(b)
    }
}

impl<T: Into<TaskOutput>> From<Option<T>> for TaskOutput {
    fn from(o: Option<T>) -> Self {
        o.map(Into::into).unwrap_or_default()
    }
}

/// A result to be stored as JSON: `Ok(Json(report))` for any
/// `Serialize` value. One that cannot be serialized (a map with non-string
/// keys) is dropped with a warning; the task still succeeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> From<Json<T>> for TaskOutput {
    fn from(Json(v): Json<T>) -> Self {
        match serde_json::to_value(v) {
            Ok(v) => TaskOutput::Json(v),
            Err(err) => {
                tracing::warn!(cause = %err, "the task's result cannot be serialized as JSON; it is dropped");
                TaskOutput::None
            }
        }
    }
}

/// What a handler's future resolves to, seen by the worker.
pub type HandlerOutcome = Result<TaskOutput, TaskError>;

/// A task handler. Any `async fn(TaskContext, Vec<u8>) -> Result<O,
/// TaskError>` (or closure returning such a future) is one, where `O` is
/// `()` or a result ([`TaskOutput`]).
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt of a task. The future is dropped when the attempt's
    /// time limit ([`TaskContext::timeout`]) runs out.
    fn call(&self, ctx: TaskContext, body: Vec<u8>) -> BoxFuture<'static, HandlerOutcome>;
}

impl<F, Fut, O> Handler for F
where
    F: Fn(TaskContext, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    O: Into<TaskOutput> + 'static,
{
    fn call(&self, ctx: TaskContext, body: Vec<u8>) -> BoxFuture<'static, HandlerOutcome> {
        let run = self(ctx, body);
        Box::pin(async move { run.await.map(Into::into) })
    }
}

/// Handlers by task name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl Registry {
    /// Serves task `name` with `handler`, replacing any handler registered
    /// under that name before.
    pub fn register(&mut self, name: impl Into<String>, handler: impl Handler) {
        self.handlers.insert(name.into(), Arc::new(handler));
    }

    /// The handler of task `name`, if one is registered.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(name).cloned()
    }

    /// The names of every registered task, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}
