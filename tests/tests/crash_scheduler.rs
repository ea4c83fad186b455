//! Acceptance 5: kill -9 of one of two schedulers while 5,000 delayed tasks
//! fall due: every task is still published; duplicates are counted.

use futures_util::StreamExt;
use kairos_tests::*;
use lapin::types::AMQPValue;
use std::collections::HashMap;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_scheduler_loses_no_task() {
    let env = TestEnv::new("crashs").await;
    let mut penv = env.process_env();
    penv.push(("KAIROS_LEASE_MS".into(), "1500".into()));
    penv.push(("KAIROS_IDLE_MS".into(), "200".into()));
    let mut a = Proc::spawn("kairos-scheduler", &penv);
    let _b = Proc::spawn("kairos-scheduler", &penv);

    const N: usize = 5000;
    let start = now_ms() + 3000;
    let tasks: Vec<_> = batch(N, |i| {
        // Due uniformly over one second, starting 3 s from now.
        let run_at = start + (i as i64 * 1000) / N as i64;
        with_headers(
            task_props("kairos.noop", &format!("t-{i}")),
            &[("x-run-at", AMQPValue::LongLongInt(run_at))],
        )
    });
    env.publish_many(&env.names.delay(), tasks).await;

    // Read what the schedulers publish, as a worker would.
    let mut consumer = env.consume_queue("default", 1000).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let kill_at =
        tokio::time::Instant::now() + Duration::from_millis((start - now_ms() + 300).max(0) as u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut killed = false;
    while seen.len() < N {
        let next = tokio::select! {
            _ = tokio::time::sleep_until(kill_at), if !killed => {
                a.kill9();
                killed = true;
                println!("killed scheduler A after {} tasks were published", seen.len());
                continue;
            }
            d = tokio::time::timeout_at(deadline, consumer.next()) => d,
        };
        let d = next
            .unwrap_or_else(|_| panic!("only {} of {N} tasks published", seen.len()))
            .expect("stream")
            .expect("delivery");
        let id = d.properties.message_id().as_ref().expect("id").to_string();
        *seen.entry(id).or_default() += 1;
        ack(&d).await;
    }
    assert!(killed, "the kill happened before every task was published");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!("{N} tasks published, {duplicates} duplicates");
    assert_eq!(seen.len(), N);
}
