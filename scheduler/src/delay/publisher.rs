//! Publishing from the scheduler: ready tasks to `NS.tasks` and dead letters
//! to `NS.dead`, on one channel in confirm mode. Callers hold on to the
//! returned [`PublisherConfirm`]s, so many confirms are outstanding at once.

use kairos_shared::amqp::Blocked;
use kairos_shared::contract::{Names, Task};
use kairos_shared::short::short;
use kairos_shared::topology::{DeclareError, QueueCache};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};

/// The scheduler's confirming channel and the task queues it declared.
pub(crate) struct Publisher {
    channel: Channel,
    names: Names,
    declared: QueueCache,
    blocked: Blocked,
}

impl Publisher {
    /// Opens a channel on `conn` in confirm mode.
    pub(crate) async fn open(conn: &Connection, names: Names) -> lapin::Result<Self> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher {
            channel,
            names,
            declared: QueueCache::default(),
            blocked: Blocked::watch(conn),
        })
    }

    /// Whether the broker blocks this connection's publishing (a resource
    /// alarm), followed as it changes.
    pub(crate) fn blocked(&self) -> Blocked {
        self.blocked.clone()
    }

    /// Publishes many due tasks, all handed to lapin together: each publish
    /// resolves only once lapin's I/O thread wrote it, so they must not be
    /// awaited one by one (a thread hand-off per task). One result per
    /// task, in order:
    /// a task whose queue cannot be named fails alone
    /// ([`DeclareError::BadName`]); a broker error fails them all.
    pub(crate) async fn publish_ready_many(
        &self,
        tasks: &[&Task],
    ) -> Vec<Result<PublisherConfirm, DeclareError>> {
        let mut named = Vec::with_capacity(tasks.len());
        for task in tasks {
            match self
                .declared
                .ensure(&self.channel, &self.names, &task.queue)
                .await
            {
                Ok(()) => named.push(true),
                Err(DeclareError::BadName(_)) => named.push(false),
                Err(DeclareError::Amqp(err)) => {
                    return tasks
                        .iter()
                        .map(|_| Err(DeclareError::Amqp(err.clone())))
                        .collect();
                }
                // The settings' fault, not the tasks': they stay in the
                // delay queue, and the pump tries again on a new channel
                // (the broker closed this one) until an operator acts.
                Err(e @ DeclareError::Inequivalent(_)) => {
                    tracing::error!(cause = %e, "cannot publish due tasks");
                    return tasks.iter().map(|_| Err(e.clone())).collect();
                }
            }
        }
        let sends = tasks.iter().zip(named).map(|(t, ok)| async move {
            if !ok {
                // `ensure` refused the name; say why again for this task.
                return Err(DeclareError::BadName(
                    kairos_shared::contract::ProtocolError::BadQueue(format!(
                        "{:?} cannot name a queue",
                        kairos_shared::short::preview(&t.queue)
                    )),
                ));
            }
            self.send_ready(t).await
        });
        futures_util::future::join_all(sends).await
    }

    async fn send_ready(&self, task: &Task) -> Result<PublisherConfirm, DeclareError> {
        let mut props = task.publish_properties();
        // A `shortest-first` queue orders by the task's length, whatever
        // priority its publisher chose (retries come this way too).
        let priority = self.names.orders().publish_priority(
            &task.queue,
            task.priority,
            task.cost,
            task.estimate_ms,
        );
        if priority != task.priority {
            props = props.with_priority(priority);
        }
        // In quorum mode the key picks the band of the priority sent.
        let key = self.names.route(&task.queue, priority)?;
        Ok(self
            .channel
            .basic_publish(
                self.names.short_tasks_exchange(),
                key,
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &task.body,
                props,
            )
            .await?)
    }

    /// Publishes a dead letter with its routing key set to the origin queue.
    pub(crate) async fn publish_dead(
        &self,
        origin_queue: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> lapin::Result<PublisherConfirm> {
        // `NS.dead` is a fanout exchange: the key only informs consumers,
        // and one that is not a short string is left out (the
        // `x-origin-queue` header carries it in full).
        let key = short("routing key", origin_queue).unwrap_or_default();
        self.channel
            .basic_publish(
                self.names.short_dead(),
                key,
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
    }

    /// Forgets a queue whose publish came back unroutable, so the next
    /// attempt declares it again.
    pub(crate) fn forget_queue(&self, queue: &str) {
        self.declared.forget(queue);
    }
}
