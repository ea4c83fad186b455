//! Acceptance 1: a client in another language (Python with pika, not the
//! Rust client) enqueues to the real `kairos-worker` and `kairos-scheduler`.

use kairos_shared::events::EventKind;
use kairos_tests::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_tasks_run_now_and_delayed_on_time() {
    let env = TestEnv::new("py").await;
    let mut tap = EventTap::new(&env).await;
    let _scheduler = Proc::spawn("kairos-scheduler", &env.process_env());
    let _worker = Proc::spawn("kairos-worker", &env.process_env());

    // Immediate: straight to NS.tasks.
    let now = python_enqueue(&env, &["--name", "kairos.noop", "--id", "py-now"]);
    assert_eq!(now["exchange"], format!("{}.tasks", env.ns));
    tap.wait_until(Duration::from_secs(20), "py-now to succeed", |s| {
        s.iter().any(|e| e.id == "py-now" && e.kind == "succeeded")
    })
    .await;

    // Delayed by 1500 ms through NS.delay.
    let sent = python_enqueue(
        &env,
        &[
            "--name",
            "kairos.sleep",
            "--id",
            "py-later",
            "--body",
            r#"{"ms": 5}"#,
            "--delay-ms",
            "1500",
        ],
    );
    let sent_at = sent["sent_at"].as_i64().expect("sent_at");
    tap.wait_until(Duration::from_secs(20), "py-later to succeed", |s| {
        s.iter()
            .any(|e| e.id == "py-later" && e.kind == "succeeded")
    })
    .await;
    let scheduled = tap.first(EventKind::Scheduled, "py-later");
    let started = tap.first(EventKind::Started, "py-later");
    let due = scheduled.due_at.expect("due_at on scheduled");
    assert!(
        due >= sent_at + 1500,
        "due {due} is before sent+1500 {}",
        sent_at + 1500
    );
    let lateness = started.at - due;
    println!("x-delay-ms 1500: started {lateness} ms after due");
    assert!(lateness >= 0, "started {} ms early", -lateness);
    assert!(lateness <= 50, "started {lateness} ms late");
    assert_eq!(started.attempt, 1);
    assert_eq!(
        started.due_at,
        Some(due),
        "the worker knows when the task fell due"
    );
}
