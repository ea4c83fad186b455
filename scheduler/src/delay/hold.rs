//! Delayed tasks enqueued over HTTP go straight into the delay queue (the
//! same check, record and script as the `NS.delay` intake), so the answer
//! can say what happened: 202 once the task is durable in Redis, 409 when
//! its id is already pending. Publishing to `NS.delay` instead answered 202
//! before the intake had seen the task, and a duplicate was then dropped
//! without a word.

use crate::delay::store::{member, Entry, QueueError, RedisDelayQueue};
use kairos_shared::amqp::now_ms;
use kairos_shared::client::{ClientError, NewTask};
use kairos_shared::contract::{ProtocolError, Task};
use kairos_shared::events::{EventKind, EventSink};
use kairos_shared::limits::Limits;
use kairos_shared::record;

#[derive(Clone)]
pub struct Holder {
    pub queue: RedisDelayQueue,
    pub events: EventSink,
    pub limits: Limits,
}

/// What became of a task handed to [`Holder::hold`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Durable in the delay queue, due at `due` (Unix ms, Redis clock).
    Added { id: String, due: i64 },
    /// A task with this id was already pending: nothing was written.
    Duplicate { id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("{0}")]
    Invalid(#[from] ProtocolError),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("delay queue: {0}")]
    Queue(#[from] QueueError),
}

impl Holder {
    pub async fn hold(&self, new: &NewTask) -> Result<Held, HoldError> {
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
            metrics::counter!("kairos_scheduler_held_total", "source" => "http").increment(1);
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
