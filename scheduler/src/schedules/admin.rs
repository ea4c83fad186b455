//! Creating, replacing, pausing, resuming and deleting schedules: the one
//! place the HTTP API and the schedule file go through, so both validate
//! and compute the first tick the same way.

use crate::delay::store::QueueError;
use crate::schedules::model::{Schedule, ScheduleSpec, SpecError, Trigger};
use crate::schedules::store::{ScheduleStore, View};
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::Notify;

/// Why a schedule operation failed.
#[derive(Debug, Error)]
pub(crate) enum AdminError {
    /// The definition is invalid.
    #[error("{0}")]
    Invalid(#[from] SpecError),
    /// No schedule has this id.
    #[error("no schedule {0:?}")]
    NotFound(String),
    /// Redis failed.
    #[error("{0}")]
    Store(#[from] QueueError),
}

/// What a put did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Put {
    /// A new schedule.
    Created,
    /// An existing schedule, now with the new definition.
    Replaced,
    /// The stored definition was the same: nothing was written.
    Unchanged,
}

/// The one way schedules are created, changed and deleted.
#[derive(Clone)]
pub(crate) struct Admin {
    /// Where schedules live.
    pub(crate) store: ScheduleStore,
    /// Wakes the local ticker so a new tick is not slept through.
    pub(crate) changed: Arc<Notify>,
}

/// The first tick of a (re)started schedule: after now and after the last
/// tick it fired, so no tick fires twice and a resume makes no burst. A
/// one-shot whose time has passed still fires (as a misfire) unless it did.
pub(crate) fn first_tick(trigger: &Trigger, now: i64, last: Option<i64>) -> Option<i64> {
    match trigger {
        Trigger::At(at) => last.is_none_or(|l| *at > l).then_some(*at),
        t => t.next_after(now.max(last.unwrap_or(i64::MIN))),
    }
}

impl Admin {
    /// Creates or replaces `id`. `keep_paused`: an existing schedule keeps
    /// its enabled flag (the file must not resume what an operator paused),
    /// and a definition equal but for that flag is left alone.
    pub(crate) async fn put(
        &self,
        id: &str,
        spec: ScheduleSpec,
        keep_paused: bool,
    ) -> Result<(Put, Schedule), AdminError> {
        let mut schedule = spec.validate(id)?;
        let existing = self.store.get_spec(id).await?;
        let (mut put, last) = match &existing {
            None => (Put::Created, None),
            Some((_, last)) => (Put::Replaced, *last),
        };
        if let Some((old, _)) = &existing {
            if keep_paused {
                schedule.spec.enabled = old.enabled;
            }
            if *old == schedule.spec {
                put = Put::Unchanged;
            }
        }
        if put != Put::Unchanged {
            self.write(&schedule, last, false).await?;
        }
        Ok((put, schedule))
    }

    /// Pauses (`false`) or resumes (`true`) schedule `id`.
    pub(crate) async fn set_enabled(&self, id: &str, enabled: bool) -> Result<(), AdminError> {
        let Some((spec, last)) = self.store.get_spec(id).await? else {
            return Err(AdminError::NotFound(id.to_string()));
        };
        let mut schedule = spec.validate(id)?;
        schedule.spec.enabled = enabled;
        // Pausing withdraws occurrences handed to the delay queue ahead of
        // their tick, so a paused schedule fires nothing more.
        self.write(&schedule, last, !enabled).await
    }

    /// Deletes schedule `id`.
    pub(crate) async fn delete(&self, id: &str) -> Result<(), AdminError> {
        if self.store.delete(id).await? {
            Ok(())
        } else {
            Err(AdminError::NotFound(id.to_string()))
        }
    }

    /// Schedule `id` as the API shows it.
    pub(crate) async fn view(&self, id: &str) -> Result<View, AdminError> {
        self.store
            .view(id)
            .await?
            .ok_or_else(|| AdminError::NotFound(id.to_string()))
    }

    async fn write(
        &self,
        schedule: &Schedule,
        last: Option<i64>,
        withdraw: bool,
    ) -> Result<(), AdminError> {
        let next = if schedule.spec.enabled {
            let now = self.store.now().await?;
            first_tick(&schedule.trigger, now, last)
        } else {
            None
        };
        self.store
            .put(&schedule.spec, &schedule.id, next, withdraw)
            .await?;
        self.changed.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_tick_never_repeats_a_fired_tick() {
        let every = Trigger::Every {
            every_ms: 1000,
            start_at: 0,
        };
        assert_eq!(first_tick(&every, 5_500, None), Some(6_000));
        assert_eq!(first_tick(&every, 5_500, Some(6_000)), Some(7_000));
        assert_eq!(first_tick(&Trigger::At(100), 5_000, None), Some(100));
        assert_eq!(first_tick(&Trigger::At(100), 5_000, Some(100)), None);
    }
}
