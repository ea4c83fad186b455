//! Cross-instance wake-ups. The schedule script PUBLISHes a task's due time
//! when it becomes a shard's earliest; every scheduler subscribes and wakes
//! its pump, so an instance sleeping until a later time never misses an
//! earlier task that another instance accepted.
//!
//! The subscription lives on a redis-rs `ConnectionManager` (RESP3, push
//! messages): it reconnects after a Redis restart or failover, retrying
//! without bound, and subscribes again by itself. Each subscription's
//! confirmation wakes the pump once, which covers whatever was published
//! while no subscription stood.

use kairos_shared::amqp::{sleep_or_cancel, Backoff};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ProtocolVersion, PushInfo, PushKind};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The longest backoff step between two reconnection attempts; redis-rs
/// adds a random jitter of up to as much again, so attempts stay at most
/// 5 s apart, as with [`Backoff`].
const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(2_500);

/// Subscribes to `channel` and wakes the pump (`notify`) on each message,
/// and once after every (re)subscription, until `cancel`.
pub async fn listen(
    client: redis::Client,
    channel: String,
    notify: Arc<Notify>,
    cancel: CancellationToken,
) {
    let Some((_manager, mut pushes)) = subscribe(client, &channel, &cancel).await else {
        return;
    };
    loop {
        let push = tokio::select! {
            _ = cancel.cancelled() => return,
            push = pushes.recv() => push,
        };
        match push.map(|p| p.kind) {
            Some(PushKind::Message | PushKind::Subscribe) => notify.notify_one(),
            Some(PushKind::Disconnection) => {
                tracing::warn!(
                    "wake listener: Redis connection lost; reconnecting and resubscribing"
                );
            }
            Some(_) => {}
            // The manager, which holds the sender, lives as long as this loop.
            None => return,
        }
    }
}

/// The first subscription, retried until it stands or `cancel`. Returns the
/// manager (the subscription lives as long as it does) and its pushes.
async fn subscribe(
    client: redis::Client,
    channel: &str,
    cancel: &CancellationToken,
) -> Option<(ConnectionManager, UnboundedReceiver<PushInfo>)> {
    let mut backoff = Backoff::new();
    loop {
        let (sender, pushes) = tokio::sync::mpsc::unbounded_channel();
        let config = ConnectionManagerConfig::new()
            .set_push_sender(sender)
            .set_automatic_resubscription()
            .set_number_of_retries(usize::MAX)
            .set_max_delay(MAX_RECONNECT_DELAY);
        let attempt = async {
            let mut manager = resp3(&client)?
                .get_connection_manager_with_config(config)
                .await?;
            manager.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(manager)
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return None,
            result = attempt => result,
        };
        match result {
            Ok(manager) => return Some((manager, pushes)),
            Err(err) => {
                tracing::warn!(cause = %err, "wake listener: cannot subscribe");
                if !sleep_or_cancel(backoff.next_delay(), cancel).await {
                    return None;
                }
            }
        }
    }
}

/// `client` speaking RESP3, which push messages (and so a managed
/// subscription) need; its address and TLS settings are kept.
fn resp3(client: &redis::Client) -> redis::RedisResult<redis::Client> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings))
}
