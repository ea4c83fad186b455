//! Reading `NS.dead` from its head without losing anything: each letter is
//! taken with `basic.get` and held unacked; at the end the ones not removed
//! go back with one `basic.nack` (multiple, requeue), and RabbitMQ puts
//! them back at their old places, in order. Closing the channel (an error,
//! a crash) puts them back too.
//!
//! While a scan holds letters, nobody else sees them: two scans at once
//! would each see a part of the queue. Scans in one process take turns (a
//! lock per dead-letter queue); across processes (two schedulers, a
//! kairosctl without `--http-addr`) they do not, and a listing made while
//! another process replays may miss the letters that one holds.

use super::DeadError;
use crate::contract::Names;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::Acker;
use lapin::{Channel, Connection};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Most letters one request reads from the head of `NS.dead` (listing,
/// showing, replaying or purging by filter, counting). A read costs one
/// round trip to the broker (about 0.1 ms on one host), so a scan takes a
/// few seconds at most. Letters further back are reached once those in
/// front are replayed or purged.
pub const MAX_SCAN: usize = 50_000;

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
    /// The newest letter read and not removed: the final nack covers it
    /// and every held one before it.
    last_kept: Option<Acker>,
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
            last_kept: None,
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
        let got = self
            .channel
            .basic_get(self.queue.clone(), BasicGetOptions { no_ack: false })
            .await?;
        if let Some(m) = &got {
            self.read += 1;
            self.remaining = m.message_count;
        } else {
            self.remaining = 0;
        }
        Ok(got)
    }

    /// Holds `m` until the end of the scan; it goes back in its place.
    pub(super) fn keep(&mut self, m: &BasicGetMessage) {
        self.last_kept = Some(m.delivery.acker.clone());
    }

    /// Removes `m` from the queue for good.
    pub(super) async fn remove(&mut self, m: &BasicGetMessage) -> Result<(), DeadError> {
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Puts every held letter back, in order, and closes the channel. On an
    /// error the channel is closed alone (which puts them back as well).
    pub(super) async fn finish(self, ok: bool) -> Result<(), DeadError> {
        let mut result = Ok(());
        if ok {
            if let Some(acker) = &self.last_kept {
                result = acker
                    .nack(BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    })
                    .await
                    .map(|_| ())
                    .map_err(DeadError::from);
            }
        }
        let _ = self.channel.close(200, "scanned".into()).await;
        result
    }
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
    let finished = scan.finish(out.is_ok()).await;
    let out = out?;
    finished?;
    Ok(out)
}
