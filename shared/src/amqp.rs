//! Connecting to RabbitMQ. Kairos does not rely on lapin's young automatic
//! recovery: each process runs a supervisor that rebuilds connection,
//! channels, topology and consumers, and this module gives it the retrying
//! connect.

use lapin::{Connection, ConnectionProperties};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Opens one connection, named so operators can tell processes apart in the
/// management UI.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await
}

/// Connects, retrying with capped exponential backoff until it succeeds or
/// `cancel` fires (then `None`).
pub async fn connect_with_retry(
    url: &str,
    name: &str,
    cancel: &CancellationToken,
) -> Option<Connection> {
    let mut backoff = Backoff::new();
    loop {
        match connect(url, name).await {
            Ok(conn) => return Some(conn),
            Err(err) => {
                let wait = backoff.next_delay();
                tracing::warn!(cause = %err, retry_in_ms = wait.as_millis() as u64, "cannot connect to RabbitMQ");
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Reconnect pacing: 100 ms doubling to 5 s. Reset it after a connection
/// that lived a while.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        now
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Sleeps `d` unless cancelled first; returns false when cancelled.
/// Closes `conn`, waiting at most `within` for the broker's confirmation.
/// lapin 4.12 can lose a close requested while its internal task handles
/// the close of a channel dropped just before (the channel's close fails on
/// the closing connection, and the task stops on that error), and the
/// caller would wait forever: seen as a worker that never finished
/// shutting down, about once in fifty test runs.
pub async fn close_connection(conn: &Connection, reason: &str, within: Duration) {
    if tokio::time::timeout(within, conn.close(200, reason.into()))
        .await
        .is_err()
    {
        tracing::warn!(
            within_ms = within.as_millis() as u64,
            "the connection close was not confirmed in time; dropping the connection"
        );
    }
}

pub async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Unix epoch milliseconds by this host's clock. Only for event and
/// dead-letter timestamps: due times always compare against Redis TIME.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Adds to `batch`, without waiting, the deliveries `consumer` already
/// holds, up to `max` in the batch. Consumers handle what is ready as one
/// batch (one Redis round trip, one multiple-ack). Returns `false` when the
/// consumer ended (the broker cancelled it).
pub fn take_ready(
    consumer: &mut lapin::Consumer,
    batch: &mut Vec<lapin::message::Delivery>,
    max: usize,
) -> lapin::Result<bool> {
    take_ready_bounded(consumer, batch, max, usize::MAX)
}

/// [`take_ready`], also stopping once the batch's bodies sum to `max_bytes`
/// (a batch of big bodies is copied whole into one Redis round trip: its
/// bytes, not only its count, must be bounded).
pub fn take_ready_bounded(
    consumer: &mut lapin::Consumer,
    batch: &mut Vec<lapin::message::Delivery>,
    max: usize,
    max_bytes: usize,
) -> lapin::Result<bool> {
    use futures_util::{FutureExt, StreamExt};
    let mut bytes: usize = batch.iter().map(|d| d.data.len()).sum();
    while batch.len() < max && bytes < max_bytes {
        match consumer.next().now_or_never() {
            Some(Some(d)) => {
                let d = d?;
                bytes = bytes.saturating_add(d.data.len());
                batch.push(d);
            }
            Some(None) => return Ok(false),
            None => break,
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::new();
        let seq: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(seq, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
