//! # Kairos shared crate
//!
//! The floor every Kairos process stands on; it knows no scheduler or worker.
//!
//! * `contract`: AMQP names, headers, and decoding a delivery into a [`contract::Task`].
//! * `record`: the stored form of a task in the Redis delay queue.
//! * `config`: settings shared by every process (env vars and flags).
//! * `topology`: declaring the contract's exchanges and queues.
//! * `amqp`: connecting with retry, reconnect pacing.
//! * `events`: lifecycle events on `NS.events`.
//! * `metrics`: the optional Prometheus exporter.
//! * `client`: the Rust client for enqueueing.
//! * `request`: a task described in JSON (HTTP API, kairosctl).
//! * `dead`: list, replay and purge dead letters.

pub mod amqp;
pub mod client;
pub mod config;
pub mod contract;
pub mod dead;
pub mod events;
pub mod limits;
pub mod metrics;
pub mod record;
pub mod request;
pub mod shutdown;
pub mod topology;

pub use lapin;
