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
//!
//! May touch: Redis (through `crate::redis_io`), RabbitMQ, `crate::timing`.
//! Knows nothing of schedules: the schedule side hands occurrences to it.

pub mod hold;
pub mod intake;
pub mod publisher;
pub mod pump;
pub mod retry;
pub mod store;
pub mod wake;
