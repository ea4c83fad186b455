//! The dead-letter queue `NS.dead`: look at it, replay tasks from it, purge
//! it. `kairosctl dead` is built on this.
//!
//! Replaying publishes the task to `NS.tasks` under its origin queue with
//! the dead-letter headers and `x-attempt` removed, so it starts over with a
//! full set of retries, and acks the dead letter only after the broker
//! confirmed the replay: a crash in between leaves the dead letter in place
//! (and at worst replays it twice). A dead letter whose origin queue
//! cannot be a queue name (`x-origin-queue` over 200 bytes, say) is not
//! replayed: it stays dead and is reported as refused, with the reason.

use crate::client::check;
use crate::contract::ProtocolError::BadQueue;
use crate::contract::{
    value_to_string, Names, ProtocolError, H_ATTEMPT, H_ERROR, H_FAILED_AT, H_ORIGIN_QUEUE,
};
use crate::short::short;
use crate::topology::{self, DeclareError};
use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

/// One dead letter, as `kairosctl dead list` shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DeadLetter {
    /// Task id (`message_id`), if it had a readable one.
    pub id: Option<String>,
    /// Task name (`type`), if readable.
    pub name: Option<String>,
    /// The queue it was meant for (`x-origin-queue`, else the routing key).
    pub queue: String,
    /// `x-attempt` as text.
    pub attempt: Option<String>,
    /// `x-error`: why it failed.
    pub error: Option<String>,
    /// `x-failed-at`, Unix ms.
    pub failed_at: Option<i64>,
    /// Size of its body.
    pub body_bytes: usize,
}

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadError {
    /// The connection or channel failed.
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused or returned a replayed task.
    #[error("the broker did not confirm the replay: {0}")]
    NotConfirmed(#[source] crate::client::ClientError),
    /// The origin queue of a replayed task cannot be declared.
    #[error("the broker did not confirm the replay: {0}")]
    BadQueue(#[source] ProtocolError),
}

/// What a replay did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Replayed {
    /// Ids of the tasks sent back to their queues.
    pub replayed: Vec<String>,
    /// Dead letters that were wanted but cannot be replayed; they stay dead.
    pub refused: Vec<Refused>,
}

/// A dead letter a replay left dead, and why.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Refused {
    /// Its task id, if readable.
    pub id: Option<String>,
    /// Why it cannot be replayed.
    pub error: String,
}

fn header(props: &BasicProperties, name: &str) -> Option<String> {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
        .map(value_to_string)
}

fn describe(m: &BasicGetMessage) -> DeadLetter {
    let p = &m.delivery.properties;
    DeadLetter {
        id: p.message_id().as_ref().map(|s| s.to_string()),
        name: p.kind().as_ref().map(|s| s.to_string()),
        queue: origin_queue(m),
        attempt: header(p, H_ATTEMPT),
        error: header(p, H_ERROR),
        failed_at: header(p, H_FAILED_AT).and_then(|s| s.parse().ok()),
        body_bytes: m.delivery.data.len(),
    }
}

fn origin_queue(m: &BasicGetMessage) -> String {
    header(&m.delivery.properties, H_ORIGIN_QUEUE)
        .unwrap_or_else(|| m.delivery.routing_key.to_string())
}

/// The properties of a replayed task: as it died, minus the dead-letter
/// headers and the attempt count.
pub fn replay_properties(props: &BasicProperties) -> BasicProperties {
    let mut kept = FieldTable::default();
    if let Some(headers) = props.headers() {
        for (k, v) in headers.inner() {
            if ![H_ERROR, H_FAILED_AT, H_ORIGIN_QUEUE, H_ATTEMPT, "x-death"].contains(&k.as_str()) {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    props.clone().with_headers(kept).with_delivery_mode(2)
}

/// The next dead letter, held unacked on `channel` (so closing the channel
/// or a nack puts it back).
async fn next_dead(channel: &Channel, names: &Names) -> Result<Option<BasicGetMessage>, DeadError> {
    Ok(channel
        .basic_get(names.short_dead(), BasicGetOptions { no_ack: false })
        .await?)
}

/// Reads up to `limit` dead letters without removing them.
pub async fn list(
    conn: &Connection,
    names: &Names,
    limit: usize,
) -> Result<Vec<DeadLetter>, DeadError> {
    let channel = conn.create_channel().await?;
    let mut out = Vec::new();
    let mut last_tag = None;
    while out.len() < limit {
        let Some(m) = next_dead(&channel, names).await? else {
            break;
        };
        last_tag = Some(m.delivery.acker.clone());
        out.push(describe(&m));
    }
    // Everything read goes back, in order.
    if let Some(acker) = last_tag {
        acker
            .nack(BasicNackOptions {
                multiple: true,
                requeue: true,
            })
            .await?;
    }
    let _ = channel.close(200, "listed".into()).await;
    Ok(out)
}

/// Replays dead letters to their queues: those whose id is in `ids`, or all
/// (up to `limit`) when `ids` is empty. Messages without a task name stay
/// dead: replaying them would only fail again, and so do those whose
/// origin queue is not a usable queue name (reported in `refused`).
pub async fn replay(
    conn: &Connection,
    names: &Names,
    ids: &[String],
    limit: usize,
) -> Result<Replayed, DeadError> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut replayed = Vec::new();
    let mut refused = Vec::new();
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while replayed.len() < limit {
        let Some(m) = next_dead(&channel, names).await? else {
            break;
        };
        seen += 1;
        let d = describe(&m);
        let wanted = ids.is_empty() || d.id.as_ref().is_some_and(|id| ids.contains(id));
        if !wanted || d.name.is_none() {
            kept.push(m);
            continue;
        }
        let queue = origin_queue(&m);
        // The origin queue comes from a header anyone can write: it must
        // make a queue name and a routing key before anything is sent.
        let key = match names
            .queue_name(&queue)
            .and_then(|_| short("x-origin-queue", &queue).map_err(|e| BadQueue(e.to_string())))
        {
            Ok(key) => key,
            Err(err) => {
                let error = format!("cannot replay: {err}");
                tracing::warn!(id = ?d.id, %error, "dead letter left dead");
                refused.push(Refused { id: d.id, error });
                kept.push(m);
                if !ids.is_empty() && replayed.len() + refused.len() == ids.len() {
                    break;
                }
                continue;
            }
        };
        match topology::declare_task_queue(&channel, names, &queue).await {
            Ok(()) => {}
            Err(DeclareError::Amqp(e)) => return Err(e.into()),
            Err(DeclareError::BadName(e)) => return Err(DeadError::BadQueue(e)),
        }
        let confirm = channel
            .basic_publish(
                names.short_tasks_exchange(),
                key,
                BasicPublishOptions::default(),
                &m.delivery.data,
                replay_properties(&m.delivery.properties),
            )
            .await?
            .await?;
        check(confirm).map_err(DeadError::NotConfirmed)?;
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        replayed.push(d.id.unwrap_or_default());
        if !ids.is_empty() && replayed.len() + refused.len() == ids.len() {
            break;
        }
    }
    for m in kept {
        m.delivery
            .acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await?;
    }
    tracing::info!(
        seen,
        replayed = replayed.len(),
        refused = refused.len(),
        "dead letters replayed"
    );
    let _ = channel.close(200, "replayed".into()).await;
    Ok(Replayed { replayed, refused })
}

/// Deletes every dead letter; returns how many there were.
pub async fn purge(conn: &Connection, names: &Names) -> Result<u32, DeadError> {
    let channel = conn.create_channel().await?;
    let n = channel
        .queue_purge(names.short_dead(), QueuePurgeOptions::default())
        .await?;
    let _ = channel.close(200, "purged".into()).await;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{text, Task};
    use lapin::types::AMQPValue;

    #[test]
    fn replay_strips_the_dead_letter_headers_and_the_attempt() {
        let mut h = FieldTable::default();
        h.insert("custom".into(), text("keep"));
        h.insert(crate::contract::H_MAX_RETRIES.into(), AMQPValue::LongInt(2));
        let props = BasicProperties::default()
            .with_type("t".into())
            .with_message_id("id".into())
            .with_headers(h);
        let mut task = Task::decode("q", &props, b"").unwrap();
        task.attempt = 3;
        let dead = task.dead_letter_properties("boom", 1);
        let replayed = Task::decode("q", &replay_properties(&dead), b"").unwrap();
        assert_eq!(replayed.attempt, 1);
        assert_eq!(replayed.max_retries, Some(2));
        assert_eq!(replayed.header("custom"), Some(&text("keep")));
        assert!(replayed.header(H_ERROR).is_none());
        assert!(replayed.header(H_ORIGIN_QUEUE).is_none());
        assert!(replayed.header(H_FAILED_AT).is_none());
    }
}
