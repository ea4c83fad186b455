//! Delayed tasks enqueued over HTTP go straight into the delay queue (the
//! same check, record and script as the `NS.delay` intake), so the answer
//! can say what happened: 202 once the task is durable in Redis, 409 when
//! its id is already pending. (A publish to `NS.delay` could only answer
//! before the intake has seen the task, and could not report a duplicate.)

use crate::delay::store::{member, Entry, QueueError, RedisDelayQueue};
use kairos_shared::amqp::now_ms;
use kairos_shared::client::{ClientError, NewTask};
use kairos_shared::contract::{ProtocolError, Task};
use kairos_shared::events::{EventKind, EventSink};
use kairos_shared::limits::Limits;
use kairos_shared::record;
use kairos_shared::status::{StatusUpdate, StatusWriter};

/// Puts delayed tasks of the HTTP API into the delay queue.
#[derive(Clone)]
pub(crate) struct Holder {
    /// The delay queue.
    pub(crate) queue: RedisDelayQueue,
    /// Where `scheduled` and `duplicate` events go.
    pub(crate) events: EventSink,
    /// Where the `scheduled` status goes.
    pub(crate) status: StatusWriter,
    /// The limits a task is checked against before it is written.
    pub(crate) limits: Limits,
}

/// What became of a task handed to [`Holder::hold`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Held {
    /// Durable in the delay queue, due at `due` (Unix ms, Redis clock).
    Added {
        /// The task id.
        id: String,
        /// Its due time.
        due: i64,
    },
    /// A task with this id was already pending: nothing was written.
    Duplicate {
        /// The task id.
        id: String,
    },
}

/// Why a task was not held.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HoldError {
    /// The task breaks the contract or a limit.
    #[error("{0}")]
    Invalid(#[from] ProtocolError),
    /// Kept for the HTTP API's error mapping; [`Holder::hold`] does not
    /// return it.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// Redis failed.
    #[error("delay queue: {0}")]
    Queue(#[from] QueueError),
}

impl Holder {
    /// Checks `new` as the intake checks a message and writes it to the
    /// delay queue unless its id is already pending.
    pub(crate) async fn hold(&self, new: &NewTask) -> Result<Held, HoldError> {
        let (id, props) = new.to_message()?;
        self.limits.check_message(&props, new.body.len())?;
        let task = Task::decode(&new.queue, &props, &new.body)?;
        self.limits
            .check_due(task.run_at, task.delay_ms, now_ms())?;
        let entry = Entry {
            member: member(&task.id, 1),
            run_at: task.run_at,
            delay_ms: task.delay_ms.unwrap_or(0),
            record: record::encode(&task)?,
        };
        let scheduled = self.queue.schedule(&[entry]).await?;
        let Some(s) = scheduled.first() else {
            return Err(QueueError::Reply("no reply for the task".into()).into());
        };
        if s.added {
            kairos_shared::trace::step("kairos.hold", &task);
            metrics::counter!("kairos_scheduler_held_total", "source" => "http").increment(1);
            self.status
                .record_with(|| StatusUpdate::scheduled(&task, s.due, true));
            self.events
                .task(EventKind::Scheduled, &task, Some(s.due), None);
            Ok(Held::Added { id, due: s.due })
        } else {
            metrics::counter!("kairos_scheduler_duplicates_total").increment(1);
            self.events
                .task(EventKind::Duplicate, &task, Some(s.due), None);
            Ok(Held::Duplicate { id })
        }
    }
}
