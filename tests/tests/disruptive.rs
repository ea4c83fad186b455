//! Tests that disturb the shared servers. Built only with the `disruptive`
//! feature; scripts/test.sh runs them alone, after everything else.
#![cfg(feature = "disruptive")]

use kairos_tests::*;
use std::process::Command;
use std::time::Duration;

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// Starts the broker app again even if the test fails half-way.
struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").status();
        let _ = Command::new("rabbitmqctl")
            .args(["await_startup", "--timeout", "60"])
            .status();
    }
}

/// Acceptance 7: RabbitMQ restarts in the middle of a run; scheduler and
/// worker reconnect by themselves and every acked task still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_no_acked_task() {
    let env = TestEnv::new("restart").await;
    let log = RunLog::default();
    let scheduler = InProcess::scheduler(env.scheduler_config());
    let mut wc = env.worker_config();
    wc.common.events = false;
    let worker =
        InProcess::worker(kairos_worker::Worker::new(wc).handler("test.record", log.handler(20)));

    const NOW: usize = 150;
    const LATER: usize = 150;
    let immediate: Vec<_> = (0..NOW)
        .map(|i| {
            (
                "default".to_string(),
                task_props("test.record", &format!("now-{i}")),
                Vec::new(),
            )
        })
        .collect();
    let delayed: Vec<_> = batch(LATER, |i| {
        delayed_props("test.record", &format!("later-{i}"), 1000 + (i as i32) * 40)
    });
    env.publish_many(&env.names.tasks_exchange(), immediate)
        .await;
    env.publish_many(&env.names.delay(), delayed).await;

    // Let some work happen, then take the broker away mid-run.
    log.wait_distinct(20, Duration::from_secs(30)).await;
    let guard = BrokerGuard;
    rabbitmqctl(&["stop_app"]);
    let during = log.total();
    // The outage itself: the broker stays down for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup", "--timeout", "60"]);
    drop(guard);

    log.wait_distinct(NOW + LATER, Duration::from_secs(120))
        .await;
    println!(
        "broker restarted after {during} runs; all {} tasks completed ({} runs in all)",
        NOW + LATER,
        log.total()
    );
    worker.stop().await;
    scheduler.stop().await;
}
