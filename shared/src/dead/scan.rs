//! Reading `NS.dead` from its head without losing anything: each letter is
//! taken with `basic.get` and held unacked; at the end the scan's channel
//! closes, and RabbitMQ puts the ones not removed (acked) back at their old
//! places, in order. A crash puts them back the same way.
//!
//! While a scan holds letters, nobody else sees them: two scans at once
//! would each see a part of the queue. Scans in one process take turns (a
//! lock per dead-letter queue); across processes (two schedulers, a
//! kairosctl without `--http-addr`) they do not, and a listing made while
//! another process replays may miss the letters that one holds.

use super::DeadError;
use crate::contract::Names;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most letters one request reads from the head of `NS.dead` (listing,
/// showing, replaying or purging by filter, counting). Reading 10 000
/// letters took 1.3 to 1.8 s on a loaded 2-core machine (the `basic.get`s
/// pipelined), so a scan stays within a few seconds. Letters further back
/// are reached once those in front are replayed or purged.
pub const MAX_SCAN: usize = 20_000;

type Locks = BTreeMap<String, Arc<tokio::sync::Mutex<()>>>;
static LOCKS: Mutex<Locks> = Mutex::new(BTreeMap::new());

/// The lock of the dead-letter queue `queue` in this process.
fn lock_of(queue: &str) -> Arc<tokio::sync::Mutex<()>> {
    let mut locks = LOCKS.lock().unwrap_or_else(|e| e.into_inner());
    locks.entry(queue.to_string()).or_default().clone()
}

/// Takes the process's turn on `names`' dead-letter queue.
pub(super) async fn turn(names: &Names) -> tokio::sync::OwnedMutexGuard<()> {
    lock_of(&names.dead()).lock_owned().await
}

/// One pass over the queue from its head.
pub(super) struct Scan {
    pub(super) channel: Channel,
    queue: ShortString,
    /// Letters read so far (the next one's 0-based position).
    pub(super) read: usize,
    max: usize,
    /// Letters taken from the broker ahead of the caller, in queue order.
    ahead: VecDeque<BasicGetMessage>,
    /// Letters taken from the broker (read, ahead, and any that came in
    /// after it said the queue was empty).
    fetched: u64,
    /// Letters removed (acked) for good.
    removed: u64,
    /// The broker's count behind the last letter taken.
    behind_fetched: u32,
    /// The broker said the queue was empty.
    drained: bool,
    /// Size of the next read-ahead, doubling up to [`READ_AHEAD`].
    batch: usize,
    /// Letters behind the last one read, as the broker said.
    pub(super) remaining: u32,
    /// The scan stopped at [`MAX_SCAN`] with letters left.
    pub(super) truncated: bool,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Scan {
    /// A scan of at most `max` letters on a channel of its own (in confirm
    /// mode when it publishes).
    pub(super) async fn open(
        conn: &Connection,
        names: &Names,
        max: usize,
        confirm: bool,
    ) -> Result<Self, DeadError> {
        let turn = turn(names).await;
        let channel = conn.create_channel().await?;
        if confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        Ok(Scan {
            channel,
            queue: names.short_dead(),
            read: 0,
            max,
            ahead: VecDeque::new(),
            fetched: 0,
            removed: 0,
            behind_fetched: 0,
            drained: false,
            batch: 4,
            remaining: 0,
            truncated: false,
            _turn: turn,
        })
    }

    /// The next letter, or None at the end of the queue or of the scan.
    /// The caller [`keep`](Self::keep)s or [`remove`](Self::remove)s it.
    pub(super) async fn next(&mut self) -> Result<Option<BasicGetMessage>, DeadError> {
        if self.read >= self.max {
            self.truncated = self.remaining > 0;
            return Ok(None);
        }
        if self.ahead.is_empty() && !self.drained {
            self.read_ahead().await?;
        }
        let got = self.ahead.pop_front();
        match &got {
            Some(m) => {
                self.read += 1;
                self.remaining = m.message_count;
            }
            None => self.remaining = 0,
        }
        Ok(got)
    }

    /// Takes the next letters with `basic.get`s in flight together (one
    /// round trip each would make a long queue slow to read).
    async fn read_ahead(&mut self) -> Result<(), DeadError> {
        let n = self.batch.min(self.max - self.read).max(1);
        self.batch = (self.batch * 2).min(READ_AHEAD);
        let gets = (0..n).map(|_| {
            self.channel
                .basic_get(self.queue.clone(), BasicGetOptions { no_ack: false })
        });
        for got in futures_util::future::join_all(gets).await {
            match got? {
                Some(m) => {
                    self.fetched += 1;
                    self.behind_fetched = m.message_count;
                    // One that came after the broker said "empty" is held
                    // and goes back with the rest, unread.
                    if !self.drained {
                        self.ahead.push_back(m);
                    }
                }
                None => {
                    self.drained = true;
                    self.behind_fetched = 0;
                }
            }
        }
        Ok(())
    }

    /// Holds `m` until the end of the scan; it goes back in its place.
    pub(super) fn keep(&mut self, _m: &BasicGetMessage) {}

    /// Removes `m` from the queue for good.
    pub(super) async fn remove(&mut self, m: &BasicGetMessage) -> Result<(), DeadError> {
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        self.removed += 1;
        Ok(())
    }

    /// Puts every held letter back, in order, by closing the channel, and
    /// waits (at most [`REQUEUE_WAIT`]) until the broker shows them ready
    /// again, so that the next scan of this process sees the whole queue.
    ///
    /// Closing is what puts them back, not a `basic.nack`: RabbitMQ 3.10
    /// took 15 s to requeue 10 000 nacked letters, during which a scan
    /// saw a part of the queue, and 25 ms when their channel closed.
    pub(super) async fn finish(self, conn: &Connection, ok: bool) -> Result<(), DeadError> {
        let held = self.fetched - self.removed;
        let behind = self.behind_fetched;
        let _ = self.channel.close(200, "scanned".into()).await;
        if ok && held > 0 {
            wait_ready(conn, &self.queue, u64::from(behind) + held).await?;
        }
        Ok(())
    }
}

/// Most `basic.get`s a scan has in flight at once.
const READ_AHEAD: usize = 128;

/// Longest a scan waits for the letters it held to be ready again.
pub const REQUEUE_WAIT: Duration = Duration::from_secs(5);
/// How often it looks.
const REQUEUE_POLL: Duration = Duration::from_millis(10);

/// Waits until `queue` holds at least `n` ready messages, or
/// [`REQUEUE_WAIT`] passed (another process may hold some).
async fn wait_ready(conn: &Connection, queue: &ShortString, n: u64) -> Result<(), DeadError> {
    let channel = conn.create_channel().await?;
    let deadline = tokio::time::Instant::now() + REQUEUE_WAIT;
    let result = loop {
        let ready = match ready_count(&channel, queue).await {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        if ready >= n || tokio::time::Instant::now() >= deadline {
            if ready < n {
                tracing::warn!(ready, expected = n, "dead letters not all back in time");
            }
            break Ok(());
        }
        tokio::time::sleep(REQUEUE_POLL).await;
    };
    let _ = channel.close(200, "counted".into()).await;
    result
}

/// Ready messages in `queue` (a passive declare).
pub(super) async fn ready_count(channel: &Channel, queue: &ShortString) -> Result<u64, DeadError> {
    let q = channel
        .queue_declare(
            queue.clone(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(u64::from(q.message_count()))
}

/// Runs `body` over a scan, then finishes it (the letters held go back
/// whatever `body` answered).
pub(super) async fn with_scan<T>(
    conn: &Connection,
    names: &Names,
    max: usize,
    confirm: bool,
    body: impl AsyncFnOnce(&mut Scan) -> Result<T, DeadError>,
) -> Result<T, DeadError> {
    let mut scan = Scan::open(conn, names, max, confirm).await?;
    let out = body(&mut scan).await;
    let finished = scan.finish(conn, out.is_ok()).await;
    let out = out?;
    finished?;
    Ok(out)
}
