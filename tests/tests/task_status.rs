//! Task status (issue 16): the merge rules on the real Redis, states
//! through a real scheduler and worker, the task routes (get, cancel,
//! list), the cancel/promotion race, expiry, and status off.

use kairos_shared::client::NewTask;
use kairos_shared::contract::Task;
use kairos_shared::redis::RedisConn;
use kairos_shared::status::{ShardCount, StatusStore, StatusUpdate, TaskState};
use kairos_tests::*;

/// A store on the shared Redis in `env`'s namespace, keeping `ttl_s`.
fn store(env: &TestEnv, shards: usize, ttl_s: u64) -> StatusStore {
    let pool = kairos_shared::redis::pool(
        REDIS_URL,
        &Default::default(),
        std::time::Duration::from_secs(5),
    )
    .expect("pool");
    StatusStore::new(
        RedisConn::new(pool),
        &env.ns,
        ShardCount::known(shards),
        ttl_s,
    )
}

/// A decoded task `id` on queue `q`, at `attempt`.
fn task(id: &str, q: &str, attempt: u32) -> Task {
    let (_, props) = NewTask::new("t.status")
        .queue(q)
        .id(id)
        .to_message()
        .expect("message");
    let mut t = Task::decode(q, &props, b"").expect("task");
    t.attempt = attempt;
    t
}

#[tokio::test]
async fn merges_keep_the_highest_rank_and_fill_what_is_missing() {
    let env = TestEnv::new("st-merge").await;
    let st = store(&env, 4, 600);
    let t = task("m1", "default", 1);
    st.merge(&StatusUpdate::running(&t, "w1"))
        .await
        .expect("running");
    // A late `scheduled` and `ready` lose, but fill due_at and enqueued_at.
    st.merge(&StatusUpdate::scheduled(&t, 1_000, true))
        .await
        .expect("scheduled");
    st.merge(&StatusUpdate::ready(&t, 1_000))
        .await
        .expect("ready");
    let s = st.get("m1").await.expect("get").expect("known");
    assert_eq!(s.state, Some(TaskState::Running));
    assert_eq!((s.due_at, s.worker.as_deref()), (Some(1_000), Some("w1")));
    assert!(s.enqueued_at.is_some() && s.started_at.is_some());
    st.merge(&StatusUpdate::succeeded(&t))
        .await
        .expect("succeeded");
    // Fields only: progress lands; a retrying of attempt 2 cannot undo a
    // finished state.
    st.set_progress("m1", 150, Some("almost"))
        .await
        .expect("progress");
    st.merge(&StatusUpdate::retrying(&task("m1", "default", 2), 5, "x"))
        .await
        .expect("retrying");
    let s = st.get("m1").await.expect("get").expect("known");
    assert_eq!(s.state, Some(TaskState::Succeeded));
    assert_eq!(s.progress, Some(100));
    assert_eq!(s.progress_message.as_deref(), Some("almost"));
    // A new submission of the same id (another due time) starts over.
    st.merge(&StatusUpdate::scheduled(&t, 2_000, true))
        .await
        .expect("fresh");
    let s = st.get("m1").await.expect("get").expect("known");
    assert_eq!(s.state, Some(TaskState::Scheduled));
    assert_eq!((s.due_at, s.worker), (Some(2_000), None));
    // Fields only for an unknown task create nothing.
    st.set_progress("nobody", 5, None).await.expect("progress");
    assert!(st.get("nobody").await.expect("get").is_none());
    // Checkpoints round-trip.
    st.save_checkpoint("m1", b"\x00cp").await.expect("save");
    assert_eq!(
        st.load_checkpoint("m1").await.expect("load").as_deref(),
        Some(&b"\x00cp"[..])
    );
}
