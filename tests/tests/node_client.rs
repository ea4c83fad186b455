//! The contract from Node.js (amqplib): the documented example enqueues an
//! immediate and a delayed task that the real binaries run.

use kairos_shared::events::EventKind;
use kairos_tests::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_tasks_run_now_and_delayed() {
    let env = TestEnv::new("node").await;
    let mut tap = EventTap::new(&env).await;
    let _scheduler = Proc::spawn("kairos-scheduler", &env.process_env());
    let _worker = Proc::spawn("kairos-worker", &env.process_env());

    node_enqueue(
        &env,
        &["--name", "kairos.noop", "--id", "js-now", "--priority", "3"],
    );
    let sent = node_enqueue(
        &env,
        &[
            "--name",
            "kairos.sleep",
            "--id",
            "js-later",
            "--body",
            r#"{"ms": 1}"#,
            "--delay-ms",
            "700",
            "--max-retries",
            "2",
        ],
    );
    let sent_at = sent["sent_at"].as_i64().expect("sent_at");
    tap.wait_until(Duration::from_secs(20), "both node tasks to succeed", |s| {
        ["js-now", "js-later"]
            .iter()
            .all(|id| s.iter().any(|e| e.id == *id && e.kind == "succeeded"))
    })
    .await;
    let started = tap.first(EventKind::Started, "js-later");
    assert!(
        started.at >= sent_at + 700,
        "ran {} ms early",
        sent_at + 700 - started.at
    );
}
