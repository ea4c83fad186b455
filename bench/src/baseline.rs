//! The ceiling, measured in the same run: raw lapin against the same broker,
//! with what Kairos itself needs (persistent messages, publisher confirms
//! pipelined in a window, manual acks one by one with a prefetch), on a plain
//! classic queue and on one declared like a Kairos task queue
//! (`x-max-priority` 9). Every Kairos figure is divided by the matching one.

use crate::env::BenchEnv;
use anyhow::{bail, Result};
use futures_util::stream::FuturesUnordered;
use futures_util::FutureExt;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};
use std::time::{Duration, Instant};

/// Publisher confirms kept in flight: the same as the bench's Rust client
/// keeps (4 calls of 1,000), so the baseline is never the weaker publisher.
pub(crate) const CONFIRM_WINDOW: usize = 4_000;
/// Publishes handed to lapin together (see `publish`).
const PUBLISH_SLICE: usize = 200;
/// Consumer prefetch of the baseline: measured on these servers, a
/// prefetch above about 300 gains nothing.
pub(crate) const PREFETCH: u16 = 300;

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub(crate) struct Rates {
    /// Publish alone, msg/s (first publish to last confirm).
    pub(crate) publish: f64,
    /// Consume alone from a full queue, msg/s (first delivery to last ack).
    pub(crate) consume: f64,
    /// Publish while consuming, msg/s (first publish to last ack).
    pub(crate) concurrent: f64,
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub(crate) struct Baseline {
    pub(crate) classic: Rates,
    pub(crate) priority: Rates,
    pub(crate) messages: usize,
    pub(crate) body_bytes: usize,
}

/// The kind of queue a baseline measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueueKind {
    Classic,
    /// Declared like a classic Kairos task queue (`x-max-priority` 9).
    Priority,
    /// Declared like a quorum Kairos task queue band (`x-queue-type
    /// quorum`, leader on the node the publisher is connected to).
    Quorum,
}

impl QueueKind {
    fn suffix(self) -> &'static str {
        match self {
            QueueKind::Classic => "classic",
            QueueKind::Priority => "prio",
            QueueKind::Quorum => "quorum",
        }
    }
}

pub(crate) async fn measure(env: &mut BenchEnv, n: usize, body_bytes: usize) -> Result<Baseline> {
    let mut out = Baseline {
        messages: n,
        body_bytes,
        ..Baseline::default()
    };
    out.classic = measure_kind(env, QueueKind::Classic, n, body_bytes).await?;
    out.priority = measure_kind(env, QueueKind::Priority, n, body_bytes).await?;
    Ok(out)
}

/// Publish, consume, and both at once, on one queue of `kind` in `env`'s
/// namespace (deleted with it).
pub(crate) async fn measure_kind(
    env: &mut BenchEnv,
    kind: QueueKind,
    n: usize,
    body_bytes: usize,
) -> Result<Rates> {
    let body = vec![b'x'; body_bytes];
    let publisher = kairos_shared::amqp::connect(&env.amqp_url, "bench-base-pub").await?;
    let consumer = kairos_shared::amqp::connect(&env.amqp_url, "bench-base-sub").await?;
    let queue = format!("{}.base.{}", env.ns, kind.suffix());
    env.forget_on_cleanup(&queue);
    let pch = publisher.create_channel().await?;
    pch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        queue_args(kind),
    )
    .await?;
    pch.confirm_select(ConfirmSelectOptions::default()).await?;

    let t = Instant::now();
    publish(&pch, &queue, n, &body).await?;
    let publish_rate = n as f64 / t.elapsed().as_secs_f64();

    let consume_rate = n as f64 / consume(&consumer, &queue, n).await?;

    pch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await?;
    let t = Instant::now();
    let sub = consume(&consumer, &queue, n);
    let (secs, published) = tokio::join!(sub, publish(&pch, &queue, n, &body));
    published?;
    let _ = secs?;
    let concurrent_rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = pch.close(200, "done".into()).await;
    let _ = publisher.close(200, "done".into()).await;
    let _ = consumer.close(200, "done".into()).await;
    Ok(Rates {
        publish: publish_rate,
        consume: consume_rate,
        concurrent: concurrent_rate,
    })
}

/// Publishes `n` persistent messages to `queue` through the default
/// exchange with a window of confirms in flight; fails on any nack.
pub(crate) async fn publish(ch: &Channel, queue: &str, n: usize, body: &[u8]) -> Result<()> {
    // Publishes go out a slice at a time, all of a slice's `basic_publish`
    // futures polled together: lapin resolves each only once the I/O thread
    // wrote its frames, so awaiting them one by one costs a thread hand-off
    // per message and caps the rate far below the broker's.
    let mut inflight = FuturesUnordered::new();
    let mut sent = 0;
    while sent < n {
        while inflight.len() + PUBLISH_SLICE > CONFIRM_WINDOW {
            match inflight.next().await {
                Some(c) => confirm_ok(c)?,
                None => break,
            }
        }
        let slice = PUBLISH_SLICE.min(n - sent);
        let publishes = (0..slice).map(|_| send(ch, queue, body));
        for confirm in futures_util::future::join_all(publishes).await {
            inflight.push(confirm?);
        }
        sent += slice;
    }
    while let Some(c) = inflight.next().await {
        confirm_ok(c)?;
    }
    Ok(())
}

/// The declare arguments of a baseline queue of `kind`.
fn queue_args(kind: QueueKind) -> FieldTable {
    let mut args = FieldTable::default();
    match kind {
        QueueKind::Classic => {}
        QueueKind::Priority => {
            args.insert(
                "x-max-priority".into(),
                AMQPValue::LongInt(i32::from(kairos_shared::contract::MAX_PRIORITY)),
            );
        }
        QueueKind::Quorum => {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
    }
    args
}

/// One persistent message to `queue` through the default exchange.
async fn send(ch: &Channel, queue: &str, body: &[u8]) -> lapin::Result<PublisherConfirm> {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
}

pub(crate) fn confirm_ok(c: lapin::Result<lapin::Confirmation>) -> Result<()> {
    if !c?.is_ack() {
        bail!("the broker nacked a baseline message");
    }
    Ok(())
}

/// Consumes and acks `n` messages one by one; returns the seconds from
/// subscribing to the last ack.
async fn consume(conn: &Connection, queue: &str, n: usize) -> Result<f64> {
    consume_each(conn, queue, n, |_| Ok(())).await
}

/// Consumes `n` messages, handing each to `on` as it arrives and acking it;
/// returns the seconds from subscribing to the last ack.
async fn consume_each(
    conn: &Connection,
    queue: &str,
    n: usize,
    mut on: impl FnMut(&Delivery) -> Result<()>,
) -> Result<f64> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let t = Instant::now();
    // Acks go out while the next deliveries are taken, as the Kairos worker
    // does from its concurrent tasks: awaiting each ack before the next
    // delivery would make the baseline slower than Kairos.
    let mut acks = FuturesUnordered::new();
    let mut got = 0;
    while got < n {
        tokio::select! {
            Some(acked) = acks.next(), if !acks.is_empty() => { acked?; }
            d = consumer.next() => match d {
                Some(d) => {
                    let d = d?;
                    on(&d)?;
                    acks.push(async move { d.acker.ack(BasicAckOptions::default()).await });
                    got += 1;
                }
                None => bail!("baseline consumer ended after {got} of {n}"),
            },
        }
    }
    while let Some(acked) = acks.next().await {
        acked?;
    }
    let secs = t.elapsed().as_secs_f64();
    let _ = ch.close(200, "done".into()).await;
    Ok(secs)
}

/// The broker's own latency at a steady rate, the floor under W5's tick
/// lateness: raw lapin publishes `rate` persistent messages a second for
/// `secs` seconds on a Kairos-like priority queue, each at its own instant
/// (spread evenly, as W5's ticks are), confirms pipelined, while a consumer
/// with the baseline's prefetch acks them. Returns each message's lateness
/// (delivery time minus its instant), ms, sorted.
pub(crate) async fn paced(
    env: &mut BenchEnv,
    rate: usize,
    secs: u64,
    body_bytes: usize,
) -> Result<Vec<i64>> {
    let queue = format!("{}.base.paced", env.ns);
    env.forget_on_cleanup(&queue);
    let publisher = kairos_shared::amqp::connect(&env.amqp_url, "bench-paced-pub").await?;
    let consumer = kairos_shared::amqp::connect(&env.amqp_url, "bench-paced-sub").await?;
    let pch = publisher.create_channel().await?;
    pch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        queue_args(QueueKind::Priority),
    )
    .await?;
    pch.confirm_select(ConfirmSelectOptions::default()).await?;
    let n = rate * secs as usize;
    let sub = paced_consume(&consumer, &queue, n);
    let (lateness, published) = tokio::join!(sub, paced_publish(&pch, &queue, rate, n, body_bytes));
    published?;
    let mut lateness = lateness?;
    lateness.sort_unstable();
    let _ = pch.close(200, "done".into()).await;
    let _ = publisher.close(200, "done".into()).await;
    let _ = consumer.close(200, "done".into()).await;
    Ok(lateness)
}

/// Publishes message i at `start + i / rate`, its instant (Unix µs) in the
/// first 8 bytes of the body.
async fn paced_publish(
    ch: &Channel,
    queue: &str,
    rate: usize,
    n: usize,
    body_bytes: usize,
) -> Result<()> {
    let start_us = now_us() + 100_000;
    let due_us = |i: usize| start_us + (i as u64 * 1_000_000 / rate as u64) as i64;
    let started = tokio::time::Instant::now() + Duration::from_millis(100);
    let mut inflight = FuturesUnordered::new();
    let mut sent = 0;
    while sent < n {
        // Wait for the next message's instant, then send all that are due.
        let wait_us = (due_us(sent) - start_us).max(0) as u64;
        tokio::time::sleep_until(started + Duration::from_micros(wait_us)).await;
        let now = now_us();
        let mut slice = Vec::new();
        while sent < n && due_us(sent) <= now {
            let mut body = vec![b'x'; body_bytes.max(8)];
            body[..8].copy_from_slice(&due_us(sent).to_be_bytes());
            slice.push(body);
            sent += 1;
        }
        let publishes = slice.iter().map(|body| send(ch, queue, body));
        for confirm in futures_util::future::join_all(publishes).await {
            inflight.push(confirm?);
        }
        while let Some(Some(c)) = inflight.next().now_or_never() {
            confirm_ok(c)?;
        }
    }
    while let Some(c) = inflight.next().await {
        confirm_ok(c)?;
    }
    Ok(())
}

/// Consumes `n` messages, acking each; returns their lateness, ms.
async fn paced_consume(conn: &Connection, queue: &str, n: usize) -> Result<Vec<i64>> {
    let mut lateness = Vec::with_capacity(n);
    consume_each(conn, queue, n, |d| {
        let now = now_us();
        let due = d
            .data
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(i64::from_be_bytes);
        let Some(due) = due else {
            bail!("a paced baseline message lost its instant")
        };
        lateness.push((now - due) / 1_000);
        Ok(())
    })
    .await?;
    Ok(lateness)
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
