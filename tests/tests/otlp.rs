//! OpenTelemetry export (builds with the `otlp` feature only:
//! `cargo test -p kairos-tests --features otlp --test otlp`): the spans of
//! one traced task (enqueue, hold, publish, the worker's run) reach an
//! OTLP/HTTP collector in the client's trace.
#![cfg(feature = "otlp")]

use kairos_shared::client::NewTask;
use kairos_shared::trace::TraceParent;
use kairos_shared::trace_init::{init, LogSettings, OtlpSettings};
use kairos_tests::*;
use kairos_worker::Worker;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A collector that keeps the body of every request it gets.
async fn collector() -> (String, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = [0u8; 65536];
                // Headers, then as many bytes as Content-Length says.
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    raw.extend_from_slice(&buf[..n]);
                    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if raw.len() >= end + 4 + len {
                        kept.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(raw[end + 4..end + 4 + len].to_vec());
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                }
            });
        }
    });
    (url, bodies)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spans_of_a_traced_task_reach_the_collector_in_the_clients_trace() {
    let (url, bodies) = collector().await;
    let otlp = OtlpSettings {
        otlp_endpoint: Some(url),
    };
    let guard = init(
        &LogSettings::default(),
        Some(&otlp),
        "kairos-test",
        "info",
        true,
    )
    .expect("export starts");
    let env = TestEnv::new("otlp").await;
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let log = RunLog::default();
    let worker =
        InProcess::worker(Worker::new(env.worker_config()).handler("test.otlp", log.handler(0)));
    let client = env.client().await;
    client
        .enqueue(
            NewTask::new("test.otlp")
                .id("otlp-1")
                .delay_ms(100)
                .traceparent(TP),
        )
        .await
        .expect("enqueue");
    log.wait_distinct(1, Duration::from_secs(20)).await;
    worker.stop().await;
    scheduler.stop().await;
    // Dropping the guard sends what is buffered (a blocking call).
    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .expect("flush");

    let bodies = bodies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let all: Vec<u8> = bodies.concat();
    let trace_id = TraceParent::parse(TP).expect("valid").trace_id;
    assert!(
        contains(&all, &trace_id),
        "no span of the trace was exported"
    );
    for name in ["kairos.enqueue", "kairos.hold", "kairos.publish", "task"] {
        assert!(contains(&all, name.as_bytes()), "no {name} span exported");
    }
    assert!(contains(&all, b"kairos-test"), "service.name missing");
}
