//! W7 HTTP enqueue: `POST /v1/tasks` from 32 concurrent clients, each on
//! its own keep-alive connection sending one request after the other, into
//! the scheduler's task API served on a local port (the same router the
//! scheduler serves). Reported as a ratio to the raw publish baseline of
//! the run: the API publishes each task and answers 202 only after the
//! broker confirmed it, so its ceiling is the broker's confirmed publish
//! rate. Requests used to be serialized by one lock held across publish
//! and confirm, which capped the API at one confirm round trip at a time.

use super::Ctx;
use crate::env::BenchEnv;
use crate::report::Row;
use anyhow::{bail, Context, Result};
use kairos_scheduler::api::tasks::{router, TaskApi};
use std::net::SocketAddr;
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Concurrent HTTP clients.
pub(crate) const CLIENTS: usize = 32;

pub(crate) async fn run(ctx: &mut Ctx<'_>) -> Result<()> {
    let env = BenchEnv::new("w7", &ctx.args.amqp_url, &ctx.args.redis_url).await?;
    let result = measure(ctx, &env).await;
    env.cleanup().await;
    result
}

async fn measure(ctx: &mut Ctx<'_>, env: &BenchEnv) -> Result<()> {
    let n = ctx.args.http_tasks.max(CLIENTS);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = {
        let app = router(TaskApi::new(
            kairos_shared::amqp::Broker::plain(&env.amqp_url),
            env.names.clone(),
        ));
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        })
    };
    let body = request_body(ctx.args.body_bytes);
    // The API connects to the broker on its first request: not timed.
    post_many(addr, 1, &body).await.context("first request")?;

    let t0 = Instant::now();
    let per_client = n / CLIENTS;
    let clients = (0..CLIENTS).map(|_| {
        let body = body.clone();
        tokio::spawn(async move { post_many(addr, per_client, &body).await })
    });
    let mut accepted = 0;
    for c in futures_util::future::join_all(clients).await {
        accepted += c.context("client task")??;
    }
    let secs = t0.elapsed().as_secs_f64();
    stop.cancel();
    let _ = server.await;

    let rate = accepted as f64 / secs;
    ctx.report.push(
        Row::new(
            "W7 HTTP enqueue",
            &format!("POST /v1/tasks, {CLIENTS} clients"),
            rate,
            "tasks/s",
        )
        .ratio(ctx.base.classic.publish)
        .note(format!(
            "{accepted} tasks, 202 after the confirm; x raw publish (classic)"
        )),
    );
    // Every 202 is a confirmed task in NS.q.default (plus the first one).
    let depth = env.queue_depth(&env.names.queue("default")).await? as usize;
    ctx.report.check(
        depth == accepted + 1,
        format!(
            "W7: {depth} tasks in the queue after {} accepted",
            accepted + 1
        ),
    );
    Ok(())
}

fn request_body(bytes: usize) -> String {
    format!(
        r#"{{"name": "kairos.noop", "body_text": "{}"}}"#,
        "x".repeat(bytes)
    )
}

/// Sends `count` enqueue requests one after the other on one keep-alive
/// connection; returns how many were accepted (all, or an error).
async fn post_many(addr: SocketAddr, count: usize, body: &str) -> Result<usize> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let request = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut line = String::new();
    for _ in 0..count {
        write.write_all(request.as_bytes()).await?;
        line.clear();
        read.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let mut length = 0;
        loop {
            line.clear();
            if read.read_line(&mut line).await? == 0 {
                bail!("connection closed mid-response");
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse()?;
                }
            }
        }
        let mut answer = vec![0; length];
        read.read_exact(&mut answer).await?;
        if status != 202 {
            bail!(
                "enqueue answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
    }
    Ok(count)
}
