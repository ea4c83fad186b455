//! Declares the contract's AMQP names (with `NS.control`, see
//! [`crate::control`]). Every Kairos process declares all of
//! them (durable) at start, so a client that only publishes never hits a
//! missing exchange, and a retry published before any scheduler ever ran
//! still has a queue to wait in.

use crate::contract::{text, Names, MAX_PRIORITY};
use crate::queue_mode::QueueMode;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// Exchanges (`NS.control` among them), the dead-letter queue, and the
/// scheduler's intake queues.
///
/// When a queue exists as the other kind (declared in the other
/// `KAIROS_QUEUE_MODE`), the broker closes the channel with
/// PRECONDITION_FAILED: this logs the [`ModeMismatch`] that says what to do
/// and returns the broker's error, so every process (whose errors are
/// AMQP errors) names the setting in its log. A caller that reports the
/// error itself uses [`declare_base_checked`].
pub async fn declare_base(channel: &Channel, names: &Names) -> lapin::Result<()> {
    declare_base_checked(channel, names)
        .await
        .map_err(|e| match e {
            BaseDeclareError::Amqp(e) => e,
            BaseDeclareError::Mismatch(m) => {
                tracing::error!(cause = %m, "cannot declare the namespace's queues");
                m.source
            }
        })
}

/// Why [`declare_base_checked`] failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BaseDeclareError {
    /// The channel or its connection failed.
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// An intake queue or `NS.dead` exists as the other kind of queue.
    #[error("{0}")]
    Mismatch(Box<ModeMismatch>),
}

/// `NS.delay`, `NS.retry` or `NS.dead` exists with other arguments than
/// `KAIROS_QUEUE_MODE` declares: nearly always the namespace was started in
/// the other mode (a classic queue cannot become a quorum queue in place).
#[derive(Clone, Debug, thiserror::Error)]
#[error(
    "queue {queue} exists with other arguments than {setting}={mode} declares (the broker \
     says: {detail}); the namespace's queues were declared in the other mode. Either set \
     {setting} to the mode they were declared in (the same in every scheduler, worker and \
     client), or move the namespace: stop every Kairos process, drain and delete its queues \
     (rabbitmqctl delete_queue {queue}, and the other NS.* queues) and start again",
    setting = crate::queue_mode::SETTING,
    mode = mode.as_str()
)]
pub struct ModeMismatch {
    /// The queue that exists otherwise.
    pub queue: String,
    /// The mode the settings give.
    pub mode: QueueMode,
    /// The broker's reply text.
    pub detail: String,
    /// The error as lapin reported it (the channel is closed).
    pub source: lapin::Error,
}

/// [`declare_base`], with a queue of the other mode reported as a
/// [`ModeMismatch`].
pub async fn declare_base_checked(
    channel: &Channel,
    names: &Names,
) -> Result<(), BaseDeclareError> {
    let exchanges = [
        (names.short_tasks_exchange(), ExchangeKind::Direct),
        (names.short_delay(), ExchangeKind::Fanout),
        (names.short_retry(), ExchangeKind::Fanout),
        (names.short_dead(), ExchangeKind::Fanout),
        (names.short_events(), ExchangeKind::Topic),
        (crate::control::short_exchange(names), ExchangeKind::Fanout),
    ];
    for (name, kind) in exchanges {
        channel
            .exchange_declare(name, kind, durable_exchange(), FieldTable::default())
            .await?;
    }
    // The scheduler's intake queues share their exchange's name, as the
    // contract does for `NS.dead`.
    for name in [names.short_delay(), names.short_retry(), names.short_dead()] {
        let declared = channel
            .queue_declare(
                name.clone(),
                QueueDeclareOptions::durable(),
                base_queue_arguments(names, name.as_str()),
            )
            .await;
        if let Err(source) = declared {
            return Err(match inequivalent(&source) {
                Some(detail) => BaseDeclareError::Mismatch(Box::new(ModeMismatch {
                    queue: name.to_string(),
                    mode: names.mode(),
                    detail,
                    source,
                })),
                None => BaseDeclareError::Amqp(source),
            });
        }
        channel
            .queue_bind(
                name.clone(),
                name,
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// The arguments of task queue `logical`, exactly as the contract states
/// them for the queue's order ([`Names::orders`]) and mode
/// ([`Names::mode`]).
///
/// - classic: `x-max-priority` 9 unless the order is `fifo`, and the
///   dead-letter exchange;
/// - quorum (every band alike): `x-queue-type` quorum, `x-delivery-limit`,
///   the dead-letter exchange, and at-least-once dead-lettering (which
///   RabbitMQ allows only with `x-overflow` reject-publish): a rejected
///   task stays in its queue until `NS.retry` has it.
///
/// Integers go out as signed 32-bit, the type pika and most clients use,
/// so a queue another client declared first is equivalent.
pub(crate) fn task_queue_arguments(names: &Names, logical: &str) -> FieldTable {
    let mut args = FieldTable::default();
    match names.mode() {
        QueueMode::Classic => {
            if names.orders().of(logical).has_priorities() {
                args.insert(
                    "x-max-priority".into(),
                    AMQPValue::LongInt(i32::from(MAX_PRIORITY)),
                );
            }
        }
        QueueMode::Quorum => quorum_arguments(&mut args),
    }
    args.insert("x-dead-letter-exchange".into(), text(&names.retry()));
    args
}

/// The arguments every quorum queue Kairos declares carries; the caller
/// adds its dead-letter exchange.
fn quorum_arguments(args: &mut FieldTable) {
    args.insert("x-queue-type".into(), text("quorum"));
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(crate::queue_mode::DELIVERY_LIMIT),
    );
    args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    args.insert("x-overflow".into(), text("reject-publish"));
}

/// The arguments of the scheduler's intake queues (`NS.delay`, `NS.retry`)
/// and of `NS.dead`: none in classic mode; in quorum mode a quorum queue,
/// and for the intake queues a delivery limit whose dead letters go to
/// `NS.dead`, so a message that kills the scheduler every time it is read
/// ends there instead of looping.
pub(crate) fn base_queue_arguments(names: &Names, queue: &str) -> FieldTable {
    let mut args = FieldTable::default();
    if names.mode() == QueueMode::Quorum {
        if queue == names.dead() {
            args.insert("x-queue-type".into(), text("quorum"));
        } else {
            quorum_arguments(&mut args);
            args.insert("x-dead-letter-exchange".into(), text(&names.dead()));
        }
    }
    args
}

/// Why a task queue could not be declared.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DeclareError {
    /// The channel or its connection failed: not a fault of the task.
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// The logical name cannot make `NS.q.QUEUE` (too long, control
    /// characters): a fault of the task, not of the connection.
    #[error("{0}")]
    BadName(#[from] crate::contract::ProtocolError),
    /// The queue exists with other arguments than its order asks for
    /// (`x-max-priority` cannot change): a fault of the settings, and the
    /// broker closed the channel. Boxed: it is rare, and keeps the error
    /// small on the publish path.
    #[error("{0}")]
    Inequivalent(Box<QueueMismatch>),
}

/// A task queue that exists with other arguments than its order
/// (`KAIROS_QUEUE_ORDER`) declares: what the operator sees, and the way out.
#[derive(Clone, Debug, thiserror::Error)]
#[error(
    "queue {queue} exists with other arguments than order {order:?} ({setting}) in mode \
     {mode:?} ({mode_setting}) declare (the broker says: {detail}); either set {setting} and \
     {mode_setting} to the queue's present order and mode (the same in every scheduler, \
     worker and client), or stop its publishers, drain the queue, delete it (rabbitmqctl \
     delete_queue {queue}) and start again to declare it anew",
    setting = crate::order::SETTING,
    mode_setting = crate::queue_mode::SETTING,
    order = order.as_str(),
    mode = mode.as_str()
)]
pub struct QueueMismatch {
    /// `NS.q.QUEUE`.
    pub queue: String,
    /// The order the settings give the queue.
    pub order: crate::order::QueueOrder,
    /// The mode the settings give the queue.
    pub mode: QueueMode,
    /// The broker's reply text.
    pub detail: String,
    /// The error as lapin reported it (the channel is closed).
    pub source: lapin::Error,
}

impl DeclareError {
    /// The error of the channel or connection, when it is one (an
    /// inequivalent queue closed the channel too).
    pub fn amqp(&self) -> Option<&lapin::Error> {
        match self {
            DeclareError::Amqp(e) => Some(e),
            DeclareError::Inequivalent(m) => Some(&m.source),
            DeclareError::BadName(_) => None,
        }
    }
}

/// The broker's reply text when `err` is its answer to a declare with
/// arguments that differ from the queue's (PRECONDITION_FAILED, "inequivalent
/// arg").
fn inequivalent(err: &lapin::Error) -> Option<String> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if amqp.get_id() == PRECONDITION_FAILED
                && amqp.get_message().as_str().contains("inequivalent arg") =>
        {
            Some(amqp.get_message().to_string())
        }
        _ => None,
    }
}

/// The AMQP reply code of a declare whose arguments differ from the queue's.
const PRECONDITION_FAILED: u16 = 406;

/// `NS.q.QUEUE`, bound to `NS.tasks` with key `QUEUE`; in quorum mode with
/// priority bands, also `NS.q.QUEUE.p4` and `NS.q.QUEUE.p7`, bound with keys
/// `QUEUE.p4` and `QUEUE.p7` ([`Names::bands`]).
pub async fn declare_task_queue(
    channel: &Channel,
    names: &Names,
    logical: &str,
) -> Result<(), DeclareError> {
    for band in names.bands(logical) {
        let queue = names.band_queue(logical, *band)?;
        // `band_queue` checked the logical name is at most 200 bytes.
        let key = crate::short::short("routing key", &format!("{logical}{}", band.suffix()))
            .map_err(|e| crate::contract::ProtocolError::BadQueue(e.to_string()))?;
        let declared = channel
            .queue_declare(
                queue.clone(),
                QueueDeclareOptions::durable(),
                task_queue_arguments(names, logical),
            )
            .await;
        if let Err(source) = declared {
            return Err(match inequivalent(&source) {
                Some(detail) => DeclareError::Inequivalent(Box::new(QueueMismatch {
                    queue: queue.to_string(),
                    order: names.orders().of(logical),
                    mode: names.mode(),
                    detail,
                    source,
                })),
                None => DeclareError::Amqp(source),
            });
        }
        channel
            .queue_bind(
                queue,
                names.short_tasks_exchange(),
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Task queues already declared on one connection, so that publishers
/// declare `NS.q.QUEUE` before the first task for it and only once: a task
/// for a queue no worker has declared yet then waits in RabbitMQ instead of
/// being dropped.
#[derive(Default)]
pub struct QueueCache {
    declared: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl QueueCache {
    /// Declares `NS.q.QUEUE` on `channel` unless this cache saw it declared
    /// already. A failed declare is not remembered, so the next call tries
    /// again.
    pub async fn ensure(
        &self,
        channel: &Channel,
        names: &Names,
        queue: &str,
    ) -> Result<(), DeclareError> {
        let known = self
            .declared
            .lock()
            .map(|set| set.contains(queue))
            .unwrap_or(false);
        if !known {
            declare_task_queue(channel, names, queue).await?;
            if let Ok(mut set) = self.declared.lock() {
                set.insert(queue.to_string());
            }
        }
        Ok(())
    }

    /// Forgets a queue (it came back unroutable: deleted by an operator),
    /// so the next publish declares it again.
    pub fn forget(&self, queue: &str) {
        if let Ok(mut set) = self.declared.lock() {
            set.remove(queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fifo_queues_lack_priorities() {
        let names = Names::new("kx").with_orders(
            "f:fifo,s:shortest-first,p:priority"
                .parse()
                .expect("orders"),
        );
        let priority = |q: &str| {
            task_queue_arguments(&names, q)
                .inner()
                .get("x-max-priority")
                .cloned()
        };
        assert_eq!(priority("f"), None);
        assert_eq!(priority("s"), Some(AMQPValue::LongInt(9)));
        assert_eq!(priority("p"), Some(AMQPValue::LongInt(9)));
        assert_eq!(priority("other"), Some(AMQPValue::LongInt(9)));
        for q in ["f", "s", "other"] {
            assert_eq!(
                task_queue_arguments(&names, q)
                    .inner()
                    .get("x-dead-letter-exchange"),
                Some(&text("kx.retry"))
            );
        }
    }
}
