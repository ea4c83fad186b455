//! Acceptance 3: a failing task is retried with growing backoff, then
//! dead-lettered with the dead-letter headers.

use kairos_shared::contract::{H_ATTEMPT, H_ERROR, H_FAILED_AT, H_MAX_RETRIES, H_ORIGIN_QUEUE};
use kairos_shared::events::EventKind;
use kairos_tests::*;
use lapin::types::AMQPValue;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_retries_then_dead_letters() {
    let env = TestEnv::new("retry").await;
    let mut tap = EventTap::new(&env).await;
    let mut sc = env.scheduler_config();
    sc.retry_base_ms = 200;
    let scheduler = InProcess::scheduler(sc);
    let worker = InProcess::worker(kairos_worker::Worker::new(env.worker_config()).with_builtins());

    let props = with_headers(
        task_props("kairos.fail", "doomed"),
        &[(H_MAX_RETRIES, AMQPValue::ShortShortUInt(3))],
    );
    env.publish(&env.names.tasks_exchange(), "default", props, b"{}")
        .await;

    let dead = env.dead_letters(1, Duration::from_secs(30)).await;
    let dl = &dead[0];
    assert_eq!(dl.id().as_deref(), Some("doomed"));
    assert_eq!(dl.header(H_ATTEMPT).as_deref(), Some("4"));
    assert!(
        dl.header(H_ERROR)
            .unwrap_or_default()
            .contains("kairos.fail"),
        "{dl:?}"
    );
    assert_eq!(dl.header(H_ORIGIN_QUEUE).as_deref(), Some("default"));
    assert!(dl.header(H_FAILED_AT).is_some());
    assert_eq!(dl.routing_key, "default");

    tap.wait_until(Duration::from_secs(10), "the dead event", |s| {
        s.iter().any(|e| e.id == "doomed" && e.kind == "dead")
    })
    .await;
    let starts: Vec<_> = tap
        .of(EventKind::Started)
        .into_iter()
        .filter(|e| e.id == "doomed")
        .collect();
    let attempts: Vec<u64> = starts.iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3, 4], "exactly 4 starts");
    let gaps: Vec<i64> = starts.windows(2).map(|w| w[1].at - w[0].at).collect();
    println!("gaps between attempts: {gaps:?} ms");
    assert!(
        gaps.windows(2).all(|g| g[1] > g[0]),
        "gaps do not grow: {gaps:?}"
    );
    assert!(
        gaps[0] >= 100,
        "first backoff {} ms is below base/2",
        gaps[0]
    );
    assert_eq!(
        tap.of(EventKind::Retried)
            .iter()
            .filter(|e| e.id == "doomed")
            .count(),
        3
    );

    worker.stop().await;
    scheduler.stop().await;
}
