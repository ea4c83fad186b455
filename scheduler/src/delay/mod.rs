//! The delay queue: tasks that wait for a time, kept in sharded Redis sorted
//! sets and published to RabbitMQ when they fall due.
//!
//! * `store`: the Redis side (records, due index, claim/complete/release).
//! * `intake`: consumes `NS.delay` and `NS.retry` into the store.
//! * `retry`: the backoff policy and the retry-or-dead decision.
//! * `pump`: claims due tasks, publishes them with confirms, completes them.
//! * `publisher`: the confirming AMQP channel the pump and intake publish on.
//! * `hold`: delayed tasks from the HTTP API, straight into the store.
//! * `wake`: cross-instance wake-ups over Redis pub/sub.
//! * `ports`: the traits the pump and the intake reach the store, the
//!   broker and their deliveries through.
//! * `memory`: an in-memory store with the Redis store's semantics.
//! * `conformance`: checks every store must pass (tests and the
//!   `conformance` feature).
//!
//! May touch: Redis (through `crate::redis_io`), RabbitMQ, `crate::timing`.
//! Knows nothing of schedules: the schedule side hands occurrences to it.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
#[cfg(test)]
mod fakes;
pub(crate) mod hold;
pub(crate) mod intake;
pub mod memory;
pub mod ports;
pub(crate) mod publisher;
pub(crate) mod pump;
pub(crate) mod retry;
pub mod store;
pub mod wake;
