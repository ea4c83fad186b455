//! Firing on time: the pieces that make a publish leave within a
//! millisecond of its due time.
//!
//! * `redis_clock`: Redis's clock (every due time) mapped onto this host's
//!   monotonic clock.
//! * `precise_timer`: deadlines finer than tokio's millisecond timer wheel.
//! * `publish_thread`: a runtime of its own for timed publishes and the
//!   schedulers' heartbeat.
//!
//! Pure timing: touches neither Redis nor RabbitMQ itself.

pub(crate) mod precise_timer;
pub(crate) mod publish_thread;
pub(crate) mod redis_clock;
