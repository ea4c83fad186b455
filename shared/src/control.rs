//! The control exchange `NS.control`: what the HTTP API tells every worker
//! at once (abort a running task, pause or resume a queue).
//!
//! `NS.control` is a durable fanout exchange; each worker binds a queue of
//! its own (server-named, exclusive, auto-delete), so every message reaches
//! every worker connected at that moment. A message is a small JSON object:
//!
//! * `{"op":"abort","id":"..."}`: the worker running task `id` cancels it;
//! * `{"op":"pause","queue":"..."}` / `{"op":"resume","queue":"..."}`: the
//!   workers stop or start again taking from `NS.q.QUEUE`.
//!
//! Messages are not the record of a pause: the set `NS:paused` in Redis
//! is ([`paused_key`]). The API changes it before publishing, and workers
//! read it at start and every few seconds, so a worker that missed a
//! message (it was reconnecting, or started later) converges.

use crate::contract::Names;
use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use serde::{Deserialize, Serialize};

/// One control message, as it goes over `NS.control`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ControlMessage {
    /// Cancel the running attempt of task `id`, wherever it runs.
    Abort {
        /// The task id.
        id: String,
    },
    /// Stop taking tasks from logical queue `queue`.
    Pause {
        /// The logical queue.
        queue: String,
    },
    /// Take tasks from `queue` again.
    Resume {
        /// The logical queue.
        queue: String,
    },
}

impl ControlMessage {
    /// The message as JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        // A plain enum of strings always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a message; an unknown `op`, a missing field or anything not
    /// JSON is an error saying why (workers log it and drop the message).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a control message: {e}"))
    }
}

/// `NS.control`, the fanout exchange of control messages.
pub fn exchange(names: &Names) -> String {
    format!("{}.control", names.namespace())
}

/// [`exchange`] for AMQP (a checked namespace always fits; an unchecked one
/// too long gives an empty name, which the broker refuses).
pub fn short_exchange(names: &Names) -> ShortString {
    ShortString::try_new(exchange(names)).unwrap_or_default()
}

/// `NS:paused`: the Redis set of paused logical queues.
pub fn paused_key(names: &Names) -> String {
    format!("{}:paused", names.namespace())
}

/// Publishes `message` to `NS.control` and returns the broker's
/// confirmation (on a channel in confirm mode: an ack, or a nack when the
/// broker refused it). With no worker bound the message is dropped, which
/// is no error (the state in Redis is what counts).
pub async fn publish(
    channel: &Channel,
    names: &Names,
    message: &ControlMessage,
) -> lapin::Result<Confirmation> {
    channel
        .basic_publish(
            short_exchange(names),
            "".into(),
            BasicPublishOptions::default(),
            &message.encode(),
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await?
        .await
}

/// Declares a server-named queue, exclusive to `channel`'s connection and
/// deleted with it, bound to `NS.control`. Returns its name, to consume
/// from.
pub async fn listen(channel: &Channel, names: &Names) -> lapin::Result<ShortString> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            short_exchange(names),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(queue.name().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_the_contract_shows() {
        let cases = [
            (
                ControlMessage::Abort { id: "t-1".into() },
                r#"{"op":"abort","id":"t-1"}"#,
            ),
            (
                ControlMessage::Pause {
                    queue: "mail".into(),
                },
                r#"{"op":"pause","queue":"mail"}"#,
            ),
            (
                ControlMessage::Resume {
                    queue: "mail".into(),
                },
                r#"{"op":"resume","queue":"mail"}"#,
            ),
        ];
        for (message, json) in cases {
            assert_eq!(String::from_utf8(message.encode()).unwrap(), json);
            assert_eq!(ControlMessage::decode(json.as_bytes()).unwrap(), message);
        }
    }

    #[test]
    fn unknown_or_malformed_messages_are_errors() {
        for bad in [
            &b"not json"[..],
            br#"{"op":"explode","id":"x"}"#,
            br#"{"op":"abort"}"#,
            br#"{"op":"pause","queue":"a","extra":1}"#,
            br#"{"id":"x"}"#,
            b"",
        ] {
            assert!(ControlMessage::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        let n = Names::new("kx");
        assert_eq!(exchange(&n), "kx.control");
        assert_eq!(paused_key(&n), "kx:paused");
    }
}
