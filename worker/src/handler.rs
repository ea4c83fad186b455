//! What a handler sees and returns, and the registry that finds it by name.

use futures_util::future::BoxFuture;
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
            cancel: CancellationToken::new(),
        }
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
}

/// What a handler returns: `Ok` acks the task, an error retries or
/// dead-letters it (see [`TaskError`]).
pub type TaskResult = Result<(), TaskError>;

/// A task handler. Any `async fn(TaskContext, Vec<u8>) -> TaskResult` (or
/// closure returning such a future) is one.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt of a task. The future is dropped when the attempt's
    /// time limit ([`TaskContext::timeout`]) runs out.
    fn call(&self, ctx: TaskContext, body: Vec<u8>) -> BoxFuture<'static, TaskResult>;
}

impl<F, Fut> Handler for F
where
    F: Fn(TaskContext, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = TaskResult> + Send + 'static,
{
    fn call(&self, ctx: TaskContext, body: Vec<u8>) -> BoxFuture<'static, TaskResult> {
        Box::pin(self(ctx, body))
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
