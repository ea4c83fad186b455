//! One step of a task, as the status writer merges it.

use crate::amqp::now_ms;
use crate::contract::{value_to_string, Task, H_SCHEDULE_ID};
use serde::{Deserialize, Serialize};

/// The rank of a finished state: above any attempt's (see `status.lua`).
pub const RANK_TERMINAL: u64 = 1 << 40;

/// Where a task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting in the delay queue for its due time.
    Scheduled,
    /// Published to its queue, not started.
    Ready,
    /// A worker runs it.
    Running,
    /// A failed attempt waits in the delay queue for its backoff.
    Retrying,
    /// Done.
    Succeeded,
    /// Dead-lettered.
    Dead,
    /// Withdrawn from the delay queue (or aborted) before it ran.
    Cancelled,
}

impl TaskState {
    /// Every state.
    pub const ALL: [TaskState; 7] = [
        TaskState::Scheduled,
        TaskState::Ready,
        TaskState::Running,
        TaskState::Retrying,
        TaskState::Succeeded,
        TaskState::Dead,
        TaskState::Cancelled,
    ];

    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Scheduled => "scheduled",
            TaskState::Ready => "ready",
            TaskState::Running => "running",
            TaskState::Retrying => "retrying",
            TaskState::Succeeded => "succeeded",
            TaskState::Dead => "dead",
            TaskState::Cancelled => "cancelled",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Succeeded, dead or cancelled: nothing more happens to it.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Dead | TaskState::Cancelled
        )
    }

    /// Its rank at `attempt`: `attempt * 16 + phase`, finished states
    /// [`RANK_TERMINAL`]. A state replaces a stored one of lower rank.
    pub fn rank(self, attempt: u32) -> u64 {
        let phase = match self {
            TaskState::Scheduled | TaskState::Retrying => 1,
            TaskState::Ready => 2,
            TaskState::Running => 3,
            _ => return RANK_TERMINAL,
        };
        (u64::from(attempt) * 16 + phase).min(RANK_TERMINAL - 1)
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the per-queue rate counters (`NS:rate:QUEUE`) count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateEvent {
    /// Taken into the delay queue.
    Scheduled,
    /// Published to its queue.
    Ready,
    /// An attempt started.
    Started,
    /// Succeeded.
    Succeeded,
    /// An attempt failed.
    Failed,
    /// Held again for a retry.
    Retried,
    /// Dead-lettered.
    Dead,
    /// Cancelled.
    Cancelled,
}

impl RateEvent {
    /// The counter's field name (`EVENT:BUCKET`).
    pub fn as_str(self) -> &'static str {
        match self {
            RateEvent::Scheduled => "scheduled",
            RateEvent::Ready => "ready",
            RateEvent::Started => "started",
            RateEvent::Succeeded => "succeeded",
            RateEvent::Failed => "failed",
            RateEvent::Retried => "retried",
            RateEvent::Dead => "dead",
            RateEvent::Cancelled => "cancelled",
        }
    }
}

/// One step of one task. Build it with the constructor of the step; the
/// writer merges it (see the module doc of `kairos_shared::status`).
#[derive(Clone, Debug, PartialEq)]
pub struct StatusUpdate {
    /// The task id.
    pub id: String,
    /// The state it enters; `None` for fields only (an error, progress).
    pub state: Option<TaskState>,
    /// The attempt the state belongs to (its rank).
    pub attempt: u32,
    /// A new submission: a finished status of an earlier one is forgotten.
    pub fresh: bool,
    /// A finished task runs again (a replayed dead letter): its finished
    /// status is forgotten whatever its due time.
    pub again: bool,
    /// The logical queue, when known (rates, the wait set).
    pub queue: Option<String>,
    /// What the rate counters count for it.
    pub event: Option<RateEvent>,
    /// Fields to write: name, value.
    pub fields: Vec<(&'static str, Vec<u8>)>,
}

impl StatusUpdate {
    /// A step of `task` into `state`, with the task's own fields.
    fn of_task(task: &Task, state: Option<TaskState>, event: Option<RateEvent>) -> Self {
        let mut u = StatusUpdate {
            id: task.id.clone(),
            state,
            attempt: task.attempt.max(1),
            fresh: false,
            again: false,
            queue: Some(task.queue.clone()),
            event,
            fields: Vec::with_capacity(10),
        };
        u.set("name", &task.name)
            .set("queue", &task.queue)
            .set("priority", task.priority)
            .set("attempt", task.attempt.max(1));
        if let Some(s) = task.header(H_SCHEDULE_ID) {
            u.set("schedule_id", value_to_string(s));
        }
        u
    }

    /// Sets field `name` (a later value of the same field replaces it).
    pub fn set(&mut self, name: &'static str, value: impl ToString) -> &mut Self {
        self.set_bytes(name, value.to_string().into_bytes())
    }

    /// Sets field `name` to raw bytes.
    pub fn set_bytes(&mut self, name: &'static str, value: Vec<u8>) -> &mut Self {
        match self.fields.iter_mut().find(|(n, _)| *n == name) {
            Some(f) => f.1 = value,
            None => self.fields.push((name, value)),
        }
        self
    }

    /// The value of field `name`, if set.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Intake held `task` (a new submission when `fresh`) due at `due`.
    pub fn scheduled(task: &Task, due: i64, fresh: bool) -> Self {
        let mut u = Self::of_task(
            task,
            Some(TaskState::Scheduled),
            fresh.then_some(RateEvent::Scheduled),
        );
        u.fresh = fresh;
        u.set("due_at", due).set("enqueued_at", now_ms());
        u
    }

    /// The retry intake held attempt `task.attempt` (the next one) due at
    /// `due`, after `error`.
    pub fn retrying(task: &Task, due: i64, error: &str) -> Self {
        let mut u = Self::of_task(task, Some(TaskState::Retrying), Some(RateEvent::Retried));
        u.set("due_at", due).set("error", error);
        u
    }

    /// The pump published `task` (due at `due`) and the broker confirmed.
    pub fn ready(task: &Task, due: i64) -> Self {
        let mut u = Self::of_task(task, Some(TaskState::Ready), Some(RateEvent::Ready));
        u.set("due_at", due);
        u
    }

    /// A finished `task` (a dead letter replayed) was published again: it
    /// is `ready`, its finished status forgotten.
    pub fn replayed(task: &Task) -> Self {
        let mut u = Self::of_task(task, Some(TaskState::Ready), Some(RateEvent::Ready));
        u.again = true;
        u.set("enqueued_at", now_ms());
        u
    }

    /// Worker `worker` started `task`.
    pub fn running(task: &Task, worker: &str) -> Self {
        let mut u = Self::of_task(task, Some(TaskState::Running), Some(RateEvent::Started));
        if let Some(due) = task.run_at {
            u.set("due_at", due);
        }
        u.set("started_at", now_ms()).set("worker", worker);
        u
    }

    /// `task` succeeded.
    pub fn succeeded(task: &Task) -> Self {
        let mut u = Self::of_task(task, Some(TaskState::Succeeded), Some(RateEvent::Succeeded));
        u.set("finished_at", now_ms());
        u
    }

    /// An attempt of `task` failed and goes to the retry intake (which
    /// writes `retrying` or `dead`): only the error.
    pub fn failed(task: &Task, error: &str) -> Self {
        let mut u = Self::of_task(task, None, Some(RateEvent::Failed));
        u.fields.clear();
        u.set("error", error);
        u
    }

    /// `task` was dead-lettered for `error`.
    pub fn dead(task: &Task, error: &str) -> Self {
        let mut u = Self::of_task(task, Some(TaskState::Dead), Some(RateEvent::Dead));
        u.set("finished_at", now_ms()).set("error", error);
        u
    }

    /// `task` was cancelled (aborted while it ran).
    pub fn cancelled(task: &Task) -> Self {
        let mut u = Self::of_task(task, Some(TaskState::Cancelled), Some(RateEvent::Cancelled));
        u.set("finished_at", now_ms());
        u
    }

    /// Progress of task `id`: `percent` (0 to 100) and a message.
    pub fn progress(id: &str, percent: u8, message: Option<&str>) -> Self {
        let mut u = StatusUpdate {
            id: id.to_string(),
            state: None,
            attempt: 1,
            fresh: false,
            again: false,
            queue: None,
            event: None,
            fields: Vec::new(),
        };
        u.set("progress", percent.min(100))
            .set("progress_message", message.unwrap_or_default());
        u
    }

    /// The state's rank (0 without a state).
    pub fn rank(&self) -> u64 {
        self.state.map_or(0, |s| s.rank(self.attempt))
    }

    /// Folds `later` (an update of the same id, recorded after this one)
    /// into this one, as merging both in turn would: the higher rank's
    /// state, the later value of each field. A later fresh update starts
    /// over.
    pub fn absorb(&mut self, later: StatusUpdate) {
        if later.fresh || later.again {
            *self = later;
            return;
        }
        let (mine, theirs) = (self.rank(), later.rank());
        let later_wins = later.state.is_some()
            && (self.state.is_none()
                || theirs > mine
                || (theirs == mine && theirs < RANK_TERMINAL));
        if later_wins {
            self.state = later.state;
            self.attempt = later.attempt;
        }
        if later.queue.is_some() {
            self.queue = later.queue;
        }
        for (name, value) in later.fields {
            // A losing state only fills what is missing.
            if later_wins || later.state.is_none() || self.field(name).is_none() {
                self.set_bytes(name, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::NewTask;

    fn task(attempt: u32) -> Task {
        let (_, props) = NewTask::new("t.name")
            .queue("q")
            .body(b"x".to_vec())
            .id("a")
            .to_message()
            .unwrap();
        let mut t = Task::decode("q", &props, b"x").unwrap();
        t.attempt = attempt;
        t
    }

    #[test]
    fn ranks_order_attempts_and_phases() {
        use TaskState::*;
        assert!(Scheduled.rank(1) < Ready.rank(1));
        assert!(Ready.rank(1) < Running.rank(1));
        assert!(Running.rank(1) < Retrying.rank(2));
        assert!(Running.rank(1000) < Succeeded.rank(1));
        assert_eq!(Dead.rank(3), RANK_TERMINAL);
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn absorbing_keeps_the_higher_state_and_the_later_fields() {
        let t = task(1);
        let mut u = StatusUpdate::running(&t, "w1");
        u.absorb(StatusUpdate::succeeded(&t));
        assert_eq!(u.state, Some(TaskState::Succeeded));
        assert!(u.field("started_at").is_some() && u.field("finished_at").is_some());
        // A late `ready` loses, filling nothing that is set.
        u.absorb(StatusUpdate::ready(&t, 5));
        assert_eq!(u.state, Some(TaskState::Succeeded));
        assert_eq!(u.field("due_at"), Some(&b"5"[..]));
        // A fresh submission starts over.
        u.absorb(StatusUpdate::scheduled(&t, 9, true));
        assert_eq!(u.state, Some(TaskState::Scheduled));
        assert!(u.fresh && u.field("worker").is_none());
        // Fields only: kept, state unchanged.
        u.absorb(StatusUpdate::failed(&task(1), "boom"));
        assert_eq!(u.state, Some(TaskState::Scheduled));
        assert_eq!(u.field("error"), Some(&b"boom"[..]));
    }
}
