//! The Rust client: enqueue tasks by publishing one AMQP message each, with
//! publisher confirms, exactly as the contract says any language may.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kairos_shared::client::ClientError> {
//! use kairos_shared::client::{Client, NewTask};
//! let client = Client::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "kairos").await?;
//! let id = client
//!     .enqueue(NewTask::new("email.send").queue("emails").json(&serde_json::json!({"to": "a@b.c"}))?.delay_ms(5_000))
//!     .await?;
//! # Ok(()) }
//! ```

use crate::contract::{
    text, validate_id, validate_queue, Names, ProtocolError, H_COST, H_DELAY_MS, H_ESTIMATE_MS,
    H_MAX_RETRIES, H_RUN_AT, H_TIMEOUT_MS,
};
use crate::short::{header_name, short};
use crate::topology::{self, DeclareError};
use futures_util::future::try_join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use thiserror::Error;

/// Why an enqueue failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The connection or channel failed.
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker did not take the task.
    #[error("the broker refused the task (nack)")]
    Nacked,
    /// No queue is bound for the task's queue name (the reply text).
    #[error("the broker returned the task as unroutable: {0}")]
    Unroutable(String),
    /// The task breaks the contract; nothing was sent.
    #[error("invalid task: {0}")]
    Invalid(#[from] ProtocolError),
    /// [`NewTask::json`] could not serialize the value.
    #[error("cannot serialize the body: {0}")]
    Body(#[from] serde_json::Error),
    /// The namespace cannot make AMQP names (the reason).
    #[error("namespace: {0}")]
    Namespace(String),
    /// A setting the client reads is bad (the message names it), or a task
    /// queue exists in another order than `KAIROS_QUEUE_ORDER` gives it.
    #[error("{0}")]
    Setting(String),
}

impl From<DeclareError> for ClientError {
    fn from(e: DeclareError) -> Self {
        match e {
            DeclareError::Amqp(e) => ClientError::Amqp(e),
            DeclareError::BadName(p) => ClientError::Invalid(p),
            e @ DeclareError::Inequivalent(_) => ClientError::Setting(e.to_string()),
        }
    }
}

/// A task to enqueue. Built with chained setters, or from what a user gave
/// ([`crate::template::TaskTemplate::to_new_task`]).
#[derive(Clone, Debug)]
pub struct NewTask {
    /// Task name (AMQP `type`).
    pub name: String,
    /// Logical queue (the routing key).
    pub queue: String,
    /// Task id; a new UUIDv7 when unset.
    pub id: Option<String>,
    /// 0 to 9 (higher is clamped to 9).
    pub priority: u8,
    /// The message body.
    pub body: Vec<u8>,
    /// AMQP `content_type`.
    pub content_type: Option<String>,
    /// Due time, Unix ms (`x-run-at`).
    pub run_at: Option<i64>,
    /// Due this long after the scheduler accepts it (`x-delay-ms`).
    pub delay_ms: Option<i64>,
    /// Retries after the first attempt (`x-max-retries`).
    pub max_retries: Option<u32>,
    /// Time limit of one attempt (`x-timeout-ms`).
    pub timeout_ms: Option<u64>,
    /// Resource units the task occupies while it runs (`x-cost`, 1 to
    /// [`MAX_COST`](crate::contract::MAX_COST); 1 when unset).
    pub cost: Option<u32>,
    /// Expected run time in ms (`x-estimate-ms`): a `shortest-first`
    /// queue orders by it.
    pub estimate_ms: Option<u64>,
    /// Other headers, sent as they are.
    pub headers: FieldTable,
    /// A header that could not be added (its name is over 255 bytes):
    /// reported by [`to_message`](Self::to_message), as the setters do not
    /// fail.
    bad_header: Option<ProtocolError>,
}

impl NewTask {
    /// A task named `name` for the default queue, priority 0, empty body.
    pub fn new(name: impl Into<String>) -> Self {
        NewTask {
            name: name.into(),
            queue: crate::template::DEFAULT_QUEUE.into(),
            id: None,
            priority: 0,
            body: Vec::new(),
            content_type: None,
            run_at: None,
            delay_ms: None,
            max_retries: None,
            timeout_ms: None,
            cost: None,
            estimate_ms: None,
            headers: FieldTable::default(),
            bad_header: None,
        }
    }
    /// Sets the logical queue.
    pub fn queue(mut self, q: impl Into<String>) -> Self {
        self.queue = q.into();
        self
    }
    /// Sets the task id (1 to 128 printable ASCII characters).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
    /// Sets the priority.
    pub fn priority(mut self, p: u8) -> Self {
        self.priority = p;
        self
    }
    /// Sets the body bytes (no content type).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
    /// Sets a JSON body and `content_type: application/json`.
    pub fn json<T: serde::Serialize>(mut self, value: &T) -> Result<Self, ClientError> {
        self.body = serde_json::to_vec(value)?;
        self.content_type = Some("application/json".into());
        Ok(self)
    }
    /// Makes it due at a Unix time in ms.
    pub fn run_at(mut self, unix_ms: i64) -> Self {
        self.run_at = Some(unix_ms);
        self
    }
    /// Makes it due this long after the scheduler accepts it.
    pub fn delay_ms(mut self, ms: i64) -> Self {
        self.delay_ms = Some(ms);
        self
    }
    /// Sets the retries after the first attempt.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = Some(n);
        self
    }
    /// Sets the time limit of one attempt.
    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = Some(ms);
        self
    }
    /// Sets the resource units the task occupies while it runs (`x-cost`).
    pub fn cost(mut self, units: u32) -> Self {
        self.cost = Some(units);
        self
    }
    /// Sets the expected run time (`x-estimate-ms`).
    pub fn estimate_ms(mut self, ms: u64) -> Self {
        self.estimate_ms = Some(ms);
        self
    }
    /// Sets the W3C `traceparent` header (`00-TRACEID-PARENTID-FLAGS`), so
    /// the handler's span joins the caller's trace on every attempt. A value
    /// that is not a valid `traceparent` is ignored: the task goes without.
    pub fn traceparent(self, value: impl AsRef<str>) -> Self {
        match crate::trace::TraceParent::parse(value.as_ref().trim()) {
            Some(tp) => self.header(crate::trace::H_TRACEPARENT, text(&tp.to_string())),
            None => self,
        }
    }
    /// Sets the W3C `tracestate` header carried with `traceparent`.
    pub fn tracestate(self, value: impl AsRef<str>) -> Self {
        self.header(crate::trace::H_TRACESTATE, text(value.as_ref()))
    }
    /// Adds a header; a name over 255 bytes fails [`to_message`](Self::to_message).
    pub fn header(mut self, name: &str, value: AMQPValue) -> Self {
        match header_name(name) {
            Ok(name) => {
                self.headers.insert(name, value);
            }
            Err(e) => {
                self.bad_header = Some(ProtocolError::BadHeaderName(e));
            }
        }
        self
    }

    fn is_delayed(&self) -> bool {
        self.run_at.is_some() || self.delay_ms.is_some()
    }

    /// The message as the contract describes it; returns the id too.
    pub fn to_message(&self) -> Result<(String, BasicProperties), ProtocolError> {
        if let Some(e) = &self.bad_header {
            return Err(e.clone());
        }
        validate_queue(&self.queue).map_err(ProtocolError::BadQueue)?;
        if self.name.is_empty() {
            return Err(ProtocolError::EmptyType);
        }
        let kind = short("type", &self.name).map_err(ProtocolError::BadName)?;
        let id = match &self.id {
            Some(id) => {
                validate_id(id)?;
                id.clone()
            }
            None => uuid::Uuid::now_v7().to_string(),
        };
        if let Some(cost) = self.cost {
            crate::contract::cost_in_range(i64::from(cost)).map_err(|reason| {
                ProtocolError::BadHeader {
                    name: H_COST,
                    reason,
                }
            })?;
        }
        let mut headers = self.headers.clone();
        let mut put = |k: &str, v: Option<i64>| {
            if let Some(v) = v {
                headers.insert(k.into(), AMQPValue::LongLongInt(v));
            }
        };
        put(H_RUN_AT, self.run_at);
        put(H_DELAY_MS, self.delay_ms);
        put(H_MAX_RETRIES, self.max_retries.map(i64::from));
        put(
            H_TIMEOUT_MS,
            self.timeout_ms
                .map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
        );
        put(H_COST, self.cost.map(i64::from));
        put(
            H_ESTIMATE_MS,
            self.estimate_ms
                .map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
        );
        let message_id =
            short("message_id", &id).map_err(|e| ProtocolError::BadId(e.to_string()))?;
        let mut props = BasicProperties::default()
            .with_type(kind)
            .with_message_id(message_id)
            .with_priority(self.priority.min(crate::contract::MAX_PRIORITY))
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(ct) = &self.content_type {
            let ct =
                short("content_type", ct).map_err(|e| ProtocolError::BadBody(e.to_string()))?;
            props = props.with_content_type(ct);
        }
        Ok((id, props))
    }
}

/// A connection with one confirming channel. Cheap operations take `&self`,
/// so one client can be shared across tasks (wrap it in an `Arc`).
pub struct Client {
    conn: Connection,
    sender: Enqueuer,
}

impl Client {
    /// Connects and declares the namespace's exchanges (idempotent). An
    /// `amqps://` URL uses the system's trust; see
    /// [`connect_to`](Self::connect_to) for a private CA or a client
    /// certificate.
    ///
    /// Each queue's order comes from `KAIROS_QUEUE_ORDER` in the
    /// environment and the kind of queue from `KAIROS_QUEUE_MODE`, as the
    /// scheduler's and workers' do (a bad value fails here, naming it); [`connect_with`](Self::connect_with) takes the
    /// orders from the caller instead.
    pub async fn connect(amqp_url: &str, namespace: &str) -> Result<Self, ClientError> {
        Self::connect_to(&crate::amqp::Broker::plain(amqp_url), namespace).await
    }

    /// [`connect`](Self::connect) with TLS settings.
    pub async fn connect_to(
        broker: &crate::amqp::Broker,
        namespace: &str,
    ) -> Result<Self, ClientError> {
        let orders = crate::order::QueueOrders::from_env().map_err(ClientError::Setting)?;
        let mode = crate::queue_mode::from_env().map_err(ClientError::Setting)?;
        Self::connect_with(
            broker,
            Names::new(namespace).with_orders(orders).with_mode(mode),
        )
        .await
    }

    /// [`connect_to`](Self::connect_to) with the namespace and each queue's
    /// order given: `Names::new(ns).with_orders("emails:fifo".parse()?)`.
    /// The orders must be the workers' (`KAIROS_QUEUE_ORDER`): they decide
    /// how a queue the client declares first is declared, and the priority
    /// sent to a `shortest-first` queue.
    pub async fn connect_with(
        broker: &crate::amqp::Broker,
        names: Names,
    ) -> Result<Self, ClientError> {
        crate::contract::validate_namespace(names.namespace()).map_err(ClientError::Namespace)?;
        let conn = crate::amqp::connect_to(broker, "kairos-client").await?;
        let sender = Enqueuer::open(&conn, names).await?;
        Ok(Client { conn, sender })
    }

    /// The AMQP names of the client's namespace.
    pub fn names(&self) -> &Names {
        self.sender.names()
    }

    /// The client's connection, e.g. to follow whether the broker blocks
    /// its publishing ([`crate::amqp::Blocked::watch`]).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The enqueueing half of the client, on its connection.
    pub fn enqueuer(&self) -> &Enqueuer {
        &self.sender
    }

    /// Enqueues one task and waits for the broker's confirm. Returns its id.
    pub async fn enqueue(&self, task: NewTask) -> Result<String, ClientError> {
        self.sender.enqueue(task).await
    }

    /// Enqueues many tasks with all their confirms outstanding at once,
    /// which is how a client reaches the broker's rate.
    pub async fn enqueue_many(&self, tasks: &[NewTask]) -> Result<Vec<String>, ClientError> {
        self.sender.enqueue_many(tasks).await
    }

    /// Closes the connection.
    pub async fn close(self) -> Result<(), ClientError> {
        self.conn.close(200, "bye".into()).await?;
        Ok(())
    }
}

/// Enqueues tasks on one confirming channel of a connection someone else
/// owns: what a [`Client`] does, without owning the connection. A worker
/// hands one to its handlers (on its own connection) so they can enqueue
/// follow-up tasks without a connection of their own.
pub struct Enqueuer {
    channel: Channel,
    names: Names,
    declared: topology::QueueCache,
}

impl Enqueuer {
    /// Opens a channel on `conn`, declares the namespace's exchanges
    /// (idempotent) and puts the channel in confirm mode. `names` must be
    /// of a checked namespace ([`crate::contract::validate_namespace`]).
    pub async fn open(conn: &Connection, names: Names) -> Result<Self, ClientError> {
        let channel = conn.create_channel().await?;
        topology::declare_base_checked(&channel, &names)
            .await
            .map_err(|e| match e {
                topology::BaseDeclareError::Amqp(e) => ClientError::Amqp(e),
                // The settings' fault: the message names KAIROS_QUEUE_MODE.
                e @ topology::BaseDeclareError::Mismatch(_) => ClientError::Setting(e.to_string()),
            })?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Enqueuer {
            channel,
            names,
            declared: topology::QueueCache::default(),
        })
    }

    /// The AMQP names of the namespace it enqueues into.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The channel it publishes on (for the owner of the connection to
    /// keep open as long as it is used).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Enqueues one task and waits for the broker's confirm. Returns its id.
    pub async fn enqueue(&self, task: NewTask) -> Result<String, ClientError> {
        let mut ids = self.enqueue_many(std::slice::from_ref(&task)).await?;
        Ok(ids.pop().unwrap_or_default())
    }

    /// Enqueues many tasks with all their confirms outstanding at once,
    /// which is how a client reaches the broker's rate.
    pub async fn enqueue_many(&self, tasks: &[NewTask]) -> Result<Vec<String>, ClientError> {
        let mut ids = Vec::with_capacity(tasks.len());
        let mut messages = Vec::with_capacity(tasks.len());
        for task in tasks {
            // Checked first: a queue name that cannot be declared is the
            // task's fault, reported as such.
            let (id, mut props) = task.to_message()?;
            // A `shortest-first` queue orders by the task's length, not by
            // the priority its publisher chose.
            let priority = self.names.orders().publish_priority(
                &task.queue,
                task.priority,
                task.cost.unwrap_or(1),
                task.estimate_ms,
            );
            if priority != task.priority.min(crate::contract::MAX_PRIORITY) {
                props = props.with_priority(priority);
            }
            let headers = props.headers().as_ref();
            crate::trace::step_of("kairos.enqueue", &id, &task.name, &task.queue, 1, headers);
            self.declared
                .ensure(&self.channel, &self.names, &task.queue)
                .await?;
            ids.push(id);
            messages.push((task, props, priority));
        }
        // All publishes are handed to lapin together: each resolves only
        // once lapin's I/O thread wrote it, so awaiting them one by one
        // would cost a thread hand-off per task.
        let mut keyed = Vec::with_capacity(messages.len());
        for (task, props, priority) in messages {
            // A ready task goes to its priority's band (quorum mode); a
            // delayed one to the fanout `NS.delay`, where the key only names
            // its queue for the scheduler, which routes it when due.
            let key = if task.is_delayed() {
                // `to_message` checked the queue name (at most 200 bytes).
                short("queue", &task.queue).map_err(|e| ProtocolError::BadQueue(e.to_string()))?
            } else {
                self.names.route(&task.queue, priority)?
            };
            keyed.push((task, props, key));
        }
        let publishes = keyed.into_iter().map(|(task, props, key)| {
            let exchange = if task.is_delayed() {
                self.names.short_delay()
            } else {
                self.names.short_tasks_exchange()
            };
            async move {
                self.channel
                    .basic_publish(
                        exchange,
                        key,
                        BasicPublishOptions {
                            mandatory: !task.is_delayed(),
                            ..BasicPublishOptions::default()
                        },
                        &task.body,
                        props,
                    )
                    .await
            }
        });
        let confirms = try_join_all(publishes).await?;
        for confirmation in try_join_all(confirms).await? {
            check(confirmation)?;
        }
        Ok(ids)
    }
}

/// Turns a publisher confirmation into a result.
pub fn check(confirmation: Confirmation) -> Result<(), ClientError> {
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(returned)) => {
            Err(ClientError::Unroutable(returned.reply_text.to_string()))
        }
        Confirmation::Nack(_) => Err(ClientError::Nacked),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Task;

    #[test]
    fn new_task_becomes_a_contract_message() {
        let t = NewTask::new("report.build")
            .queue("reports")
            .priority(12)
            .delay_ms(500)
            .max_retries(2)
            .timeout_ms(1000)
            .body(b"x".to_vec());
        let (id, props) = t.to_message().unwrap();
        let decoded = Task::decode("reports", &props, b"x").unwrap();
        assert_eq!(decoded.id, id);
        assert_eq!(decoded.name, "report.build");
        assert_eq!(decoded.priority, 9);
        assert_eq!(decoded.delay_ms, Some(500));
        assert_eq!(decoded.max_retries, Some(2));
        assert_eq!(decoded.timeout_ms, Some(1000));
        assert!(t.is_delayed());
    }

    #[test]
    fn bad_ids_are_refused_before_sending() {
        assert!(NewTask::new("x").id("").to_message().is_err());
    }

    #[test]
    fn names_too_long_for_amqp_are_errors_not_panics() {
        let long = "h".repeat(256);
        let err = NewTask::new("x")
            .header(&long, AMQPValue::Boolean(true))
            .to_message()
            .unwrap_err();
        assert!(err.to_string().contains("header name"), "{err}");
        assert!(NewTask::new(long.as_str()).to_message().is_err());
        assert!(NewTask::new("x").queue(&long).to_message().is_err());
        let mut t = NewTask::new("x");
        t.content_type = Some(long);
        assert!(t.to_message().is_err());
    }
}
