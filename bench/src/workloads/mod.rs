//! The workloads, one module each. Each runs in its own namespace, adds
//! its rows and count checks to the report, and cleans up on every path.

pub(crate) mod w10_split;
pub(crate) mod w1_burst;
pub(crate) mod w2_precision;
pub(crate) mod w3_backlog;
pub(crate) mod w4_retry;
pub(crate) mod w5_schedules;
pub(crate) mod w6_idle;
pub(crate) mod w7_http;
pub(crate) mod w8_big_bodies;
pub(crate) mod w9_shards;

use crate::baseline::{Baseline, Rates};
use crate::report::Report;
use crate::target::Target;
use crate::Args;
use anyhow::Result;
use futures_util::{StreamExt, TryStreamExt};
use kairos_shared::client::{Client, NewTask};
use std::sync::Arc;
use std::time::Duration;

/// What every workload gets.
pub(crate) struct Ctx<'a> {
    pub(crate) args: &'a Args,
    pub(crate) base: Baseline,
    pub(crate) report: &'a mut Report,
    /// The single node (`--amqp-url`, `--redis-url`).
    pub(crate) single: Target,
    /// The cluster and its baseline, with `--cluster`.
    pub(crate) cluster: Option<ClusterCtx>,
}

/// The cluster target and the raw rates measured on it in this run.
#[derive(Clone)]
pub(crate) struct ClusterCtx {
    pub(crate) target: Target,
    /// Raw lapin on one queue of the cluster's mode.
    pub(crate) base: Rates,
}

/// Time for a newly started in-process scheduler or worker to start
/// consuming, before a workload measures anything.
pub(crate) const SERVICE_SETTLE: Duration = Duration::from_millis(500);

/// Tasks per `enqueue_many` call, and calls in flight: 4 x 1,000 confirms
/// outstanding keeps the broker busy without a gap between chunks.
const CHUNK: usize = 1_000;
const CHUNKS_IN_FLIGHT: usize = 4;

/// Enqueues `n` tasks made by `make(i)` with the Rust client, pipelining
/// confirms. Tasks are built chunk by chunk, so a million of them never sit
/// in memory at once.
pub(crate) async fn enqueue_all(
    client: &Arc<Client>,
    n: usize,
    make: impl Fn(usize) -> NewTask,
) -> Result<usize> {
    let make = &make;
    let counts: Vec<usize> = futures_util::stream::iter((0..n).step_by(CHUNK))
        .map(|from| {
            let client = client.clone();
            let chunk: Vec<NewTask> = (from..(from + CHUNK).min(n)).map(make).collect();
            async move { client.enqueue_many(&chunk).await.map(|ids| ids.len()) }
        })
        .buffer_unordered(CHUNKS_IN_FLIGHT)
        .try_collect()
        .await?;
    Ok(counts.into_iter().sum())
}

/// The body every bench task carries (the baseline uses the same size).
pub(crate) fn body(bytes: usize) -> Vec<u8> {
    vec![b'x'; bytes]
}
