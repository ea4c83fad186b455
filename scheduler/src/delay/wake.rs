//! Cross-instance wake-ups. The schedule script PUBLISHes a task's due time
//! when it becomes a shard's earliest; every scheduler subscribes and wakes
//! its pump, so an instance sleeping until a later time never misses an
//! earlier task that another instance accepted.

use futures_util::StreamExt;
use kairos_shared::amqp::{sleep_or_cancel, Backoff};
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Subscribes to `channel` and wakes the pump (`notify`) on each message,
/// and once after every (re)subscription, until `cancel`. A lost
/// connection (a Redis restart, a failover) is reconnected and
/// resubscribed here, with a backoff, for as long as it takes: redis-rs's
/// `ConnectionManager` resubscribes only while its bounded reconnect
/// retries last, and tells no one when it did.
pub async fn listen(
    client: redis::Client,
    channel: String,
    notify: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new();
    while !cancel.is_cancelled() {
        let mut pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(err) => {
                tracing::warn!(cause = %err, "wake listener: cannot connect to Redis");
                if !sleep_or_cancel(backoff.next_delay(), &cancel).await {
                    return;
                }
                continue;
            }
        };
        if let Err(err) = pubsub.subscribe(&channel).await {
            tracing::warn!(cause = %err, "wake listener: cannot subscribe");
            if !sleep_or_cancel(backoff.next_delay(), &cancel).await {
                return;
            }
            continue;
        }
        backoff.reset();
        // Anything published while we were not subscribed is covered by one
        // extra look at the shards.
        notify.notify_one();
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                msg = messages.next() => match msg {
                    Some(_) => notify.notify_one(),
                    None => {
                        tracing::warn!("wake listener: Redis subscription ended; resubscribing");
                        break;
                    }
                }
            }
        }
    }
}
