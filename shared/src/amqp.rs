//! Connecting to RabbitMQ. Kairos does not rely on lapin's young automatic
//! recovery: each process runs a supervisor that rebuilds connection,
//! channels, topology and consumers, and this module gives it the retrying
//! connect.

use crate::tls::TlsSettings;
use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where and how to reach RabbitMQ: one URL (`amqp://` or `amqps://`) or
/// several, the nodes of one cluster, and the TLS trust and identity an
/// `amqps://` URL uses. Its `Debug` hides the URLs' passwords.
///
/// With several URLs a connect tries them in turn, starting with the one
/// that last worked, so a process whose node went away reconnects to the
/// next node in its supervisor's next attempt rather than waiting for the
/// lost one to come back. Clones share that memory.
#[derive(Clone)]
pub struct Broker {
    urls: Arc<[String]>,
    /// Index into `urls` of the node to try first.
    preferred: Arc<AtomicUsize>,
    tls: OwnedTLSConfig,
}

impl Broker {
    /// The broker at `url` (one URL, or several separated by commas),
    /// reached with `tls`'s trust and identity.
    pub fn new(url: &str, tls: &TlsSettings) -> Self {
        Broker {
            urls: split_urls(url).map(str::to_string).collect(),
            preferred: Arc::new(AtomicUsize::new(0)),
            tls: tls.amqp(),
        }
    }

    /// A broker with the system's trust and no client certificate.
    pub fn plain(url: &str) -> Self {
        Self::new(url, &TlsSettings::default())
    }

    /// The first URL, password included: never log it (log the `Debug`
    /// form).
    pub fn url(&self) -> &str {
        self.urls.first().map(String::as_str).unwrap_or_default()
    }

    /// The nodes' URLs, in the order given.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The URLs in the order a connect tries them: the preferred one first.
    fn attempt_order(&self) -> impl Iterator<Item = (usize, &str)> {
        let n = self.urls.len();
        let first = self.preferred.load(Ordering::Relaxed) % n.max(1);
        (0..n).map(move |k| {
            let i = (first + k) % n;
            (i, self.urls[i].as_str())
        })
    }
}

/// The URLs of a `KAIROS_AMQP_URL`: separated by commas, blanks around
/// them ignored. A comma inside a password must be written `%2C`.
pub fn split_urls(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|u| !u.is_empty())
}

/// A URL as logs may show it: scheme, host, port and vhost, no password.
fn shown_url(url: &str) -> String {
    match lapin::uri::AMQPUri::from_str(url) {
        Ok(uri) => format!(
            "{}://{}:{}/{}",
            format!("{:?}", uri.scheme).to_lowercase(),
            uri.authority.host,
            uri.authority.port,
            uri.vhost
        ),
        Err(_) => "<unparsable URL>".to_string(),
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self.urls.iter().map(|u| shown_url(u)).collect();
        f.debug_struct("Broker")
            .field("url", &shown.join(","))
            .field("ca", &self.tls.cert_chain.is_some())
            .field("client_cert", &self.tls.identity.is_some())
            .finish()
    }
}

/// [`connect_to`] a URL with the system's trust and no client certificate.
pub async fn connect(url: &str, name: &str) -> lapin::Result<Connection> {
    connect_to(&Broker::plain(url), name).await
}

/// Opens one connection, named so operators can tell processes apart in the
/// management UI. With several URLs, tries each node once, the one that
/// last worked first; the error is the last node's.
pub async fn connect_to(broker: &Broker, name: &str) -> lapin::Result<Connection> {
    let mut last = None;
    for (i, url) in broker.attempt_order() {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        match Connection::connect_with_config(
            url,
            props,
            broker.tls.clone(),
            lapin::runtime::default_runtime()?,
        )
        .await
        {
            Ok(conn) => {
                if broker.preferred.swap(i, Ordering::Relaxed) != i && broker.urls.len() > 1 {
                    tracing::info!(node = %shown_url(url), "connected to RabbitMQ node");
                }
                return Ok(conn);
            }
            Err(err) => {
                if broker.urls.len() > 1 {
                    tracing::warn!(node = %shown_url(url), cause = %err, "RabbitMQ node unreachable; trying the next");
                }
                last = Some(err);
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
            lapin::ConnectionState::Closed,
        ))
    }))
}

/// Connects, retrying with capped exponential backoff until it succeeds or
/// `cancel` fires (then `None`).
pub async fn connect_with_retry(
    broker: &Broker,
    name: &str,
    cancel: &CancellationToken,
) -> Option<Connection> {
    let mut backoff = Backoff::new();
    loop {
        match connect_to(broker, name).await {
            Ok(conn) => return Some(conn),
            Err(err) => {
                let wait = backoff.next_delay();
                let cause = err.to_string();
                tracing::warn!(%cause, hint = crate::tls::hint(&cause), retry_in_ms = wait.as_millis() as u64, "cannot connect to RabbitMQ");
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Reconnect pacing: 100 ms doubling to 5 s, each delay jittered. Reset it
/// after a connection that lived a while (the supervisor does, after
/// `supervise::HEALTHY_AFTER`).
///
/// The jitter spreads reconnects: after a broker restart every process sees
/// its connection drop at the same instant, and with plain doubling they
/// would all come back at the same instants too (a thundering herd of
/// connects, declares and consumer registrations against a broker still
/// warming up).
/// Each delay is drawn uniformly from the upper half of its step ("equal
/// jitter"): never below half the step, so a retry loop still backs off,
/// and never above it, so the cap holds.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    /// Steps from 100 ms doubling up to 5 s.
    pub fn new() -> Self {
        Self::between(Self::FIRST, Self::MAX)
    }

    /// Steps from `first` doubling up to `max`.
    pub fn between(first: Duration, max: Duration) -> Self {
        Self {
            next: first,
            first,
            max: max.max(first),
        }
    }

    /// The next delay: the current step, jittered, then the step doubles.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next_step();
        jitter(step, &mut rand::rng())
    }

    /// The next step without jitter.
    fn next_step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    /// Starts again from the first step.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A delay drawn uniformly from `[step / 2, step]`.
fn jitter(step: Duration, rng: &mut impl rand::Rng) -> Duration {
    let half = step / 2;
    let spread = (step - half).as_micros() as u64;
    half + Duration::from_micros(rng.random_range(0..=spread))
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether the broker blocks this connection's publishes (a memory or disk
/// alarm: RabbitMQ sends `connection.blocked` and stops reading from the
/// connection). lapin then writes nothing at all on the connection, not
/// even acks or a close, until `connection.unblocked`: a publish, a confirm
/// wait or a close started meanwhile waits for the alarm to clear. Callers
/// use this to stop starting such work and to answer promptly instead.
///
/// It reads lapin's connection status rather than its event stream: that
/// stream is one queue shared by all its listeners, so each event reaches
/// only one of them.
#[derive(Clone)]
pub struct Blocked {
    status: Option<lapin::ConnectionStatus>,
}

impl Blocked {
    /// How often [`wait_unblocked`](Self::wait_unblocked) looks again.
    const POLL: Duration = Duration::from_millis(100);

    /// Follows `conn`'s blocked/unblocked state.
    pub fn watch(conn: &Connection) -> Self {
        Blocked {
            status: Some(conn.status().clone()),
        }
    }

    /// Never blocked: for code run without a broker connection of its own.
    pub fn never() -> Self {
        Blocked { status: None }
    }

    /// Whether the broker blocks the connection now.
    pub fn is_blocked(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.blocked())
    }

    /// Returns at once when not blocked, else once unblocked (`true`) or
    /// when `cancel` fires (`false`).
    pub async fn wait_unblocked(&self, cancel: &CancellationToken) -> bool {
        while self.is_blocked() {
            if !sleep_or_cancel(Self::POLL, cancel).await {
                return false;
            }
        }
        true
    }
}

/// The AMQP reply code of a normal close (`reply-success`).
pub const REPLY_SUCCESS: u16 = 200;

/// The longest wait for the broker to confirm a connection close.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// Closes `conn`, waiting at most `within` for the broker's confirmation.
/// A close must never wait forever: lapin (4.12) can lose a close requested
/// while its internal task handles the close of a channel dropped just
/// before (the channel's close fails on the closing connection, and the
/// task stops on that error).
pub async fn close_connection(conn: &Connection, reason: &str, within: Duration) {
    if tokio::time::timeout(within, conn.close(REPLY_SUCCESS, reason.into()))
        .await
        .is_err()
    {
        tracing::warn!(
            within_ms = within.as_millis() as u64,
            "the connection close was not confirmed in time; dropping the connection"
        );
    }
}

/// Sleeps `d` unless cancelled first; returns false when cancelled.
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
    fn several_urls_are_tried_from_the_one_that_last_worked() {
        let b = Broker::plain(" amqp://a:1@n1/%2f , amqp://b:2@n2/%2f,amqp://c:3@n3/%2f,");
        assert_eq!(b.urls().len(), 3);
        assert_eq!(b.url(), "amqp://a:1@n1/%2f");
        let order = |b: &Broker| b.attempt_order().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(order(&b), [0, 1, 2]);
        b.preferred.store(2, Ordering::Relaxed);
        assert_eq!(order(&b.clone()), [2, 0, 1], "clones share the preference");
        let shown = format!("{b:?}");
        assert!(
            shown.contains("n1:5672") && shown.contains("n3:5672"),
            "{shown}"
        );
        assert!(!shown.contains(":1@") && !shown.contains(":3@"), "{shown}");
    }

    #[test]
    fn backoff_steps_double_to_a_cap_and_reset() {
        let mut b = Backoff::new();
        let seq: Vec<u64> = (0..8).map(|_| b.next_step().as_millis() as u64).collect();
        assert_eq!(seq, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_step(), Duration::from_millis(100));
    }

    #[test]
    fn each_delay_is_jittered_within_the_upper_half_of_its_step() {
        let mut b = Backoff::new();
        for step_ms in [100u64, 200, 400, 800, 1600, 3200, 5000, 5000] {
            let d = b.next_delay();
            let step = Duration::from_millis(step_ms);
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
    }

    #[test]
    fn processes_reconnecting_together_spread_out() {
        // 50 processes whose connections dropped at the same instant: their
        // first five retries no longer land at the same instants.
        let firsts: std::collections::BTreeSet<u128> = (0..50)
            .map(|_| {
                let mut b = Backoff::new();
                (0..5).map(|_| b.next_delay()).sum::<Duration>().as_micros()
            })
            .collect();
        assert!(
            firsts.len() > 40,
            "only {} distinct schedules",
            firsts.len()
        );
    }

    #[test]
    fn a_broker_never_shows_its_password() {
        let shown = format!(
            "{:?}",
            Broker::plain("amqps://kairos:s3cret@rabbit.example:5671/%2f")
        );
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("amqps://rabbit.example:5671/"), "{shown}");
    }
}
