//! The dead-letter queue `NS.dead`: page through it with filters, show one
//! letter with its body, replay or purge those a filter selects, count
//! them per origin queue. `kairosctl dead` and `/v1/dead` are built on
//! this.
//!
//! * `filter`: which letters an operation touches ([`Filter`]).
//! * `cursor`: where a page ended ([`Cursor`]), and why it stays stable.
//! * `scan`: reading the queue from its head and putting back what stays.
//! * `letter`: a letter as the API shows it.
//!
//! Replaying publishes the task to `NS.tasks` under its origin queue with
//! the dead-letter headers and `x-attempt` removed, so it starts over with a
//! full set of retries, and acks the dead letter only after the broker
//! confirmed the replay: a crash in between leaves the dead letter in place
//! (and at worst replays it twice). A dead letter whose origin queue
//! cannot be a queue name (`x-origin-queue` over 200 bytes, say) is not
//! replayed: it stays dead and is reported as refused, with the reason; so
//! is one without a task name, which would only fail again.
//!
//! Everything but the unfiltered purge reads the queue from its head, at
//! most [`MAX_SCAN`] letters per call.

mod cursor;
mod filter;
mod letter;
mod scan;

pub use cursor::{fingerprint, Cursor, MARKS};
pub use filter::{
    Filter, FilterError, MAX_FILTER_ERROR_BYTES, MAX_FILTER_IDS, MAX_FILTER_NAME_BYTES,
};
pub use letter::{base64, to_json, DeadLetter, LetterDetail};
pub use scan::{MAX_SCAN, REQUEUE_WAIT};

use crate::client::check;
use crate::contract::ProtocolError::BadQueue;
use crate::contract::{Names, ProtocolError, H_ATTEMPT, H_ERROR, H_FAILED_AT, H_ORIGIN_QUEUE};
use crate::short::short;
use crate::topology::{self, DeclareError};
use lapin::options::{BasicPublishOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use letter::{describe, detail, origin_queue};
use scan::{with_scan, Scan};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

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
    /// The origin queue exists in another order than `KAIROS_QUEUE_ORDER`
    /// gives it.
    #[error("cannot replay: {0}")]
    QueueOrder(#[source] DeclareError),
}

/// What a replay did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Replayed {
    /// Ids of the tasks sent back to their queues.
    pub replayed: Vec<String>,
    /// Dead letters that were wanted but cannot be replayed; they stay dead.
    pub refused: Vec<Refused>,
    /// Ids asked for (`Filter::ids`) that no letter had, among those the
    /// filter's other conditions select.
    pub not_found: Vec<String>,
    /// The scan stopped at [`MAX_SCAN`] letters with more behind: call
    /// again for those.
    pub truncated: bool,
}

/// A dead letter a replay left dead, and why.
#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Refused {
    /// Its task id, if readable.
    pub id: Option<String>,
    /// Why it cannot be replayed.
    pub error: String,
}

/// One page of dead letters, oldest first.
#[derive(Clone, Debug, Default, Serialize, PartialEq, utoipa::ToSchema)]
#[schema(as = DeadPage)]
pub struct Page {
    /// The letters of this page.
    pub dead: Vec<DeadLetter>,
    /// Where the next page starts; None when the scan reached the end of
    /// the queue. A page may be short, even empty, with a cursor (a filter
    /// that matched few): keep going until it is None.
    pub next_cursor: Option<String>,
    /// The scan stopped at [`MAX_SCAN`] letters from the head with more
    /// behind them, which this listing cannot reach.
    pub truncated: bool,
}

/// What a purge by filter did.
#[derive(Clone, Debug, Default, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Purged {
    /// Letters deleted.
    pub purged: u64,
    /// The scan stopped at [`MAX_SCAN`] letters with more behind.
    pub truncated: bool,
}

/// Dead letters per origin queue (`GET /v1/queues`).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DeadCounts {
    /// Letters per origin queue, among those counted.
    pub queues: BTreeMap<String, u64>,
    /// Letters in `NS.dead` as the broker counts them (those held by a
    /// scan elsewhere not included).
    pub total: u64,
    /// Whether every letter was counted (false: the count stopped at its
    /// bound and `queues` covers the oldest ones only).
    pub complete: bool,
}

/// The header a quorum queue adds to a redelivered message: a replayed
/// task starts its count again, and a stale one would mislead a consumer
/// that reads it.
const X_DELIVERY_COUNT: &str = "x-delivery-count";

/// The properties of a replayed task: as it died, minus the dead-letter
/// headers, the attempt count and a quorum queue's delivery count.
pub fn replay_properties(props: &BasicProperties) -> BasicProperties {
    let mut kept = FieldTable::default();
    if let Some(headers) = props.headers() {
        for (k, v) in headers.inner() {
            if ![
                H_ERROR,
                H_FAILED_AT,
                H_ORIGIN_QUEUE,
                H_ATTEMPT,
                "x-death",
                X_DELIVERY_COUNT,
            ]
            .contains(&k.as_str())
            {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    props.clone().with_headers(kept).with_delivery_mode(2)
}

/// Reads up to `limit` dead letters from the head without removing them.
pub async fn list(
    conn: &Connection,
    names: &Names,
    limit: usize,
) -> Result<Vec<DeadLetter>, DeadError> {
    Ok(page(conn, names, &Filter::default(), limit, None)
        .await?
        .dead)
}

/// Up to `limit` letters `filter` selects, oldest first, after `cursor`
/// (from the head without one). Nothing is removed. See `cursor` for what
/// a concurrent replay or purge does to the next page.
pub async fn page(
    conn: &Connection,
    names: &Names,
    filter: &Filter,
    limit: usize,
    cursor: Option<Cursor>,
) -> Result<Page, DeadError> {
    with_scan(conn, names, MAX_SCAN, false, async |scan: &mut Scan| {
        // (position, letter) of the matches after the start.
        let mut out: Vec<(usize, DeadLetter)> = Vec::new();
        if let Some(c) = &cursor {
            // Look for the letters the cursor marked, at or before its
            // position: the page starts after the furthest one found; if
            // none is left, where the oldest of them was.
            let mut found = false;
            let mut unmarked: Vec<(usize, DeadLetter)> = Vec::new();
            while scan.read < c.position {
                let Some(m) = scan.next().await? else { break };
                scan.keep(&m);
                let i = scan.read - 1;
                let d = describe(&m);
                if c.marks.contains(&fingerprint(&d)) {
                    found = true;
                    out.clear();
                } else if filter.matches(&d) {
                    if out.len() < limit {
                        out.push((i, d.clone()));
                    }
                    if i >= c.first && unmarked.len() < limit {
                        unmarked.push((i, d));
                    }
                }
            }
            if !found {
                out = unmarked;
            }
        }
        while out.len() < limit {
            let Some(m) = scan.next().await? else { break };
            scan.keep(&m);
            let d = describe(&m);
            if filter.matches(&d) {
                out.push((scan.read - 1, d));
            }
        }
        out.truncate(limit);
        let at_end = scan.remaining == 0 || scan.truncated || scan.read >= MAX_SCAN;
        let next_cursor = if at_end || out.len() < limit {
            None
        } else {
            Cursor::after(&out).map(|c| c.to_string())
        };
        Ok(Page {
            dead: out.into_iter().map(|(_, d)| d).collect(),
            next_cursor,
            truncated: scan.truncated || (scan.read >= MAX_SCAN && scan.remaining > 0),
        })
    })
    .await
}

/// The oldest letter with task id `id`, with its body and headers; None
/// when none among the first [`MAX_SCAN`].
pub async fn show(
    conn: &Connection,
    names: &Names,
    id: &str,
) -> Result<Option<LetterDetail>, DeadError> {
    with_scan(conn, names, MAX_SCAN, false, async |scan: &mut Scan| {
        while let Some(m) = scan.next().await? {
            scan.keep(&m);
            if m.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str())
                == Some(id)
            {
                return Ok(Some(detail(&m)));
            }
        }
        Ok(None)
    })
    .await
}

/// Replays dead letters to their queues: those whose id is in `ids`, or all
/// (up to `limit`) when `ids` is empty. See [`replay_matching`].
pub async fn replay(
    conn: &Connection,
    names: &Names,
    ids: &[String],
    limit: usize,
) -> Result<Replayed, DeadError> {
    replay_matching(conn, names, &Filter::ids(ids), limit).await
}

/// Replays the letters `filter` selects (at most `limit`) to their queues;
/// the others stay where they were. Letters without a task name, and those
/// whose origin queue is not a usable queue name, stay dead and are listed
/// in `refused`.
pub async fn replay_matching(
    conn: &Connection,
    names: &Names,
    filter: &Filter,
    limit: usize,
) -> Result<Replayed, DeadError> {
    let wanted_ids: BTreeSet<&str> = filter.ids.iter().map(String::as_str).collect();
    let mut done = with_scan(conn, names, MAX_SCAN, true, async |scan: &mut Scan| {
        let mut out = Replayed::default();
        let mut handled: BTreeSet<String> = BTreeSet::new();
        while out.replayed.len() < limit {
            if !wanted_ids.is_empty() && handled.len() == wanted_ids.len() {
                break;
            }
            let Some(m) = scan.next().await? else { break };
            let d = describe(&m);
            if !filter.matches(&d) {
                scan.keep(&m);
                continue;
            }
            if let Some(id) = &d.id {
                handled.insert(id.clone());
            }
            match replay_one(scan, names, &m).await? {
                Ok(()) => {
                    scan.remove(&m).await?;
                    out.replayed.push(d.id.unwrap_or_default());
                }
                Err(error) => {
                    tracing::warn!(id = ?d.id, %error, "dead letter left dead");
                    scan.keep(&m);
                    out.refused.push(Refused { id: d.id, error });
                }
            }
        }
        out.truncated = scan.truncated;
        out.not_found = wanted_ids
            .iter()
            .filter(|id| !handled.contains(**id))
            .map(|id| id.to_string())
            .collect();
        tracing::info!(
            seen = scan.read,
            replayed = out.replayed.len(),
            refused = out.refused.len(),
            "dead letters replayed"
        );
        Ok(out)
    })
    .await?;
    done.not_found.sort();
    Ok(done)
}

/// Publishes one letter back to its queue and waits for the confirm. The
/// inner error says why the letter cannot be replayed (it stays dead).
async fn replay_one(
    scan: &Scan,
    names: &Names,
    m: &lapin::message::BasicGetMessage,
) -> Result<Result<(), String>, DeadError> {
    if m.delivery.properties.kind().is_none() {
        return Ok(Err(
            "cannot replay: no task name (type); it would only fail again".into(),
        ));
    }
    // A letter RabbitMQ dead-lettered from a band queue (no
    // `x-origin-queue`) carries the band's key: back to its logical queue.
    let queue = names.logical_of_key(&origin_queue(m)).to_string();
    // The origin queue comes from a header anyone can write: it must
    // make a queue name and a routing key before anything is sent.
    // In quorum mode the letter goes back to the band of its priority, as
    // its first publish did (a shortest-first publisher already put the
    // computed priority in the message).
    let priority = m.delivery.properties.priority().unwrap_or(0);
    let key = match names
        .queue_name(&queue)
        .and_then(|_| short("x-origin-queue", &queue).map_err(|e| BadQueue(e.to_string())))
        .and_then(|_| names.route(&queue, priority))
    {
        Ok(key) => key,
        Err(err) => return Ok(Err(format!("cannot replay: {err}"))),
    };
    match topology::declare_task_queue(&scan.channel, names, &queue).await {
        Ok(()) => {}
        Err(DeclareError::Amqp(e)) => return Err(e.into()),
        Err(DeclareError::BadName(e)) => return Err(DeadError::BadQueue(e)),
        // The queue exists in another order than the settings give it: the
        // broker closed the channel, so the replay stops here, saying why.
        Err(e @ DeclareError::Inequivalent(_)) => return Err(DeadError::QueueOrder(e)),
    }
    let confirm = scan
        .channel
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
    Ok(Ok(()))
}

/// Deletes every dead letter at once; returns how many there were.
pub async fn purge(conn: &Connection, names: &Names) -> Result<u32, DeadError> {
    let _turn = scan::turn(names).await;
    let channel = conn.create_channel().await?;
    let n = channel
        .queue_purge(names.short_dead(), QueuePurgeOptions::default())
        .await;
    let _ = channel.close(200, "purged".into()).await;
    Ok(n?)
}

/// Deletes the letters `filter` selects and keeps the others in place; an
/// empty filter purges the whole queue at once (no scan, no bound).
pub async fn purge_matching(
    conn: &Connection,
    names: &Names,
    filter: &Filter,
) -> Result<Purged, DeadError> {
    if filter.is_empty() {
        let n = purge(conn, names).await?;
        return Ok(Purged {
            purged: u64::from(n),
            truncated: false,
        });
    }
    with_scan(conn, names, MAX_SCAN, false, async |scan: &mut Scan| {
        let mut purged = 0;
        while let Some(m) = scan.next().await? {
            if filter.matches(&describe(&m)) {
                scan.remove(&m).await?;
                purged += 1;
            } else {
                scan.keep(&m);
            }
        }
        tracing::info!(purged, seen = scan.read, "dead letters purged by filter");
        Ok(Purged {
            purged,
            truncated: scan.truncated,
        })
    })
    .await
}

/// Dead letters per origin queue, counting at most `max` of them (from the
/// head). An empty queue costs one round trip; the others hold the
/// queue's letters for as long as the count takes, so keep `max` small
/// for a page polled often (the queues overview uses 10 000).
pub async fn count_by_queue(
    conn: &Connection,
    names: &Names,
    max: usize,
) -> Result<DeadCounts, DeadError> {
    let total = {
        let channel = conn.create_channel().await?;
        let n = scan::ready_count(&channel, &names.short_dead()).await;
        let _ = channel.close(200, "counted".into()).await;
        n?
    };
    if total == 0 {
        return Ok(DeadCounts {
            complete: true,
            ..DeadCounts::default()
        });
    }
    with_scan(
        conn,
        names,
        max.min(MAX_SCAN),
        false,
        async |scan: &mut Scan| {
            let mut queues: BTreeMap<String, u64> = BTreeMap::new();
            while let Some(m) = scan.next().await? {
                scan.keep(&m);
                *queues.entry(origin_queue(&m)).or_default() += 1;
            }
            Ok(DeadCounts {
                queues,
                total: total.max(scan.read as u64),
                complete: !scan.truncated && max > 0,
            })
        },
    )
    .await
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
