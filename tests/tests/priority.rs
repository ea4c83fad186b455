//! Acceptance 2: priorities take effect behind a backlog on one worker.

use kairos_shared::events::EventKind;
use kairos_tests::*;
use lapin::types::AMQPValue;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_overtakes_a_low_backlog() {
    let env = TestEnv::new("prio").await;
    let mut tap = EventTap::new(&env).await;
    let mut penv = env.process_env();
    penv.push(("KAIROS_CONCURRENCY".into(), "4".into()));
    let _worker = Proc::spawn("kairos-worker", &penv);

    let low: Vec<_> = (0..1000)
        .map(|i| {
            let p = task_props("kairos.sleep", &format!("low-{i}")).with_priority(0);
            (key(&env, 0), p, br#"{"ms": 4}"#.to_vec())
        })
        .collect();
    env.publish_many(&env.names.tasks_exchange(), low).await;
    // The backlog is being worked on...
    tap.wait_until(Duration::from_secs(30), "50 low tasks to start", |s| {
        s.iter().filter(|e| e.kind == "started").count() >= 50
    })
    .await;
    // ...when 20 urgent tasks arrive.
    let high: Vec<_> = (0..20)
        .map(|i| {
            let p = with_headers(
                task_props("kairos.sleep", &format!("high-{i}")).with_priority(9),
                &[("x-note", AMQPValue::LongString("urgent".into()))],
            );
            (key(&env, 9), p, br#"{"ms": 4}"#.to_vec())
        })
        .collect();
    env.publish_many(&env.names.tasks_exchange(), high).await;
    tap.wait_distinct(EventKind::Started, 1020, Duration::from_secs(60))
        .await;

    let starts: Vec<&str> = tap
        .of(EventKind::Started)
        .iter()
        .map(|e| e.id.as_str())
        .collect();
    let last_high = starts
        .iter()
        .rposition(|id| id.starts_with("high-"))
        .expect("high tasks started");
    let lows_before_last_high = starts[..last_high]
        .iter()
        .filter(|id| id.starts_with("low-"))
        .count();
    println!("the last high-priority task started after {lows_before_last_high} low ones");
    assert!(
        lows_before_last_high < 500,
        "{lows_before_last_high} low tasks started before the last high one"
    );
    assert_eq!(
        starts.iter().filter(|id| id.starts_with("high-")).count(),
        20
    );
}

/// The routing key a raw client uses on `NS.tasks` for a task of
/// `priority` on queue `default`: `default` in classic mode; in quorum mode
/// the band's key (`default.p7` for 7 to 9), as docs/CONTRACT.md says.
fn key(env: &TestEnv, priority: u8) -> String {
    env.names
        .route("default", priority)
        .expect("routing key")
        .to_string()
}
