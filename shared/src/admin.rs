//! An operator's view of one namespace on the broker: how deep a queue is,
//! a private queue that listens to the lifecycle events, and removing the
//! namespace's AMQP topology.
//!
//! The integration tests and the benchmark run every case in a namespace
//! of its own and remove it afterwards; these are the operations they
//! share. Nothing here runs in the scheduler or the worker.
//!
//! The namespace's Redis keys all begin with [`key_pattern`]'s prefix;
//! removing them needs a Redis client, which this crate does not carry, so
//! callers `SCAN`/`KEYS` that pattern with their own.

use crate::contract::Names;
use crate::short::short;
use lapin::options::{
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};

/// The routing-key pattern that matches every task lifecycle event on
/// `NS.events` (`task.started`, `task.succeeded`, ...).
pub const ALL_TASK_EVENTS: &str = "task.#";

/// Messages ready in `queue` now (delivered but unacked ones are not
/// counted). A passive declare: an error when the queue does not exist,
/// which closes `channel`.
pub async fn queue_depth(channel: &Channel, queue: &str) -> lapin::Result<u32> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(declared.message_count())
}

/// Messages ready in logical queue `logical`: [`queue_depth`] of its
/// `NS.q.QUEUE`, summed over its priority bands in quorum mode
/// ([`Names::bands`]). An error when one of them does not exist.
pub async fn logical_queue_depth(
    channel: &Channel,
    names: &Names,
    logical: &str,
) -> lapin::Result<u32> {
    let mut total = 0u32;
    for band in names.bands(logical) {
        // A logical name that cannot make a queue has no messages.
        let Ok(queue) = names.band_queue(logical, *band) else {
            return Ok(0);
        };
        total = total.saturating_add(queue_depth(channel, queue.as_str()).await?);
    }
    Ok(total)
}

/// Declares a server-named queue, exclusive to `channel`'s connection and
/// deleted with it, bound to `NS.events` for the events whose routing key
/// matches `pattern` (e.g. [`ALL_TASK_EVENTS`]). Returns its name, to
/// consume from.
pub async fn listen_to_events(
    channel: &Channel,
    names: &Names,
    pattern: &str,
) -> lapin::Result<ShortString> {
    listen_to_events_with(channel, names, &[pattern], FieldTable::default()).await
}

/// [`listen_to_events`] for several routing-key `patterns`, with queue
/// `arguments` (a length cap, say). The patterns are Kairos's own
/// (`task.KIND`, `task.*`), well within a short string.
pub async fn listen_to_events_with(
    channel: &Channel,
    names: &Names,
    patterns: &[&str],
    arguments: FieldTable,
) -> lapin::Result<ShortString> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    for pattern in patterns {
        channel
            .queue_bind(
                queue.name().clone(),
                names.short_events(),
                (*pattern).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(queue.name().clone())
}

/// Deletes the namespace's exchanges, its scheduler intake and dead-letter
/// queues (everything [`crate::topology::declare_base`] declares), and
/// `queues`: the ones only the caller knows (task queues, the scheduler's
/// schedule outcomes queue, queues a test declared).
///
/// Best effort: it goes on past a failure and returns the first one. The
/// broker closes the channel on a failed operation, so what follows a
/// failure fails too; pass a fresh channel.
pub async fn delete_topology(
    channel: &Channel,
    names: &Names,
    queues: impl IntoIterator<Item = String>,
) -> lapin::Result<()> {
    let mut first_error = None;
    let all_queues = queues
        .into_iter()
        .chain([names.delay(), names.retry(), names.dead()]);
    for queue in all_queues {
        // A name too long for AMQP cannot name a queue: nothing to delete.
        let Ok(queue) = short("queue", &queue) else {
            continue;
        };
        let deleted = channel
            .queue_delete(queue, QueueDeleteOptions::default())
            .await;
        if let Err(e) = deleted {
            first_error.get_or_insert(e);
        }
    }
    let exchanges = [
        names.tasks_exchange(),
        names.delay(),
        names.retry(),
        names.dead(),
        names.events(),
        crate::control::exchange(names),
    ];
    for exchange in exchanges {
        let Ok(exchange) = short("exchange", &exchange) else {
            continue;
        };
        let deleted = channel
            .exchange_delete(exchange, ExchangeDeleteOptions::default())
            .await;
        if let Err(e) = deleted {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The glob that matches every Redis key of the namespace (`NS:*`). A
/// checked namespace holds no glob characters
/// ([`crate::contract::validate_namespace`]), so it matches nothing else.
pub fn key_pattern(names: &Names) -> String {
    format!("{}:*", names.namespace())
}

/// A message's `message_id` (the task id), or an empty string when it has
/// none: for counting what arrived in a queue.
pub fn message_id(props: &BasicProperties) -> String {
    props
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pattern_covers_the_namespace_only() {
        assert_eq!(key_pattern(&Names::new("kt-a.b:c")), "kt-a.b:c:*");
    }

    #[test]
    fn message_id_is_empty_when_absent() {
        let props = BasicProperties::default();
        assert_eq!(message_id(&props), "");
        assert_eq!(message_id(&props.with_message_id("t-1".into())), "t-1");
    }
}
