//! Publishing from the scheduler: ready tasks to `NS.tasks` and dead letters
//! to `NS.dead`, on one channel in confirm mode. Callers hold on to the
//! returned [`PublisherConfirm`]s, so many confirms are outstanding at once.

use kairos_shared::amqp::Blocked;
use kairos_shared::contract::{Names, Task};
use kairos_shared::topology::QueueCache;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};

pub struct Publisher {
    channel: Channel,
    names: Names,
    declared: QueueCache,
    blocked: Blocked,
}

impl Publisher {
    pub async fn open(conn: &Connection, names: Names) -> lapin::Result<Self> {
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
    pub fn blocked(&self) -> Blocked {
        self.blocked.clone()
    }

    /// Publishes a due task, mandatory: a return means the queue vanished.
    pub async fn publish_ready(&self, task: &Task) -> lapin::Result<PublisherConfirm> {
        self.declared
            .ensure(&self.channel, &self.names, &task.queue)
            .await?;
        self.send_ready(task).await
    }

    /// Publishes many due tasks, all handed to lapin together: each publish
    /// resolves only once lapin's I/O thread wrote it, so awaiting them one
    /// by one costs a thread hand-off per task and capped promotion at
    /// about half the broker's publish rate. One result per task, in order.
    pub async fn publish_ready_many(
        &self,
        tasks: &[&Task],
    ) -> Vec<lapin::Result<PublisherConfirm>> {
        for task in tasks {
            if let Err(err) = self
                .declared
                .ensure(&self.channel, &self.names, &task.queue)
                .await
            {
                return tasks.iter().map(|_| Err(err.clone())).collect();
            }
        }
        futures_util::future::join_all(tasks.iter().map(|t| self.send_ready(t))).await
    }

    async fn send_ready(&self, task: &Task) -> lapin::Result<PublisherConfirm> {
        self.channel
            .basic_publish(
                self.names.tasks_exchange().into(),
                task.queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &task.body,
                task.publish_properties(),
            )
            .await
    }

    /// Publishes a dead letter with its routing key set to the origin queue.
    pub async fn publish_dead(
        &self,
        origin_queue: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> lapin::Result<PublisherConfirm> {
        self.channel
            .basic_publish(
                self.names.dead().into(),
                origin_queue.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
    }

    /// Forgets a queue whose publish came back unroutable, so the next
    /// attempt declares it again.
    pub fn forget_queue(&self, queue: &str) {
        self.declared.forget(queue);
    }
}
