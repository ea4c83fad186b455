//! Acceptance 4: kill -9 of a worker mid-run loses nothing: every task
//! completes at least once after a new worker starts.

use kairos_shared::events::EventKind;
use kairos_tests::*;
use std::collections::HashMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_loses_no_task() {
    let env = TestEnv::new("crashw").await;
    let mut tap = EventTap::new(&env).await;
    let mut penv = env.process_env();
    penv.push(("KAIROS_CONCURRENCY".into(), "8".into()));
    let mut first = Proc::spawn("kairos-worker", &penv);

    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let p = task_props("kairos.sleep", &format!("s-{i}"));
            ("default".to_string(), p, br#"{"ms": 50}"#.to_vec())
        })
        .collect();
    env.publish_many(&env.names.tasks_exchange(), tasks).await;

    tap.wait_until(Duration::from_secs(30), "40 tasks to succeed", |s| {
        s.iter().filter(|e| e.kind == "succeeded").count() >= 40
    })
    .await;
    first.kill9();
    let done_before_kill = tap.of(EventKind::Succeeded).len();
    assert!(
        done_before_kill < 200,
        "the kill came too late to test anything"
    );

    let _second = Proc::spawn("kairos-worker", &penv);
    tap.wait_distinct(EventKind::Succeeded, 200, Duration::from_secs(60))
        .await;

    let mut runs: HashMap<&str, usize> = HashMap::new();
    for e in tap.of(EventKind::Started) {
        *runs.entry(e.id.as_str()).or_default() += 1;
    }
    let twice = runs.values().filter(|&&n| n > 1).count();
    println!(
        "killed after {done_before_kill} succeeded; {twice} tasks started twice (redelivered)"
    );
    assert_eq!(tap.of(EventKind::Dead).len(), 0);
    assert_eq!(env.queue_depth(&env.names.queue("default")).await, 0);
}
