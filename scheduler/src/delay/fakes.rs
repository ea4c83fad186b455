//! Fakes for the unit tests of the pump and the intake: a publisher whose
//! confirms a test scripts, and deliveries that log how they were settled.

use crate::delay::memory::MemoryDelayStore;
use crate::delay::ports::{IntakeDelivery, TaskPublisher};
use kairos_shared::amqp::Blocked;
use kairos_shared::client::NewTask;
use kairos_shared::contract::{value_to_string, ProtocolError, Task, H_ERROR};
use kairos_shared::topology::DeclareError;
use lapin::{BasicProperties, Confirmation};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use tokio::sync::watch;

/// What the fake broker does with one publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Confirms it.
    Ack,
    /// Refuses it (a full queue with `reject-publish`).
    Nack,
    /// Fails the publish itself (the channel broke).
    Fail,
    /// Never confirms it (a blocked broker).
    Hang,
    /// Refuses the queue's name.
    BadName,
}

/// One publish the fake saw.
#[derive(Clone, Debug)]
pub(crate) enum Seen {
    /// A task to its queue, as published.
    Ready(Box<Task>),
    /// A dead letter: its origin queue and its `x-error`.
    Dead { origin: String, error: String },
}

/// The confirm of a fake publish: resolved at once, or (without an
/// answer) never.
pub(crate) struct FakeConfirm(Option<Box<lapin::Result<Confirmation>>>);

impl FakeConfirm {
    fn now(answer: lapin::Result<Confirmation>) -> Self {
        FakeConfirm(Some(Box::new(answer)))
    }
}

impl Future for FakeConfirm {
    type Output = lapin::Result<Confirmation>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut().0.take() {
            Some(answer) => Poll::Ready(*answer),
            None => Poll::Pending,
        }
    }
}

#[derive(Default)]
struct Script {
    /// Answers for the next publishes, in order; then `fallback`.
    next: VecDeque<Answer>,
    fallback: Option<Answer>,
    seen: Vec<Seen>,
}

/// A publisher whose answers a test scripts; it records every publish.
pub(crate) struct FakePublisher {
    script: Mutex<Script>,
    /// Bumped on every publish, so a test awaits a count instead of polling.
    publishes: watch::Sender<usize>,
}

impl FakePublisher {
    /// Answers every publish with `fallback` once the script runs out.
    pub(crate) fn answering(fallback: Answer) -> Arc<Self> {
        Arc::new(FakePublisher {
            script: Mutex::new(Script {
                fallback: Some(fallback),
                ..Script::default()
            }),
            publishes: watch::channel(0).0,
        })
    }

    /// Answers the next publishes with `answers`, in order.
    pub(crate) fn then(self: &Arc<Self>, answers: &[Answer]) -> Arc<Self> {
        self.lock().next.extend(answers);
        self.clone()
    }

    /// Every publish so far.
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// The ids of the tasks published so far, in order.
    pub(crate) fn ready_ids(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Ready(task) => Some(task.id.clone()),
                Seen::Dead { .. } => None,
            })
            .collect()
    }

    /// The dead letters published so far: (origin, error).
    pub(crate) fn dead(&self) -> Vec<(String, String)> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Dead { origin, error } => Some((origin, error)),
                Seen::Ready(_) => None,
            })
            .collect()
    }

    /// Waits until at least `n` publishes were seen.
    pub(crate) async fn wait_publishes(&self, n: usize) {
        let mut count = self.publishes.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = count.wait_for(|c| *c >= n).await;
    }

    fn lock(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `seen` and returns the scripted answer for it.
    fn answer(&self, seen: Seen) -> Answer {
        let answer = {
            let mut script = self.lock();
            script.seen.push(seen);
            script
                .next
                .pop_front()
                .or(script.fallback)
                .unwrap_or(Answer::Ack)
        };
        self.publishes.send_modify(|c| *c += 1);
        answer
    }
}

fn broken_channel() -> lapin::Error {
    lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(std::io::Error::other(
        "fake channel broke",
    ))))
}

fn confirm_of(answer: Answer) -> Result<FakeConfirm, DeclareError> {
    match answer {
        Answer::Ack => Ok(FakeConfirm::now(Ok(Confirmation::Ack(None)))),
        Answer::Nack => Ok(FakeConfirm::now(Ok(Confirmation::Nack(None)))),
        Answer::Hang => Ok(FakeConfirm(None)),
        Answer::Fail => Err(DeclareError::Amqp(broken_channel())),
        Answer::BadName => Err(DeclareError::BadName(ProtocolError::BadQueue(
            "fake refuses the name".into(),
        ))),
    }
}

impl TaskPublisher for FakePublisher {
    type Confirm = FakeConfirm;

    fn blocked(&self) -> Blocked {
        Blocked::never()
    }

    async fn publish_ready_many(&self, tasks: &[&Task]) -> Vec<Result<FakeConfirm, DeclareError>> {
        tasks
            .iter()
            .map(|t| confirm_of(self.answer(Seen::Ready(Box::new((*t).clone())))))
            .collect()
    }

    async fn publish_dead(
        &self,
        origin_queue: &str,
        properties: BasicProperties,
        _body: &[u8],
    ) -> lapin::Result<FakeConfirm> {
        let error = properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(H_ERROR).map(value_to_string))
            .unwrap_or_default();
        let seen = Seen::Dead {
            origin: origin_queue.to_string(),
            error,
        };
        match confirm_of(self.answer(seen)) {
            Ok(confirm) => Ok(confirm),
            Err(DeclareError::Amqp(err)) => Err(err),
            Err(DeclareError::Inequivalent(m)) => Err(m.source),
            // `NS.dead` always has a name.
            Err(DeclareError::BadName(_)) => Ok(FakeConfirm::now(Ok(Confirmation::Ack(None)))),
        }
    }

    fn forget_queue(&self, _queue: &str) {}
}

/// How a fake delivery was settled, and how many tasks the store held then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acked with `multiple`: (its tag, tasks in the store).
    AckUpTo(u64, usize),
    /// Returned to the queue: (its tag, `multiple`).
    Requeued(u64, bool),
}

/// A delivery the intake reads; settling it appends to a shared log.
pub(crate) struct FakeDelivery {
    tag: u64,
    routing_key: String,
    properties: BasicProperties,
    data: Vec<u8>,
    log: Arc<Mutex<Vec<Settled>>>,
    store: MemoryDelayStore,
}

impl FakeDelivery {
    fn push(&self, settled: Settled) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(settled);
    }
}

/// Builds a batch of fake deliveries sharing one settle log.
pub(crate) struct Deliveries {
    log: Arc<Mutex<Vec<Settled>>>,
    store: MemoryDelayStore,
    next_tag: u64,
}

impl Deliveries {
    /// Deliveries whose acks note how many tasks `store` held then.
    pub(crate) fn new(store: &MemoryDelayStore) -> Self {
        Deliveries {
            log: Arc::default(),
            store: store.clone(),
            next_tag: 1,
        }
    }

    /// A delivery of `task` to its queue.
    pub(crate) fn task(&mut self, task: &NewTask) -> FakeDelivery {
        let (_, properties) = task.to_message().expect("a valid test task");
        self.raw(&task.queue, properties, task.body.clone())
    }

    /// A delivery of anything.
    pub(crate) fn raw(
        &mut self,
        routing_key: &str,
        properties: BasicProperties,
        data: Vec<u8>,
    ) -> FakeDelivery {
        let tag = self.next_tag;
        self.next_tag += 1;
        FakeDelivery {
            tag,
            routing_key: routing_key.to_string(),
            properties,
            data,
            log: self.log.clone(),
            store: self.store.clone(),
        }
    }

    /// How the deliveries were settled, in order.
    pub(crate) fn log(&self) -> Vec<Settled> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl IntakeDelivery for FakeDelivery {
    fn routing_key(&self) -> &str {
        &self.routing_key
    }

    fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    fn data(&self) -> &[u8] {
        &self.data
    }

    async fn ack_up_to(&self) -> lapin::Result<()> {
        self.push(Settled::AckUpTo(self.tag, self.store.len()));
        Ok(())
    }

    async fn requeue(&self, multiple: bool) -> lapin::Result<()> {
        self.push(Settled::Requeued(self.tag, multiple));
        Ok(())
    }
}

/// The queue test tasks go to.
pub(crate) const QUEUE: &str = "jobs";

/// A test task with this id, on [`QUEUE`].
pub(crate) fn new_task(id: &str) -> NewTask {
    NewTask::new("test.kind")
        .queue(QUEUE)
        .id(id)
        .body(format!("body of {id}").into_bytes())
}

/// `task` as the intake decodes it from its message.
pub(crate) fn task_of(task: &NewTask) -> Task {
    let (_, properties) = task.to_message().expect("a valid test task");
    Task::decode(&task.queue, &properties, &task.body).expect("a decodable test task")
}

/// `task` as the store holds it.
pub(crate) fn record_of(task: &NewTask) -> Vec<u8> {
    kairos_shared::record::encode(&task_of(task)).expect("an encodable test task")
}

/// Waits for `f`, failing the test after [`TEST_WAIT`].
pub(crate) async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(TEST_WAIT, f).await {
        Ok(out) => out,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// How long a test waits for something that takes milliseconds.
pub(crate) const TEST_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
