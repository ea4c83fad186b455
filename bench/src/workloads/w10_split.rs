//! W10 split queue (`--cluster` only): what spreading one logical queue
//! over the cluster's nodes gives. The queue is split into N quorum queues
//! `NS.q.split.0..N-1`; queue i is declared over a connection to node i
//! with `x-queue-leader-locator: client-local` (RabbitMQ 3.10's name; the
//! default, stated so a changed cluster default does not move it), so its
//! leader is on node i. Each queue gets a publisher and a consumer
//! connected to its leader's node; a message goes to queue
//! `shard_of(task id, N)` (the hash the delay queue shards by). The same M
//! persistent messages, confirms pipelined, prefetch and acks as the
//! baseline, for N = 1, 2, 3: end to end is M over first publish to last
//! ack.
//!
//! Raw lapin first: the broker's scaling. As a control, the same N queues
//! all led by node 1 tell "more queues" (one Erlang process each) from
//! "more nodes". Then the same split through Kairos: logical queues
//! `split.0..N-1` (so `NS.q.split.i`, and its bands), worker i (in-process,
//! `KAIROS_QUEUES=split.i`, connected to node i, which declares the queues
//! and so leads them) and a Rust client per node enqueueing by the same
//! hash; task status and events off, concurrency and prefetch as W1's.

use super::{enqueue_all, Ctx};
use crate::baseline::{confirm_ok, CONFIRM_WINDOW, PREFETCH};
use crate::env::BenchEnv;
use crate::recorder::Recorder;
use crate::report::Row;
use crate::service::InProcess;
use anyhow::{bail, Context, Result};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use kairos_shared::client::NewTask;
use kairos_worker::Worker;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Publishes handed to lapin together, as in the baseline.
const PUBLISH_SLICE: usize = 200;
/// Node counts measured (the cluster script starts 3).
const MAX_NODES: usize = 3;

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let Some(cluster) = ctx.cluster.clone() else {
        return Ok(());
    };
    let target = &cluster.target;
    let nodes = target.node_urls();
    let m = ctx.args.w10_messages;
    let body_bytes = ctx.args.body_bytes.max(8);
    let workload = target.name("W10 split queue");
    let counts: Vec<usize> = (1..=nodes.len().min(MAX_NODES)).collect();
    for spread in [true, false] {
        let mut one_queue = None;
        for &n in &counts {
            if !spread && n == 1 {
                // One queue on node 1 is the spread run's N = 1.
                continue;
            }
            let mut env = BenchEnv::on("w10", target).await?;
            let leaders: Vec<&str> = (0..n)
                .map(|i| nodes[if spread { i } else { 0 }].as_str())
                .collect();
            let result = once(&mut env, &leaders, m, body_bytes).await;
            env.cleanup().await;
            let (rate, seen) = result?;
            let first = *one_queue.get_or_insert(rate);
            let (metric, placement) = if spread {
                (
                    format!("end to end, {n} queue(s) on {n} node(s)"),
                    "queue i led by node i".to_string(),
                )
            } else {
                (
                    format!("end to end, {n} queues on node 1"),
                    "all led by node 1 (control: more queues, same node)".to_string(),
                )
            };
            let vs_one = if spread {
                format!("; x N=1 of this run: {:.2}", rate / first)
            } else {
                String::new()
            };
            ctx.report.push(
                Row::new(&workload, &metric, rate, "msg/s")
                    .ratio(cluster.base.concurrent)
                    .note(format!(
                        "{m} msgs, {body_bytes} B, {placement}; a publisher and a consumer per queue on its leader's node{vs_one}; x raw publish+consume, one {} queue",
                        target.mode
                    )),
            );
            ctx.report.check(
                seen.distinct == m && seen.total == m,
                format!(
                    "{workload} ({metric}): {m} published, {} consumed, {} distinct",
                    seen.total, seen.distinct
                ),
            );
        }
    }
    let mut one_node = None;
    for &n in &counts {
        let leaders: Vec<&str> = nodes.iter().take(n).map(String::as_str).collect();
        let mut env = BenchEnv::on("w10k", target).await?;
        let result = kairos_once(ctx, &mut env, &leaders, m, body_bytes).await;
        env.cleanup().await;
        let (rate, distinct) = result?;
        let first = *one_node.get_or_insert(rate);
        let metric = format!("end to end, Kairos workers, {n} node(s)");
        ctx.report.push(
            Row::new(&workload, &metric, rate, "tasks/s")
                .ratio(cluster.base.concurrent)
                .note(format!(
                    "{m} tasks, queue split.i led by node i, a worker (concurrency {}, prefetch {}, status and events off) and a client per node; x N=1 of this run: {:.2}; x raw publish+consume, one {} queue",
                    ctx.args.w1_concurrency, ctx.args.w1_prefetch, rate / first, target.mode
                )),
        );
        ctx.report.check(
            distinct == m,
            format!("{workload} ({metric}): {m} enqueued, {distinct} ran"),
        );
    }
    Ok(())
}

/// The split through Kairos: returns tasks/s from the first enqueue to the
/// last run, and how many distinct tasks ran.
async fn kairos_once(
    ctx: &Ctx<'_>,
    env: &mut BenchEnv,
    leaders: &[&str],
    m: usize,
    body_bytes: usize,
) -> Result<(f64, usize)> {
    let n = leaders.len();
    let ids: Vec<String> = (0..m)
        .map(|_| uuid::Uuid::now_v7().simple().to_string())
        .collect();
    let mut parts: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (k, id) in ids.iter().enumerate() {
        parts[kairos_shared::redis::shard_of(id, n)].push(k);
    }
    let rec = Recorder::with_capacity(m);
    let mut workers = Vec::with_capacity(n);
    let mut clients = Vec::with_capacity(n);
    for (i, url) in leaders.iter().enumerate() {
        let logical = format!("split.{i}");
        for q in env.task_queues(&logical) {
            env.forget_on_cleanup(&q);
        }
        let mut config = env.worker_config();
        config.common.amqp_url = url.to_string();
        config.common.events = false;
        config.status.status = false;
        config.queues = vec![logical];
        config.concurrency = ctx.args.w1_concurrency;
        config.prefetch = Some(ctx.args.w1_prefetch);
        workers.push(InProcess::worker(
            Worker::new(config)
                .with_builtins()
                .handler(kairos_worker::builtin::NOOP, rec.handler()),
        ));
        let broker = kairos_shared::amqp::Broker::plain(url);
        clients.push(Arc::new(
            kairos_shared::client::Client::connect_with(&broker, env.names.clone()).await?,
        ));
    }
    // Let the workers connect, declare (and so lead) their queues and
    // subscribe before the clock starts.
    tokio::time::sleep(super::SERVICE_SETTLE).await;
    let t0 = Instant::now();
    let enqueues = clients
        .iter()
        .zip(&parts)
        .enumerate()
        .map(|(i, (client, part))| {
            let (ids, logical) = (&ids, format!("split.{i}"));
            async move {
                enqueue_all(client, part.len(), |j| {
                    NewTask::new(kairos_worker::builtin::NOOP)
                        .queue(logical.clone())
                        .id(ids[part[j]].clone())
                        .body(super::body(body_bytes))
                })
                .await
            }
        });
    let sent: usize = futures_util::future::try_join_all(enqueues)
        .await?
        .into_iter()
        .sum();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + m as u64 / 500);
    rec.wait_distinct(m, deadline).await;
    let seen = rec.seen();
    for w in workers {
        w.stop().await;
    }
    for c in clients {
        if let Ok(c) = Arc::try_unwrap(c) {
            let _ = c.close().await;
        }
    }
    if sent != m {
        bail!("W10: {sent} of {m} tasks confirmed");
    }
    let rate = seen
        .last_done
        .map(|t| seen.distinct as f64 / (t - t0).as_secs_f64())
        .unwrap_or(0.0);
    Ok((rate, seen.distinct))
}

/// What the consumers took, over all queues.
struct Seen {
    total: usize,
    distinct: usize,
}

/// One measurement: queue i led by `leaders[i]`; returns msg/s end to end.
async fn once(
    env: &mut BenchEnv,
    leaders: &[&str],
    m: usize,
    body_bytes: usize,
) -> Result<(f64, Seen)> {
    let n = leaders.len();
    // Each message is message k, with task id ids[k]; its queue is the
    // id's hash mod n.
    let ids: Vec<String> = (0..m)
        .map(|_| uuid::Uuid::now_v7().simple().to_string())
        .collect();
    let mut parts: Vec<Vec<u64>> = vec![Vec::new(); n];
    for (k, id) in ids.iter().enumerate() {
        parts[kairos_shared::redis::shard_of(id, n)].push(k as u64);
    }
    let mut queues = Vec::with_capacity(n);
    let mut pubs = Vec::with_capacity(n);
    let mut subs = Vec::with_capacity(n);
    for (i, url) in leaders.iter().enumerate() {
        let queue = format!("{}.q.split.{i}", env.ns);
        env.forget_on_cleanup(&queue);
        let publisher = kairos_shared::amqp::connect(url, &format!("bench-w10-pub-{i}"))
            .await
            .with_context(|| format!("W10: node of queue {i}"))?;
        let consumer = kairos_shared::amqp::connect(url, &format!("bench-w10-sub-{i}")).await?;
        let ch = publisher.create_channel().await?;
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            split_args(),
        )
        .await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        queues.push(queue);
        pubs.push((publisher, ch));
        subs.push(consumer);
    }
    // Subscribe every consumer before the clock starts.
    let mut consumers = Vec::with_capacity(n);
    for (i, conn) in subs.iter().enumerate() {
        consumers.push(subscribe(conn, &queues[i]).await?);
    }
    let deadline = Duration::from_secs(60 + m as u64 / 500);
    let t0 = Instant::now();
    let publishes = pubs
        .iter()
        .zip(&parts)
        .zip(&queues)
        .map(|(((_, ch), part), queue)| publish_part(ch, queue, part, body_bytes));
    let consumes = consumers
        .into_iter()
        .zip(&parts)
        .map(|((ch, consumer), part)| consume_part(ch, consumer, part.len()));
    let both = async {
        let (published, consumed) = tokio::join!(
            futures_util::future::try_join_all(publishes),
            futures_util::future::try_join_all(consumes)
        );
        published?;
        consumed
    };
    let consumed = tokio::time::timeout(deadline, both)
        .await
        .context("W10: messages missing at the deadline")??;
    let last = consumed
        .iter()
        .map(|(_, at)| *at)
        .max()
        .unwrap_or_else(Instant::now);
    let rate = m as f64 / (last - t0).as_secs_f64();
    let mut got = vec![false; m];
    let (mut total, mut distinct) = (0, 0);
    for (ks, _) in &consumed {
        for &k in ks {
            total += 1;
            if let Some(seen) = got.get_mut(k as usize) {
                if !*seen {
                    *seen = true;
                    distinct += 1;
                }
            }
        }
    }
    for (conn, ch) in pubs {
        let _ = ch.close(200, "done".into()).await;
        let _ = conn.close(200, "done".into()).await;
    }
    for conn in subs {
        let _ = conn.close(200, "done".into()).await;
    }
    Ok((rate, Seen { total, distinct }))
}

/// A quorum queue led by the node the declaring connection is on.
fn split_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-queue-leader-locator".into(),
        AMQPValue::LongString("client-local".into()),
    );
    args
}

/// Publishes messages `ks` (k in the first 8 bytes of each body) to
/// `queue`, confirms pipelined as in the baseline; fails on any nack.
async fn publish_part(ch: &Channel, queue: &str, ks: &[u64], body_bytes: usize) -> Result<()> {
    let mut inflight = FuturesUnordered::new();
    for slice in ks.chunks(PUBLISH_SLICE) {
        while inflight.len() + slice.len() > CONFIRM_WINDOW {
            match inflight.next().await {
                Some(c) => confirm_ok(c)?,
                None => break,
            }
        }
        let bodies: Vec<Vec<u8>> = slice
            .iter()
            .map(|k| {
                let mut body = vec![b'x'; body_bytes];
                body[..8].copy_from_slice(&k.to_be_bytes());
                body
            })
            .collect();
        let publishes = bodies.iter().map(|body| {
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
        });
        for confirm in futures_util::future::join_all(publishes).await {
            inflight.push(confirm?);
        }
    }
    while let Some(c) = inflight.next().await {
        confirm_ok(c)?;
    }
    Ok(())
}

async fn subscribe(conn: &Connection, queue: &str) -> Result<(Channel, lapin::Consumer)> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((ch, consumer))
}

/// Takes and acks `n` messages (acks in flight while the next arrive, as
/// the baseline); returns their k and when the last ack completed.
async fn consume_part(
    ch: Channel,
    mut consumer: lapin::Consumer,
    n: usize,
) -> Result<(Vec<u64>, Instant)> {
    let mut ks = Vec::with_capacity(n);
    let mut acks = FuturesUnordered::new();
    while ks.len() < n {
        tokio::select! {
            Some(acked) = acks.next(), if !acks.is_empty() => { acked?; }
            d = consumer.next() => match d {
                Some(d) => {
                    let d = d?;
                    let k = d
                        .data
                        .get(..8)
                        .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        .map(u64::from_be_bytes);
                    let Some(k) = k else { bail!("W10: a message without its number") };
                    ks.push(k);
                    acks.push(async move { d.acker.ack(BasicAckOptions::default()).await });
                }
                None => bail!("W10 consumer ended after {} of {n}", ks.len()),
            },
        }
    }
    while let Some(acked) = acks.next().await {
        acked?;
    }
    let done = Instant::now();
    let _ = ch.close(200, "done".into()).await;
    Ok((ks, done))
}
