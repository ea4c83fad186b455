//! The order in which a task queue hands out its tasks
//! (`KAIROS_QUEUE_ORDER`): `priority` (the default), `fifo` or
//! `shortest-first`.
//!
//! An order is a property of the queue on the broker, so everything that
//! declares `NS.q.QUEUE` or publishes to it must agree on it: schedulers,
//! workers, kairosctl and the Rust client all read the same setting.
//!
//! - `priority`: the queue is declared with `x-max-priority` 9 and tasks
//!   leave by their AMQP priority, then in arrival order.
//! - `fifo`: the queue is declared without `x-max-priority`, so RabbitMQ
//!   ignores the priority property: strict arrival order (and a cheaper
//!   queue: no sub-queue per priority level).
//! - `shortest-first`: declared like `priority`, but every Kairos publisher
//!   replaces the task's priority with [`shortest_first_priority`] of its
//!   `x-estimate-ms` (or, without one, its `x-cost`), so short tasks
//!   overtake long ones.

use crate::contract::{validate_queue, MAX_PRIORITY};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// The setting that names every queue's order.
pub const SETTING: &str = "KAIROS_QUEUE_ORDER";

/// How one task queue orders its tasks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum QueueOrder {
    /// Highest AMQP priority first (0 to 9), then arrival order.
    #[default]
    Priority,
    /// Arrival order; the priority property is ignored.
    Fifo,
    /// Shortest expected run first: the priority is derived from
    /// `x-estimate-ms`, else from `x-cost`.
    ShortestFirst,
}

impl QueueOrder {
    /// The name used in `KAIROS_QUEUE_ORDER`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueOrder::Priority => "priority",
            QueueOrder::Fifo => "fifo",
            QueueOrder::ShortestFirst => "shortest-first",
        }
    }

    /// Whether the queue is declared with `x-max-priority`.
    pub fn has_priorities(self) -> bool {
        self != QueueOrder::Fifo
    }
}

impl fmt::Display for QueueOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QueueOrder {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "priority" => Ok(QueueOrder::Priority),
            "fifo" => Ok(QueueOrder::Fifo),
            "shortest-first" => Ok(QueueOrder::ShortestFirst),
            other => Err(format!(
                "{:?} is not an order (use priority, fifo or shortest-first)",
                crate::short::preview(other)
            )),
        }
    }
}

/// The order of every queue: those named in `KAIROS_QUEUE_ORDER`, and
/// `priority` for the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueOrders {
    // A handful of entries at most: one lookup per publish is a hash of the
    // queue name, and none when the map is empty (the common case).
    by_queue: HashMap<String, QueueOrder>,
}

impl QueueOrders {
    /// The order of logical queue `queue`.
    pub fn of(&self, queue: &str) -> QueueOrder {
        if self.by_queue.is_empty() {
            return QueueOrder::Priority;
        }
        self.by_queue.get(queue).copied().unwrap_or_default()
    }

    /// Sets the order of one queue (for embedders building settings in
    /// code; `KAIROS_QUEUE_ORDER` is parsed with [`FromStr`]).
    pub fn set(mut self, queue: impl Into<String>, order: QueueOrder) -> Self {
        self.by_queue.insert(queue.into(), order);
        self
    }

    /// `KAIROS_QUEUE_ORDER` from the environment (every queue `priority`
    /// when it is unset); the error names the setting.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(SETTING) {
            Ok(value) => value.parse().map_err(|e| format!("{SETTING}: {e}")),
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(std::env::VarError::NotUnicode(_)) => Err(format!("{SETTING}: not UTF-8")),
        }
    }

    /// Whether every queue has the default order.
    pub fn is_empty(&self) -> bool {
        self.by_queue.is_empty()
    }

    /// The AMQP priority a Kairos publisher sends for a task of `queue`:
    /// `given` unless the queue is `shortest-first`, where the task's
    /// `cost` and `estimate_ms` decide ([`shortest_first_priority`]).
    pub fn publish_priority(
        &self,
        queue: &str,
        given: u8,
        cost: u32,
        estimate_ms: Option<u64>,
    ) -> u8 {
        match self.of(queue) {
            QueueOrder::ShortestFirst => shortest_first_priority(cost, estimate_ms),
            QueueOrder::Priority | QueueOrder::Fifo => given.min(MAX_PRIORITY),
        }
    }
}

impl fmt::Display for QueueOrders {
    /// The setting's form, queues sorted: `emails:fifo,reports:shortest-first`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut entries: Vec<_> = self.by_queue.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        for (i, (queue, order)) in entries.into_iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{queue}:{order}")?;
        }
        Ok(())
    }
}

impl FromStr for QueueOrders {
    type Err = String;

    /// `QUEUE:ORDER` pairs separated by commas (spaces around either are
    /// ignored; an empty value means every queue is `priority`). A bad
    /// order, a bad queue name or a queue named twice is an error: a typo
    /// must not silently leave a queue in the wrong order.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut by_queue = HashMap::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((queue, order)) = entry.rsplit_once(':') else {
                return Err(format!(
                    "{:?}: expected QUEUE:ORDER (e.g. emails:fifo)",
                    crate::short::preview(entry)
                ));
            };
            let (queue, order) = (queue.trim(), order.trim());
            validate_queue(queue)?;
            let order: QueueOrder = order.parse()?;
            if by_queue.insert(queue.to_string(), order).is_some() {
                return Err(format!(
                    "queue {:?} is named twice",
                    crate::short::preview(queue)
                ));
            }
        }
        Ok(QueueOrders { by_queue })
    }
}

/// The AMQP priority of a task on a `shortest-first` queue: from its
/// expected run time when it has one, else from its cost. Monotone: a
/// shorter estimate or a smaller cost never gets a lower priority.
///
/// | `x-estimate-ms`     | priority | `x-cost` |
/// |---------------------|----------|----------|
/// | 0 to 3              | 9        | 1 (or absent) |
/// | 4 to 15             | 8        | 2        |
/// | 16 to 63            | 7        | 3        |
/// | 64 to 255           | 6        | 4        |
/// | 256 to 1,023        | 5        | 5        |
/// | 1,024 to 4,095      | 4        | 6        |
/// | 4,096 to 16,383     | 3        | 7        |
/// | 16,384 to 65,535    | 2        | 8        |
/// | 65,536 to 262,143   | 1        | 9        |
/// | 262,144 and more    | 0        | 10 and more |
///
/// Estimates go in buckets of a factor 4 (two powers of two), so ten
/// levels span milliseconds to minutes; beyond about 4 minutes every task
/// is "long" alike.
pub fn shortest_first_priority(cost: u32, estimate_ms: Option<u64>) -> u8 {
    let level = match estimate_ms {
        // ilog2 of 0 is undefined: 0 ms is as short as it gets.
        Some(ms) => ms.max(1).ilog2() / 2,
        None => cost.max(1) - 1,
    };
    MAX_PRIORITY - u8::try_from(level.min(u32::from(MAX_PRIORITY))).unwrap_or(MAX_PRIORITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_parse_and_default_to_priority() {
        let o: QueueOrders = "emails:fifo, reports : shortest-first".parse().unwrap();
        assert_eq!(o.of("emails"), QueueOrder::Fifo);
        assert_eq!(o.of("reports"), QueueOrder::ShortestFirst);
        assert_eq!(o.of("default"), QueueOrder::Priority);
        assert_eq!(o.to_string(), "emails:fifo,reports:shortest-first");
        assert_eq!(o.to_string().parse::<QueueOrders>().unwrap(), o);
        let none: QueueOrders = "".parse().unwrap();
        assert!(none.is_empty());
        assert_eq!(none.of("x"), QueueOrder::Priority);
        // A queue name may hold a colon; the order is after the last one.
        let c: QueueOrders = "a:b:fifo".parse().unwrap();
        assert_eq!(c.of("a:b"), QueueOrder::Fifo);
        let p: QueueOrders = "x:priority".parse().unwrap();
        assert_eq!(p.of("x"), QueueOrder::Priority);
    }

    #[test]
    fn bad_orders_are_refused() {
        let err = "emails:lifo".parse::<QueueOrders>().unwrap_err();
        assert!(
            err.contains("lifo") && err.contains("shortest-first"),
            "{err}"
        );
        let err = "emails".parse::<QueueOrders>().unwrap_err();
        assert!(err.contains("QUEUE:ORDER"), "{err}");
        let err = "emails:fifo,emails:priority"
            .parse::<QueueOrders>()
            .unwrap_err();
        assert!(err.contains("twice"), "{err}");
        assert!(":fifo".parse::<QueueOrders>().is_err());
        let long = format!("{}:fifo", "q".repeat(201));
        assert!(long.parse::<QueueOrders>().is_err());
        assert!("a\u{7}b:fifo".parse::<QueueOrders>().is_err());
        assert!("emails:FIFO".parse::<QueueOrders>().is_err());
    }

    #[test]
    fn cost_maps_one_to_nine_down_to_zero() {
        let got: Vec<u8> = (1..=11).map(|c| shortest_first_priority(c, None)).collect();
        assert_eq!(got, vec![9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]);
        assert_eq!(shortest_first_priority(0, None), 9);
        assert_eq!(shortest_first_priority(u32::MAX, None), 0);
    }

    #[test]
    fn estimates_map_by_factor_four_buckets() {
        let cases = [
            (0, 9),
            (1, 9),
            (3, 9),
            (4, 8),
            (15, 8),
            (16, 7),
            (63, 7),
            (64, 6),
            (255, 6),
            (256, 5),
            (1_023, 5),
            (1_024, 4),
            (4_096, 3),
            (16_384, 2),
            (65_536, 1),
            (262_143, 1),
            (262_144, 0),
            (u64::MAX, 0),
        ];
        for (ms, want) in cases {
            assert_eq!(shortest_first_priority(1, Some(ms)), want, "{ms} ms");
        }
        // The estimate wins over the cost.
        assert_eq!(shortest_first_priority(10, Some(1)), 9);
    }

    #[test]
    fn the_mapping_is_monotone() {
        let mut last = MAX_PRIORITY;
        for shift in 0..64 {
            for ms in [(1u64 << shift) - 1, 1u64 << shift] {
                let p = shortest_first_priority(1, Some(ms));
                assert!(p <= last, "{ms} ms got {p} after {last}");
                last = p;
            }
        }
        let mut last = MAX_PRIORITY;
        for cost in 1..100 {
            let p = shortest_first_priority(cost, None);
            assert!(p <= last);
            last = p;
        }
    }

    #[test]
    fn only_shortest_first_replaces_the_priority() {
        let o: QueueOrders = "f:fifo,s:shortest-first".parse().unwrap();
        assert_eq!(o.publish_priority("p", 3, 5, Some(1)), 3);
        assert_eq!(o.publish_priority("f", 7, 5, None), 7);
        assert_eq!(o.publish_priority("s", 0, 1, None), 9);
        assert_eq!(o.publish_priority("s", 9, 4, None), 6);
        assert_eq!(o.publish_priority("s", 9, 4, Some(5_000)), 3);
        assert_eq!(o.publish_priority("p", 200, 1, None), 9);
    }
}
