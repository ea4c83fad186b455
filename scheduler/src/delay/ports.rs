//! The seams between the delay queue's decisions and its servers: what the
//! pump and the intake need from the delay store, from the publisher, and
//! from a delivery. The production types implement them by delegating to
//! their own methods; the in-memory store ([`crate::delay::memory`]) and
//! the unit tests' fakes implement them too, so the decisions are tested
//! without Redis or RabbitMQ.
//!
//! Every seam is generic (static dispatch): the pump calls them once per
//! batch or per task at tens of thousands of tasks a second, and the
//! production build compiles to the same calls as without the seam.

use crate::delay::publisher::Publisher;
use crate::delay::store::{Claim, Claimed, Entry, Held, QueueError, RedisDelayQueue, ReplicaCheck};
use kairos_shared::amqp::Blocked;
use kairos_shared::contract::Task;
use kairos_shared::topology::DeclareError;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{BasicProperties, Confirmation, PublisherConfirm};
use std::future::Future;

/// Where delayed tasks wait: held with first-submission-wins, claimed into
/// a lease when due, completed once published, released when not.
/// [`RedisDelayQueue`] is the production store.
pub trait DelayStore: Clone + Send + Sync + 'static {
    /// Shards the store spreads tasks over (a claim takes up to its batch
    /// from each).
    fn shard_count(&self) -> usize;

    /// Holds the entries unless their member already waits or is leased
    /// (first submission wins); one result per entry, in order.
    fn hold(&self, entries: &[Entry]) -> impl Future<Output = Result<Held, QueueError>> + Send;

    /// Asks again whether the replicas have a hold whose `WAIT` fell
    /// short, without writing it again; says when it was lost instead.
    fn confirm(
        &self,
        proofs: &[String],
    ) -> impl Future<Output = Result<ReplicaCheck, QueueError>> + Send;

    /// Leases up to `batch` tasks per shard for `lease_ms`: those due now
    /// and those due within `ahead_ms`, each shard stopping once its
    /// records reach `batch_bytes` (it always takes its first). Expired
    /// leases return to the due index first.
    fn claim_bounded(
        &self,
        batch: usize,
        batch_bytes: usize,
        lease_ms: u64,
        ahead_ms: u64,
    ) -> impl Future<Output = Result<Claim, QueueError>> + Send;

    /// Forgets tasks whose publish the broker confirmed.
    fn complete(&self, done: &[&Claimed]) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// [`complete`](Self::complete) repeated after a call whose outcome is
    /// unknown: forgets only tasks still leased.
    fn complete_again(
        &self,
        done: &[&Claimed],
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Returns leased tasks to the due index at once.
    fn release(&self, failed: &[&Claimed]) -> impl Future<Output = Result<(), QueueError>> + Send {
        self.release_after(failed, 0)
    }

    /// Returns leased tasks to the due index, due no sooner than
    /// `delay_ms` from the store's now (their own due time if later).
    fn release_after(
        &self,
        failed: &[&Claimed],
        delay_ms: u64,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Tasks waiting or leased, over all shards.
    fn pending(&self) -> impl Future<Output = Result<u64, QueueError>> + Send;
}

impl DelayStore for RedisDelayQueue {
    fn shard_count(&self) -> usize {
        RedisDelayQueue::shard_count(self)
    }

    fn hold(&self, entries: &[Entry]) -> impl Future<Output = Result<Held, QueueError>> + Send {
        RedisDelayQueue::hold(self, entries)
    }

    fn confirm(
        &self,
        proofs: &[String],
    ) -> impl Future<Output = Result<ReplicaCheck, QueueError>> + Send {
        RedisDelayQueue::confirm(self, proofs)
    }

    fn claim_bounded(
        &self,
        batch: usize,
        batch_bytes: usize,
        lease_ms: u64,
        ahead_ms: u64,
    ) -> impl Future<Output = Result<Claim, QueueError>> + Send {
        RedisDelayQueue::claim_bounded(self, batch, batch_bytes, lease_ms, ahead_ms)
    }

    fn complete(&self, done: &[&Claimed]) -> impl Future<Output = Result<(), QueueError>> + Send {
        RedisDelayQueue::complete(self, done)
    }

    fn complete_again(
        &self,
        done: &[&Claimed],
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        RedisDelayQueue::complete_again(self, done)
    }

    fn release(&self, failed: &[&Claimed]) -> impl Future<Output = Result<(), QueueError>> + Send {
        RedisDelayQueue::release(self, failed)
    }

    fn release_after(
        &self,
        failed: &[&Claimed],
        delay_ms: u64,
    ) -> impl Future<Output = Result<(), QueueError>> + Send {
        RedisDelayQueue::release_after(self, failed, delay_ms)
    }

    fn pending(&self) -> impl Future<Output = Result<u64, QueueError>> + Send {
        RedisDelayQueue::pending(self)
    }
}

/// Publishes with confirms: ready tasks to their queues, dead letters to
/// `NS.dead`. Each publish returns its confirm, awaited later, so many are
/// outstanding at once. [`Publisher`] is the production publisher.
pub(crate) trait TaskPublisher: Send + Sync + 'static {
    /// The broker's answer to one publish.
    type Confirm: Future<Output = lapin::Result<Confirmation>> + Send + Sync + 'static;

    /// Whether the broker blocks publishing (a resource alarm).
    fn blocked(&self) -> Blocked;

    /// Publishes due tasks, all handed over together; one result per task,
    /// in order: a task whose queue cannot be named fails alone
    /// ([`DeclareError::BadName`]), a broker error fails them all.
    fn publish_ready_many(
        &self,
        tasks: &[&Task],
    ) -> impl Future<Output = Vec<Result<Self::Confirm, DeclareError>>> + Send;

    /// Publishes a dead letter with its routing key set to the origin queue.
    fn publish_dead(
        &self,
        origin_queue: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> impl Future<Output = lapin::Result<Self::Confirm>> + Send;

    /// Forgets a queue whose publish came back unroutable, so the next
    /// publish to it declares it again.
    fn forget_queue(&self, queue: &str);
}

impl TaskPublisher for Publisher {
    type Confirm = PublisherConfirm;

    fn blocked(&self) -> Blocked {
        Publisher::blocked(self)
    }

    fn publish_ready_many(
        &self,
        tasks: &[&Task],
    ) -> impl Future<Output = Vec<Result<PublisherConfirm, DeclareError>>> + Send {
        Publisher::publish_ready_many(self, tasks)
    }

    fn publish_dead(
        &self,
        origin_queue: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> impl Future<Output = lapin::Result<PublisherConfirm>> + Send {
        Publisher::publish_dead(self, origin_queue, properties, body)
    }

    fn forget_queue(&self, queue: &str) {
        Publisher::forget_queue(self, queue);
    }
}

/// One message the intake consumed: what it says, and how to settle it.
/// Settling is always with requeue: the intake never drops a message.
pub(crate) trait IntakeDelivery: Send + Sync {
    /// The queue the message was published to (its routing key).
    fn routing_key(&self) -> &str;

    /// The message's properties and headers.
    fn properties(&self) -> &BasicProperties;

    /// The message's body.
    fn data(&self) -> &[u8];

    /// Acks this delivery and every unacked one of its channel before it.
    fn ack_up_to(&self) -> impl Future<Output = lapin::Result<()>> + Send;

    /// Returns this delivery to its queue; with `multiple`, every unacked
    /// one of its channel before it as well.
    fn requeue(&self, multiple: bool) -> impl Future<Output = lapin::Result<()>> + Send;
}

impl IntakeDelivery for Delivery {
    fn routing_key(&self) -> &str {
        self.routing_key.as_str()
    }

    fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    fn data(&self) -> &[u8] {
        &self.data
    }

    async fn ack_up_to(&self) -> lapin::Result<()> {
        self.acker.ack(BasicAckOptions { multiple: true }).await?;
        Ok(())
    }

    async fn requeue(&self, multiple: bool) -> lapin::Result<()> {
        self.acker
            .nack(BasicNackOptions {
                multiple,
                requeue: true,
            })
            .await?;
        Ok(())
    }
}
