//! The kind of queue Kairos declares (`KAIROS_QUEUE_MODE`): `classic`
//! (the default) or `quorum`, and the priority bands quorum mode uses.
//!
//! - `classic`: every queue is a classic queue; a task queue `NS.q.QUEUE`
//!   has `x-max-priority` 9 (unless its order is `fifo`), so RabbitMQ
//!   itself hands out the highest priority first. A classic queue lives on
//!   one node of a cluster.
//! - `quorum`: every durable queue is a quorum queue, replicated on a
//!   majority of the cluster's nodes, with `x-delivery-limit`
//!   ([`DELIVERY_LIMIT`]) and a dead-letter exchange, so a message that
//!   kills its consumer every time cannot loop for ever. Quorum queues
//!   before RabbitMQ 4 have no `x-max-priority`, so a logical queue whose
//!   order has priorities becomes three queues, one per [`Band`]: publishers
//!   route each task to the band of its priority and workers take the
//!   highest band first, without starving the lower ones.
//!
//! Like the order, the mode is a property of the queues on the broker:
//! every scheduler, worker and client of a namespace must be given the
//! same value. It travels in [`crate::contract::Names`].

use std::fmt;
use std::str::FromStr;

/// The setting that chooses the mode.
pub const SETTING: &str = "KAIROS_QUEUE_MODE";

/// `x-delivery-limit` of every quorum queue Kairos declares: after this
/// many deliveries that ended without an ack (the consumer died, lost its
/// connection or returned the message), RabbitMQ dead-letters the message
/// instead of delivering it again. 20 is RabbitMQ 4's default. An operator
/// who wants another limit sets a policy (`delivery-limit`); the lower of
/// the two applies.
pub const DELIVERY_LIMIT: i32 = 20;

/// `KAIROS_QUEUE_MODE` from the environment (classic when unset); the
/// error names the setting. For clients that read no other settings.
pub fn from_env() -> Result<QueueMode, String> {
    match std::env::var(SETTING) {
        Ok(value) => value.parse().map_err(|e| format!("{SETTING}: {e}")),
        Err(std::env::VarError::NotPresent) => Ok(QueueMode::default()),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{SETTING}: not UTF-8")),
    }
}

/// Which kind of queue Kairos declares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum QueueMode {
    /// Classic queues with `x-max-priority`.
    #[default]
    Classic,
    /// Replicated quorum queues, priorities by band.
    Quorum,
}

impl QueueMode {
    /// The name used in `KAIROS_QUEUE_MODE`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueMode::Classic => "classic",
            QueueMode::Quorum => "quorum",
        }
    }
}

impl fmt::Display for QueueMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QueueMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "classic" => Ok(QueueMode::Classic),
            "quorum" => Ok(QueueMode::Quorum),
            other => Err(format!(
                "{:?} is not a queue mode (use classic or quorum)",
                crate::short::preview(other)
            )),
        }
    }
}

/// One of the three priority bands of a quorum-mode task queue. Band 0
/// is the logical queue's own `NS.q.QUEUE`, bound with key `QUEUE`, so a
/// client that publishes to `NS.tasks` with key `QUEUE` reaches it in
/// either mode (its priority then counts as band 0's; see
/// [`Band::suffix`] for the keys that reach the higher bands).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Band(u8);

impl Band {
    /// Priorities 0 to 3 (and tasks without a priority).
    pub const LOW: Band = Band(0);
    /// Priorities 4 to 6.
    pub const MIDDLE: Band = Band(1);
    /// Priorities 7 to 9.
    pub const HIGH: Band = Band(2);
    /// Every band, highest first: the order a worker prefers.
    pub const HIGHEST_FIRST: [Band; 3] = [Band::HIGH, Band::MIDDLE, Band::LOW];

    /// The band of an AMQP priority (above 9 counts as 9).
    pub fn of_priority(priority: u8) -> Band {
        match priority {
            0..=3 => Band::LOW,
            4..=6 => Band::MIDDLE,
            _ => Band::HIGH,
        }
    }

    /// 0 (low) to 2 (high).
    pub fn index(self) -> u8 {
        self.0
    }

    /// The lowest priority of the band (0, 4 or 7).
    pub fn first_priority(self) -> u8 {
        [0, 4, 7][usize::from(self.0.min(2))]
    }

    /// What the band adds to the logical name, in its queue name
    /// (`NS.q.QUEUE.p7`) and in its routing key (`QUEUE.p7`): nothing for
    /// the low band, `.p4` and `.p7` (its lowest priority) for the others.
    /// Three bytes, so the longest logical name (200) in the longest
    /// namespace (48) still makes a queue name of at most 255.
    pub fn suffix(self) -> &'static str {
        ["", ".p4", ".p7"][usize::from(self.0.min(2))]
    }

    /// A short label for logs and metrics: `low`, `middle`, `high`.
    pub fn label(self) -> &'static str {
        ["low", "middle", "high"][usize::from(self.0.min(2))]
    }
}

/// Whether `logical` ends like a band's routing key (`.p4`, `.p7`): in
/// quorum mode such a logical queue would share its queue with another's
/// band, so it is refused.
pub fn is_band_name(logical: &str) -> bool {
    Band::HIGHEST_FIRST
        .iter()
        .filter(|b| !b.suffix().is_empty())
        .any(|b| logical.ends_with(b.suffix()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_strictly() {
        assert_eq!("classic".parse::<QueueMode>(), Ok(QueueMode::Classic));
        assert_eq!(" quorum ".parse::<QueueMode>(), Ok(QueueMode::Quorum));
        let err = "Quorum".parse::<QueueMode>().unwrap_err();
        assert!(err.contains("classic or quorum"), "{err}");
        assert!("".parse::<QueueMode>().is_err());
        assert_eq!(QueueMode::default(), QueueMode::Classic);
        assert_eq!(QueueMode::Quorum.to_string(), "quorum");
    }

    #[test]
    fn priorities_fall_in_three_bands() {
        let bands: Vec<u8> = (0..=12).map(|p| Band::of_priority(p).index()).collect();
        assert_eq!(bands, vec![0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]);
        for band in Band::HIGHEST_FIRST {
            assert_eq!(Band::of_priority(band.first_priority()), band);
        }
        assert!(Band::HIGH > Band::MIDDLE && Band::MIDDLE > Band::LOW);
    }

    #[test]
    fn band_names_are_reserved() {
        assert!(is_band_name("emails.p4"));
        assert!(is_band_name("emails.p7"));
        assert!(!is_band_name("emails"));
        assert!(!is_band_name("emails.p5"));
        assert!(!is_band_name("p7"));
        assert_eq!(Band::LOW.suffix(), "");
        assert_eq!(Band::HIGH.suffix(), ".p7");
    }
}
