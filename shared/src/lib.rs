//! # Kairos shared crate
//!
//! The floor every Kairos process stands on; it knows no scheduler or worker.
//!
//! * `contract`: AMQP names, headers, and decoding a delivery into a [`contract::Task`].
//! * `record`: the stored form of a task in the Redis delay queue.
//! * `config`: settings shared by every process (env vars and flags).
//! * `topology`: declaring the contract's exchanges and queues.
//! * `order`: each task queue's order (`KAIROS_QUEUE_ORDER`: priority,
//!   fifo, shortest-first) and the priority a `shortest-first` queue gets.
//! * `amqp`: connecting with retry, reconnect pacing.
//! * `tls`: trust and identity for `amqps://` and `rediss://`.
//! * `events`: lifecycle events on `NS.events`.
//! * `metrics`: the optional Prometheus exporter.
//! * `redis`: the Redis client, pool and kept connection, and the shard of
//!   a task id.
//! * `status`: every task's status in Redis (writer, store, settings).
//! * `client`: the Rust client for enqueueing.
//! * `template`: a task as a user describes it (HTTP API, schedules,
//!   kairosctl), its check and its conversion to a [`client::NewTask`].
//! * `request`: `POST /v1/tasks` bodies, parsed into a [`client::NewTask`].
//! * `dead`: list, replay and purge dead letters.
//! * `short`: AMQP short strings (names, keys, header names) without panics.
//! * `supervise`: background loops restarted when they fail, with their
//!   health for `/readyz`.
//! * `secrets`: redacting URLs, secret settings and `*_FILE` variants.
//! * `trace`: W3C `traceparent`/`tracestate` on tasks, and the logging
//!   and OpenTelemetry set-up of every binary.
//! * `admin`: queue depth, listening to events, and removing a namespace
//!   (the tests and the benchmark clean up with it).

// Every public item is documented, and nothing is public that no other
// crate can reach (issue 15).
#![warn(missing_docs, unreachable_pub)]

pub mod admin;
pub mod amqp;
pub mod client;
pub mod config;
pub mod contract;
pub mod control;
pub mod dead;
pub mod events;
pub mod limits;
pub mod metrics;
pub mod order;
pub mod queue_mode;
pub mod record;
pub mod redis;
pub mod redis_slots;
pub mod request;
pub mod secrets;
pub mod short;
pub mod shutdown;
pub mod status;
pub mod supervise;
pub mod template;
pub mod tls;
pub mod topology;
pub mod trace;
pub mod trace_init;

pub use lapin;
