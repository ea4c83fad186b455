//! The wire contract (docs/CONTRACT.md): names, headers, and the mapping
//! between an AMQP message and a [`Task`].
//!
//! Decoding is strict where the contract is strict (a task needs a `type`, an
//! id is 1 to 128 printable ASCII characters, integer headers must be
//! integers) and lenient where it says so (any AMQP integer width, decimal
//! strings, priorities above 9 count as 9). Every rejection is a
//! [`ProtocolError`] whose text becomes the dead letter's `x-error`.

use crate::short::{header_name, short, TooLong};
use crate::template::TemplateError;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
// From the patched parser (vendor/README.md): these names exist only there,
// so building against the unpatched crate fails here rather than quietly
// bringing back the poison frames.
use lapin::types::parsing::{MAX_NESTING, NESTED_TOO_DEEP_KEY};
use lapin::BasicProperties;
use thiserror::Error;

/// Header: when the task falls due, Unix epoch milliseconds.
pub const H_RUN_AT: &str = "x-run-at";
/// Header: due this many milliseconds after the scheduler accepts it.
pub const H_DELAY_MS: &str = "x-delay-ms";
/// Header: retries after the first attempt.
pub const H_MAX_RETRIES: &str = "x-max-retries";
/// Header: time limit of one attempt, in milliseconds.
pub const H_TIMEOUT_MS: &str = "x-timeout-ms";
/// Header: this delivery's attempt number, 1 for the first (set by Kairos).
pub const H_ATTEMPT: &str = "x-attempt";
/// Dead-letter header: why the task failed.
pub const H_ERROR: &str = "x-error";
/// Dead-letter header: when it failed, Unix ms.
pub const H_FAILED_AT: &str = "x-failed-at";
/// Dead-letter header: the logical queue the task was meant for.
pub const H_ORIGIN_QUEUE: &str = "x-origin-queue";
/// Header set on tasks fired by a schedule.
pub const H_SCHEDULE_ID: &str = "x-schedule-id";
/// Retry header: how long to wait before the next attempt, in milliseconds,
/// instead of the computed backoff (set by a handler's Retry-After).
pub const H_RETRY_AFTER_MS: &str = "x-retry-after-ms";
/// Header: the resource units a task occupies while it runs (1 when
/// absent); a worker runs it only when that many of its `KAIROS_CAPACITY`
/// units are free.
pub const H_COST: &str = "x-cost";
/// Header: how long the task is expected to run, in milliseconds; a
/// `shortest-first` queue derives the priority from it.
pub const H_ESTIMATE_MS: &str = "x-estimate-ms";

/// Highest priority the contract knows; queues are declared with it.
pub const MAX_PRIORITY: u8 = 9;
/// Longest task id the contract allows.
pub const MAX_ID_LEN: usize = 128;
/// Longest namespace, in bytes. Every AMQP name is derived from it: the
/// longest, `NS.q.QUEUE`, is then at most 48 + 3 + 200 = 251 bytes, inside
/// AMQP's 255; `NS.schedules.outcomes` is 69.
pub const MAX_NAMESPACE_LEN: usize = 48;
/// Longest logical queue name (the routing key on `NS.tasks`), in bytes.
pub const MAX_QUEUE_LEN: usize = 200;
/// Most retries a task may ask for with `x-max-retries`. With the default
/// backoff (capped at an hour) 1,000 retries already span six weeks; more
/// is a bug in the client, not a retry policy.
pub const MAX_RETRIES_CAP: u32 = 1_000;
/// Most resource units one task may declare with `x-cost`. Far above any
/// real worker's capacity: the bound only keeps the arithmetic of the
/// units in range.
pub const MAX_COST: u32 = 1_000_000;
/// Prefix of the ids Kairos derives for messages without `message_id`.
pub const DERIVED_ID_PREFIX: &str = "h-";

/// Checks a namespace: 1 to [`MAX_NAMESPACE_LEN`] bytes of letters, digits
/// and `- _ . :` (it is part of AMQP names and Redis keys).
pub fn validate_namespace(ns: &str) -> Result<(), String> {
    if ns.is_empty() || ns.len() > MAX_NAMESPACE_LEN {
        return Err(format!(
            "must be 1 to {MAX_NAMESPACE_LEN} characters (got {}), so that every AMQP name derived from it (`NS.q.QUEUE`) fits 255 bytes",
            ns.len()
        ));
    }
    if let Some(c) = ns
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!(
            "character {c:?} is not allowed (use letters, digits, - _ . :)"
        ));
    }
    Ok(())
}

/// Checks a logical queue name: 1 to [`MAX_QUEUE_LEN`] bytes, no control
/// characters.
pub fn validate_queue(queue: &str) -> Result<(), String> {
    if queue.is_empty() || queue.len() > MAX_QUEUE_LEN {
        return Err(format!(
            "queue name {:?} is {} bytes; it must be 1 to {MAX_QUEUE_LEN}",
            crate::short::preview(queue),
            queue.len()
        ));
    }
    if queue.chars().any(char::is_control) {
        return Err(format!(
            "queue name {:?} contains a control character",
            crate::short::preview(queue)
        ));
    }
    Ok(())
}

/// Every AMQP name of one namespace, as text (`tasks_exchange()`...) and
/// as the short strings lapin takes (`short_tasks_exchange()`...,
/// [`queue_name`](Self::queue_name)). The processes check the namespace
/// at start ([`validate_namespace`]), so the fixed names always fit.
///
/// The names also carry each task queue's order (`KAIROS_QUEUE_ORDER`,
/// [`crate::order`]): every declarer and publisher of `NS.q.QUEUE` already
/// holds them, so the order reaches all of them the same way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    ns: String,
    orders: std::sync::Arc<crate::order::QueueOrders>,
    mode: crate::queue_mode::QueueMode,
}

impl Names {
    /// The names of `namespace` (checked by [`validate_namespace`] first),
    /// every queue in the default `priority` order.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            ns: namespace.into(),
            orders: Default::default(),
            mode: Default::default(),
        }
    }

    /// The same names with queues of `mode` (`KAIROS_QUEUE_MODE`).
    pub fn with_mode(mut self, mode: crate::queue_mode::QueueMode) -> Self {
        self.mode = mode;
        self
    }

    /// The kind of queue declared: classic or quorum.
    pub fn mode(&self) -> crate::queue_mode::QueueMode {
        self.mode
    }

    /// The priority bands of logical queue `logical`, highest first: the
    /// three bands in quorum mode when its order has priorities, else only
    /// [`Band::LOW`](crate::queue_mode::Band::LOW), the queue itself.
    pub fn bands(&self, logical: &str) -> &'static [crate::queue_mode::Band] {
        use crate::queue_mode::{Band, QueueMode};
        if self.mode == QueueMode::Quorum && self.orders.of(logical).has_priorities() {
            &Band::HIGHEST_FIRST
        } else {
            &[Band::LOW]
        }
    }

    /// The queue of one band of `logical` for AMQP: `NS.q.QUEUE` for the
    /// low band, `NS.q.QUEUE.p4` and `NS.q.QUEUE.p7` for the others.
    pub fn band_queue(
        &self,
        logical: &str,
        band: crate::queue_mode::Band,
    ) -> Result<ShortString, ProtocolError> {
        self.queue_name(logical)?;
        short(
            "queue name",
            &format!("{}{}", self.queue(logical), band.suffix()),
        )
        .map_err(|e| ProtocolError::BadQueue(e.to_string()))
    }

    /// The routing key on `NS.tasks` of a task of `logical` with
    /// `priority`: the logical name, with the band's suffix in quorum mode
    /// (`QUEUE.p7` for priorities 7 to 9) when the queue has bands.
    pub fn route(&self, logical: &str, priority: u8) -> Result<ShortString, ProtocolError> {
        use crate::queue_mode::Band;
        self.queue_name(logical)?;
        let band = if self.bands(logical).len() > 1 {
            Band::of_priority(priority)
        } else {
            Band::LOW
        };
        short("routing key", &format!("{logical}{}", band.suffix()))
            .map_err(|e| ProtocolError::BadQueue(e.to_string()))
    }

    /// The logical queue a routing key on `NS.tasks` reaches: in quorum
    /// mode a band's key (`QUEUE.p7`) is its logical queue's (`QUEUE`);
    /// otherwise the key itself. A message RabbitMQ dead-letters from a
    /// band queue keeps the band's key, so whoever reads it back (the
    /// retry intake, a replay) needs the logical name.
    pub fn logical_of_key<'k>(&self, key: &'k str) -> &'k str {
        use crate::queue_mode::{is_band_name, Band, QueueMode};
        if self.mode != QueueMode::Quorum || !is_band_name(key) {
            return key;
        }
        Band::HIGHEST_FIRST
            .iter()
            .filter(|b| !b.suffix().is_empty())
            .find_map(|b| key.strip_suffix(b.suffix()))
            .unwrap_or(key)
    }

    /// The same names with each queue's order as `orders` says.
    pub fn with_orders(mut self, orders: crate::order::QueueOrders) -> Self {
        self.orders = std::sync::Arc::new(orders);
        self
    }

    /// Every queue's order.
    pub fn orders(&self) -> &crate::order::QueueOrders {
        &self.orders
    }

    /// The namespace itself.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// Direct exchange of ready tasks, routing key = logical queue.
    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.ns)
    }

    /// The classic priority queue that workers consume for a logical queue
    /// (text; see [`queue_name`](Self::queue_name) for AMQP).
    pub fn queue(&self, logical: &str) -> String {
        format!("{}.q.{}", self.ns, logical)
    }

    /// Fanout exchange of tasks to hold until a time; also the name of the
    /// scheduler's queue bound to it.
    pub fn delay(&self) -> String {
        format!("{}.delay", self.ns)
    }

    /// Fanout exchange of rejected deliveries; also the scheduler's queue.
    pub fn retry(&self) -> String {
        format!("{}.retry", self.ns)
    }

    /// Fanout exchange and queue of final dead letters.
    pub fn dead(&self) -> String {
        format!("{}.dead", self.ns)
    }

    /// Topic exchange of lifecycle events.
    pub fn events(&self) -> String {
        format!("{}.events", self.ns)
    }

    /// `NS.q.QUEUE` for AMQP; an error when the logical name breaks
    /// [`validate_queue`] (or the namespace was never checked).
    pub fn queue_name(&self, logical: &str) -> Result<ShortString, ProtocolError> {
        validate_queue(logical).map_err(ProtocolError::BadQueue)?;
        if self.mode == crate::queue_mode::QueueMode::Quorum
            && crate::queue_mode::is_band_name(logical)
        {
            return Err(ProtocolError::BadQueue(format!(
                "queue name {:?} ends like a priority band's (.p4, .p7), which {} quorum \
                 reserves",
                crate::short::preview(logical),
                crate::queue_mode::SETTING
            )));
        }
        short("queue name", &self.queue(logical))
            .map_err(|e| ProtocolError::BadQueue(e.to_string()))
    }

    /// A fixed name for AMQP. Cannot fail with a checked namespace (at
    /// most 48 + 7 bytes); with an unchecked one too long, the name is
    /// empty and the broker refuses the operation, which is no panic.
    fn fixed(name: String) -> ShortString {
        ShortString::try_new(name).unwrap_or_default()
    }

    /// [`tasks_exchange`](Self::tasks_exchange) for AMQP.
    pub fn short_tasks_exchange(&self) -> ShortString {
        Self::fixed(self.tasks_exchange())
    }

    /// [`delay`](Self::delay) for AMQP.
    pub fn short_delay(&self) -> ShortString {
        Self::fixed(self.delay())
    }

    /// [`retry`](Self::retry) for AMQP.
    pub fn short_retry(&self) -> ShortString {
        Self::fixed(self.retry())
    }

    /// [`dead`](Self::dead) for AMQP.
    pub fn short_dead(&self) -> ShortString {
        Self::fixed(self.dead())
    }

    /// [`events`](Self::events) for AMQP.
    pub fn short_events(&self) -> ShortString {
        Self::fixed(self.events())
    }
}

/// Why a message cannot be used as a task.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// No AMQP `type`: the task has no name.
    #[error("missing property `type` (the task name)")]
    MissingType,
    /// An empty AMQP `type`.
    #[error("property `type` is empty")]
    EmptyType,
    /// A `message_id` that breaks the id rule (why).
    #[error("invalid message_id: {0}")]
    BadId(String),
    /// A contract header with a value out of its type or range.
    #[error("invalid header `{name}`: {reason}")]
    BadHeader {
        /// The header.
        name: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A body or content type that cannot be sent (why).
    #[error("invalid body: {0}")]
    BadBody(String),
    /// A message without a routing key.
    #[error("no routing key: it must name the target queue")]
    NoQueue,
    /// A routing key that cannot name a queue (why).
    #[error("invalid routing key: {0}")]
    BadQueue(String),
    /// A task name too long for AMQP `type`.
    #[error("invalid task name: {0}")]
    BadName(#[source] TooLong),
    /// A header name too long for AMQP.
    #[error("invalid header: {0}")]
    BadHeaderName(#[source] TooLong),
    /// A task template (HTTP, schedule) that does not describe a task.
    #[error("invalid task: {0}")]
    Template(#[from] TemplateError),
    /// A delay-queue record that cannot be read or written (why).
    #[error("invalid stored task: {0}")]
    BadRecord(String),
    /// A short string that arrived as bytes that are not UTF-8. The patched
    /// AMQP parser (vendor/README.md) decodes those as U+FFFD rather than
    /// dropping the connection; the text says which field it was.
    #[error("{0} is not valid UTF-8 (the bad bytes read as U+FFFD)")]
    NotUtf8(String),
    /// Tables and arrays nested deeper than the patched parser follows; it
    /// kept the deepest level's bytes under [`NESTED_TOO_DEEP_KEY`].
    #[error("a header nests tables or arrays more than {MAX_NESTING} levels deep")]
    TooDeep,
    /// A message over one of the [`crate::limits::Limits`] (which, and by
    /// how much).
    #[error("{0}")]
    OverLimit(String),
}

/// A task as the contract describes it: the AMQP properties travel along
/// untouched so that headers and pass-through properties survive every hop.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// Task id (`message_id`, or derived: [`derived_id`]).
    pub id: String,
    /// Task name (AMQP `type`).
    pub name: String,
    /// Logical queue (the routing key on `NS.tasks`).
    pub queue: String,
    /// 0 to [`MAX_PRIORITY`].
    pub priority: u8,
    /// The attempt this delivery is (1 for the first).
    pub attempt: u32,
    /// `x-run-at`: due time, Unix ms.
    pub run_at: Option<i64>,
    /// `x-delay-ms`: due this long after the scheduler accepts it.
    pub delay_ms: Option<i64>,
    /// `x-max-retries`: retries after the first attempt.
    pub max_retries: Option<u32>,
    /// `x-timeout-ms`: time limit of one attempt.
    pub timeout_ms: Option<u64>,
    /// `x-cost`: resource units the task occupies while it runs, 1 to
    /// [`MAX_COST`] (1 when absent).
    pub cost: u32,
    /// `x-estimate-ms`: the expected run time, when the publisher gave one.
    pub estimate_ms: Option<u64>,
    /// All properties as received, headers included.
    pub properties: BasicProperties,
    /// The message body.
    pub body: Vec<u8>,
}

impl Task {
    /// Decodes a message received with `routing_key`. A missing id is
    /// derived from the message itself ([`derived_id`]): a redelivery of the
    /// same message gets the same id, so it cannot become a second task. The
    /// id is written into the properties so that every later hop (retry,
    /// dead letter, events) names the same task.
    pub fn decode(
        routing_key: &str,
        properties: &BasicProperties,
        body: &[u8],
    ) -> Result<Self, ProtocolError> {
        check_text(routing_key, properties)?;
        let name = match properties.kind() {
            None => return Err(ProtocolError::MissingType),
            Some(kind) if kind.as_str().is_empty() => return Err(ProtocolError::EmptyType),
            Some(kind) => kind.to_string(),
        };
        let id = match properties.message_id() {
            None => derived_id(routing_key, properties, body),
            Some(id) => {
                validate_id(id.as_str())?;
                id.to_string()
            }
        };
        // Read in place: the properties are cloned whole below, and a clone
        // of the table as well would allocate once per header.
        let no_headers = FieldTable::default();
        let headers = properties.headers().as_ref().unwrap_or(&no_headers);
        let attempt = match int_header(headers, H_ATTEMPT)? {
            None => 1,
            Some(n) if n >= 1 && n <= i64::from(u32::MAX) => n as u32,
            Some(n) => return Err(bad(H_ATTEMPT, format!("{n} is not an attempt number"))),
        };
        let max_retries = int_header(headers, H_MAX_RETRIES)?
            .map(max_retries_in_range)
            .transpose()
            .map_err(|reason| bad(H_MAX_RETRIES, reason))?;
        let timeout_ms = int_header(headers, H_TIMEOUT_MS)?
            .map(timeout_in_range)
            .transpose()
            .map_err(|reason| bad(H_TIMEOUT_MS, reason))?;
        let cost = int_header(headers, H_COST)?
            .map(cost_in_range)
            .transpose()
            .map_err(|reason| bad(H_COST, reason))?
            .unwrap_or(1);
        let estimate_ms = int_header(headers, H_ESTIMATE_MS)?
            .map(estimate_in_range)
            .transpose()
            .map_err(|reason| bad(H_ESTIMATE_MS, reason))?;
        // The routing key names the queue `NS.q.KEY`: a key that cannot
        // make a queue name is refused here, where it enters, rather than
        // when the task is published.
        validate_queue(routing_key).map_err(ProtocolError::BadQueue)?;
        let priority = properties.priority().unwrap_or(0).min(MAX_PRIORITY);
        let message_id =
            short("message_id", &id).map_err(|e| ProtocolError::BadId(e.to_string()))?;
        let properties = properties.clone().with_message_id(message_id);
        Ok(Task {
            id,
            name,
            queue: routing_key.to_string(),
            priority,
            attempt,
            run_at: int_header(headers, H_RUN_AT)?,
            delay_ms: int_header(headers, H_DELAY_MS)?,
            max_retries,
            timeout_ms,
            cost,
            estimate_ms,
            properties,
            body: body.to_vec(),
        })
    }

    /// The properties to publish this task with: its id, name and clamped
    /// priority, persistent, and `x-attempt` set to the task's attempt.
    pub fn publish_properties(&self) -> BasicProperties {
        let mut headers = self.headers();
        headers.insert(
            H_ATTEMPT.into(),
            AMQPValue::LongLongInt(self.attempt as i64),
        );
        let mut props = self.properties.clone();
        // Decoding checked both; a caller that changed them to something
        // too long keeps the ones decoded.
        if let Ok(id) = short("message_id", &self.id) {
            props = props.with_message_id(id);
        }
        if let Ok(name) = short("type", &self.name) {
            props = props.with_type(name);
        }
        props
            .with_priority(self.priority)
            .with_delivery_mode(2)
            .with_headers(headers)
    }

    /// The properties of this task as a dead letter: the publish properties
    /// plus `x-error`, `x-failed-at` and `x-origin-queue`.
    pub fn dead_letter_properties(&self, error: &str, failed_at: i64) -> BasicProperties {
        self.with_failure_headers(error, failed_at)
    }

    /// Publish properties with the failure headers added. Used for dead
    /// letters and for failed attempts handed to `NS.retry`.
    pub fn with_failure_headers(&self, error: &str, failed_at: i64) -> BasicProperties {
        let props = self.publish_properties();
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            H_ERROR.into(),
            AMQPValue::LongString(truncate(error).into()),
        );
        headers.insert(H_FAILED_AT.into(), AMQPValue::LongLongInt(failed_at));
        headers.insert(H_ORIGIN_QUEUE.into(), text(&self.queue));
        props.with_headers(headers)
    }

    /// The due time this task asks for, given the scheduler's `now`:
    /// `x-run-at` wins over `x-delay-ms`; neither means now.
    pub fn due_at(&self, now_ms: i64) -> i64 {
        match (self.run_at, self.delay_ms) {
            (Some(at), _) => at,
            (None, Some(delay)) => now_ms.saturating_add(delay.max(0)),
            (None, None) => now_ms,
        }
    }

    /// A header value as text, for handlers and events.
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name))
    }

    /// A copy of the headers (empty when the message had none).
    pub fn headers(&self) -> FieldTable {
        self.properties.headers().clone().unwrap_or_default()
    }

    /// Replaces one header (the contract's own: a name longer than 255
    /// bytes is not a header and is left out).
    pub fn set_header(&mut self, name: &str, value: AMQPValue) {
        let Ok(name) = header_name(name) else {
            return;
        };
        let mut headers = self.headers();
        headers.insert(name, value);
        // Moved, not cloned: the old table would be copied only to be
        // replaced (the pump sets `x-run-at` on every task it publishes).
        self.properties = std::mem::take(&mut self.properties).with_headers(headers);
    }
}

/// Dead-letter properties for a message that could not be decoded into a
/// task: its own properties, untouched, plus the dead-letter headers.
pub fn raw_dead_letter_properties(
    properties: &BasicProperties,
    origin_queue: &str,
    error: &str,
    failed_at: i64,
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let attempt = match int_header(&headers, H_ATTEMPT) {
        Ok(Some(n)) if n >= 1 => n,
        _ => 1,
    };
    headers.insert(H_ATTEMPT.into(), AMQPValue::LongLongInt(attempt));
    headers.insert(
        H_ERROR.into(),
        AMQPValue::LongString(truncate(error).into()),
    );
    headers.insert(H_FAILED_AT.into(), AMQPValue::LongLongInt(failed_at));
    headers.insert(H_ORIGIN_QUEUE.into(), text(origin_queue));
    properties
        .clone()
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// What the AMQP parser puts where a short string's bytes were not UTF-8.
const NOT_UTF8: char = char::REPLACEMENT_CHARACTER;

/// Refuses a message whose routing key, short-string properties or header
/// names (at any depth) were not UTF-8 on the wire. Passing them on would
/// run the task under a name, id or header its publisher never sent.
fn check_text(routing_key: &str, p: &BasicProperties) -> Result<(), ProtocolError> {
    if routing_key.contains(NOT_UTF8) {
        return Err(ProtocolError::NotUtf8("the routing key".into()));
    }
    let properties = [
        ("type", p.kind()),
        ("message_id", p.message_id()),
        ("content_type", p.content_type()),
        ("content_encoding", p.content_encoding()),
        ("correlation_id", p.correlation_id()),
        ("reply_to", p.reply_to()),
        ("expiration", p.expiration()),
        ("user_id", p.user_id()),
        ("app_id", p.app_id()),
        ("cluster_id", p.cluster_id()),
    ];
    for (name, value) in properties {
        if value
            .as_ref()
            .is_some_and(|v| v.as_str().contains(NOT_UTF8))
        {
            return Err(ProtocolError::NotUtf8(format!("property `{name}`")));
        }
    }
    match p.headers() {
        Some(headers) => check_header_names(headers),
        None => Ok(()),
    }
}

/// Walks nested tables and arrays with a stack of its own: the depth is
/// whatever the publisher sent.
fn check_header_names(headers: &FieldTable) -> Result<(), ProtocolError> {
    let mut values: Vec<&AMQPValue> = Vec::new();
    let mut tables = vec![headers];
    loop {
        if let Some(table) = tables.pop() {
            for (name, value) in table.inner() {
                if name.as_str() == NESTED_TOO_DEEP_KEY {
                    return Err(ProtocolError::TooDeep);
                }
                if name.as_str().contains(NOT_UTF8) {
                    return Err(ProtocolError::NotUtf8(format!(
                        "a header name ({:?})",
                        name.as_str()
                    )));
                }
                values.push(value);
            }
        } else if let Some(value) = values.pop() {
            match value {
                AMQPValue::FieldTable(t) => tables.push(t),
                AMQPValue::FieldArray(a) => values.extend(a.as_slice()),
                _ => {}
            }
        } else {
            return Ok(());
        }
    }
}

/// A short string as the contract can use it: present, not empty and valid
/// UTF-8 on the wire. For naming a message that could not be decoded.
pub fn readable(value: &Option<ShortString>) -> Option<String> {
    value
        .as_ref()
        .map(ShortString::as_str)
        .filter(|s| !s.is_empty() && !s.contains(NOT_UTF8))
        .map(str::to_string)
}

/// Error text in headers is capped so that a huge panic message cannot make
/// a dead letter unpublishable.
fn truncate(error: &str) -> String {
    const MAX: usize = 4096;
    if error.len() <= MAX {
        return error.to_string();
    }
    let mut end = MAX;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &error[..end])
}

fn bad(name: &'static str, reason: String) -> ProtocolError {
    ProtocolError::BadHeader { name, reason }
}

/// The id of a message that came without `message_id`: `h-` and a 128-bit
/// FNV-1a hash (hex) of its routing key, properties (in their AMQP wire
/// encoding, which is deterministic: header tables are ordered) and body.
///
/// It is stable because a redelivery carries exactly the bytes of the first
/// delivery: whoever decodes the message (the intake after a crash, the
/// worker, the retry intake) derives the same id, so the pending-id rule
/// turns a redelivery into a `duplicate`, never into a second task. The
/// price: two identical messages without an id are one task while the first
/// is pending. A client that means two tasks gives them ids.
pub fn derived_id(routing_key: &str, properties: &BasicProperties, body: &[u8]) -> String {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let props = encoded_properties(properties).unwrap_or_default();
    let mut h = OFFSET;
    let parts: [&[u8]; 5] = [routing_key.as_bytes(), &[0], &props, &[0], body];
    for part in parts {
        for b in part {
            h ^= u128::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    }
    format!("{DERIVED_ID_PREFIX}{h:032x}")
}

/// The AMQP wire encoding of `properties` (what a content header frame
/// carries): its length is what must stay under the broker's `frame_max`.
pub fn encoded_properties(properties: &BasicProperties) -> Result<Vec<u8>, ProtocolError> {
    cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::with_capacity(64),
    )
    .map_err(|e| ProtocolError::BadRecord(format!("cannot encode properties: {e:?}")))
}

/// The contract's range of `x-max-retries`: 0 to [`MAX_RETRIES_CAP`].
pub fn max_retries_in_range(n: i64) -> Result<u32, String> {
    if n < 0 {
        return Err(format!("{n} is negative"));
    }
    u32::try_from(n)
        .ok()
        .filter(|n| *n <= MAX_RETRIES_CAP)
        .ok_or_else(|| format!("{n} exceeds the cap of {MAX_RETRIES_CAP} retries"))
}

/// The contract's range of `x-timeout-ms`: positive.
pub fn timeout_in_range(n: i64) -> Result<u64, String> {
    u64::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{n} is not positive"))
}

/// The contract's range of `x-cost`: 1 to [`MAX_COST`].
pub fn cost_in_range(n: i64) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_COST).contains(n))
        .ok_or_else(|| format!("{n} is not 1 to {MAX_COST}"))
}

/// The contract's range of `x-estimate-ms`: 0 or more.
pub fn estimate_in_range(n: i64) -> Result<u64, String> {
    u64::try_from(n).map_err(|_| format!("{n} is negative"))
}

/// Checks the contract's id rule: 1 to 128 printable ASCII characters.
pub fn validate_id(id: &str) -> Result<(), ProtocolError> {
    if id.is_empty() {
        return Err(ProtocolError::BadId("empty".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(ProtocolError::BadId(format!(
            "{} characters, at most {MAX_ID_LEN}",
            id.len()
        )));
    }
    if let Some(c) = id.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(ProtocolError::BadId(format!(
            "character {c:?} is not printable ASCII"
        )));
    }
    Ok(())
}

/// Reads an integer header: any AMQP integer type, or a decimal string.
pub fn int_header(headers: &FieldTable, name: &'static str) -> Result<Option<i64>, ProtocolError> {
    let Some(value) = headers.inner().get(name) else {
        return Ok(None);
    };
    value_as_i64(value)
        .map(Some)
        .map_err(|reason| bad(name, reason))
}

fn value_as_i64(value: &AMQPValue) -> Result<i64, String> {
    match value {
        AMQPValue::ShortShortInt(v) => Ok(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Ok(i64::from(*v)),
        AMQPValue::ShortInt(v) => Ok(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Ok(i64::from(*v)),
        AMQPValue::LongInt(v) => Ok(i64::from(*v)),
        AMQPValue::LongUInt(v) => Ok(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Ok(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).map_err(|_| format!("{v} is out of range")),
        AMQPValue::ShortString(s) => parse_decimal(s.as_str()),
        AMQPValue::LongString(s) => parse_decimal(&String::from_utf8_lossy(s.as_bytes())),
        other => Err(format!("expected an integer, got {}", type_name(other))),
    }
}

fn parse_decimal(text: &str) -> Result<i64, String> {
    text.trim()
        .parse::<i64>()
        .map_err(|_| format!("{text:?} is not a decimal integer"))
}

fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::Boolean(_) => "a boolean",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "a floating-point number",
        AMQPValue::DecimalValue(_) => "a decimal value",
        AMQPValue::FieldArray(_) => "an array",
        AMQPValue::FieldTable(_) => "a table",
        AMQPValue::ByteArray(_) => "a byte array",
        AMQPValue::Void => "void",
        _ => "an unsupported type",
    }
}

/// A header value rendered as text (strings as is, numbers in decimal).
pub fn value_to_string(value: &AMQPValue) -> String {
    match value {
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => value_as_i64(other)
            .map(|n| n.to_string())
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

/// Convenience for building string header values.
pub fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(kind: &str) -> BasicProperties {
        BasicProperties::default().with_type(kind.into())
    }

    fn with_header(p: BasicProperties, name: &str, v: AMQPValue) -> BasicProperties {
        let mut h = p.headers().clone().unwrap_or_default();
        h.insert(name.into(), v);
        p.with_headers(h)
    }

    #[test]
    fn names_follow_the_contract() {
        let n = Names::new("kairos");
        assert_eq!(n.tasks_exchange(), "kairos.tasks");
        assert_eq!(n.queue("emails"), "kairos.q.emails");
        assert_eq!(n.delay(), "kairos.delay");
        assert_eq!(n.retry(), "kairos.retry");
        assert_eq!(n.dead(), "kairos.dead");
        assert_eq!(n.events(), "kairos.events");
        assert_eq!(n.short_tasks_exchange().as_str(), "kairos.tasks");
        assert_eq!(n.queue_name("emails").unwrap().as_str(), "kairos.q.emails");
        assert_eq!(n.short_delay().as_str(), "kairos.delay");
        assert_eq!(n.short_retry().as_str(), "kairos.retry");
        assert_eq!(n.short_dead().as_str(), "kairos.dead");
        assert_eq!(n.short_events().as_str(), "kairos.events");
    }

    #[test]
    fn the_longest_namespace_and_queue_still_make_a_queue_name() {
        let ns = "n".repeat(MAX_NAMESPACE_LEN);
        assert!(validate_namespace(&ns).is_ok());
        let n = Names::new(ns.as_str());
        let q = "q".repeat(MAX_QUEUE_LEN);
        assert!(n.queue_name(&q).unwrap().as_str().len() <= 255);
        assert!(n.queue_name(&format!("{q}x")).is_err());
        assert!(n.queue_name("").is_err());
        assert!(n.queue_name("a\nb").is_err());
        let err = validate_namespace(&format!("{ns}x")).unwrap_err();
        assert!(err.contains("48"), "{err}");
        assert!(validate_namespace("a b").is_err());
        // An unchecked namespace too long gives empty names, not a panic.
        let unchecked = Names::new("n".repeat(300));
        assert_eq!(unchecked.short_dead().as_str(), "");
        assert!(unchecked.queue_name("q").is_err());
        // The longest name's highest band still fits in quorum mode.
        let quorum = Names::new(ns.as_str()).with_mode(crate::queue_mode::QueueMode::Quorum);
        let high = quorum
            .band_queue(&q, crate::queue_mode::Band::HIGH)
            .unwrap();
        assert!(high.as_str().ends_with(".p7") && high.as_str().len() <= 255);
    }

    #[test]
    fn quorum_names_route_by_band() {
        use crate::queue_mode::{Band, QueueMode};
        let classic = Names::new("kx");
        assert_eq!(classic.bands("emails"), &[Band::LOW]);
        assert_eq!(classic.route("emails", 9).unwrap().as_str(), "emails");
        assert!(classic.queue_name("emails.p7").is_ok());
        let quorum = Names::new("kx")
            .with_orders("plain:fifo".parse().unwrap())
            .with_mode(QueueMode::Quorum);
        assert_eq!(quorum.bands("emails"), &Band::HIGHEST_FIRST);
        assert_eq!(quorum.bands("plain"), &[Band::LOW]);
        let keys: Vec<String> = [0, 3, 4, 6, 7, 9]
            .iter()
            .map(|p| quorum.route("emails", *p).unwrap().to_string())
            .collect();
        assert_eq!(
            keys,
            [
                "emails",
                "emails",
                "emails.p4",
                "emails.p4",
                "emails.p7",
                "emails.p7"
            ]
        );
        assert_eq!(quorum.route("plain", 9).unwrap().as_str(), "plain");
        assert_eq!(
            quorum.band_queue("emails", Band::MIDDLE).unwrap().as_str(),
            "kx.q.emails.p4"
        );
        assert_eq!(
            quorum.band_queue("emails", Band::LOW).unwrap().as_str(),
            "kx.q.emails"
        );
        let err = quorum.queue_name("emails.p7").unwrap_err().to_string();
        assert!(err.contains("KAIROS_QUEUE_MODE"), "{err}");
        assert!(quorum.route("x.p4", 0).is_err());
        // A band's key leads back to its logical queue, in quorum mode only.
        assert_eq!(quorum.logical_of_key("emails.p7"), "emails");
        assert_eq!(quorum.logical_of_key("emails.p4"), "emails");
        assert_eq!(quorum.logical_of_key("emails"), "emails");
        assert_eq!(quorum.logical_of_key("emails.p5"), "emails.p5");
        assert_eq!(classic.logical_of_key("emails.p7"), "emails.p7");
    }

    #[test]
    fn a_routing_key_that_cannot_name_a_queue_is_refused_at_decode() {
        for len in [201, 247, 255] {
            let key = "k".repeat(len);
            let err = Task::decode(&key, &props("t"), b"").unwrap_err();
            assert!(matches!(err, ProtocolError::BadQueue(_)), "{err}");
            assert!(err.to_string().contains("routing key"), "{err}");
        }
    }

    #[test]
    fn cost_defaults_to_one_and_is_checked() {
        let t = Task::decode("q", &props("t"), b"").unwrap();
        assert_eq!((t.cost, t.estimate_ms), (1, None));
        let p = with_header(props("t"), H_COST, AMQPValue::LongLongInt(4));
        let p = with_header(p, H_ESTIMATE_MS, AMQPValue::LongString("250".into()));
        let t = Task::decode("q", &p, b"").unwrap();
        assert_eq!((t.cost, t.estimate_ms), (4, Some(250)));
        for bad_cost in [0, -1, i64::from(MAX_COST) + 1, i64::MAX] {
            let p = with_header(props("t"), H_COST, AMQPValue::LongLongInt(bad_cost));
            let err = Task::decode("q", &p, b"").unwrap_err().to_string();
            assert!(err.contains("x-cost"), "{err}");
        }
        let p = with_header(props("t"), H_COST, AMQPValue::Boolean(true));
        assert!(Task::decode("q", &p, b"").is_err());
        let p = with_header(props("t"), H_ESTIMATE_MS, AMQPValue::LongLongInt(-5));
        let err = Task::decode("q", &p, b"").unwrap_err().to_string();
        assert!(err.contains("x-estimate-ms"), "{err}");
    }

    #[test]
    fn missing_type_is_refused() {
        let err = Task::decode("default", &BasicProperties::default(), b"").unwrap_err();
        assert_eq!(err, ProtocolError::MissingType);
    }

    #[test]
    fn missing_id_is_derived_from_the_message_and_sticks() {
        let t = Task::decode("default", &props("a.b"), b"x").unwrap();
        assert!(t.id.starts_with(DERIVED_ID_PREFIX), "{}", t.id);
        assert!(validate_id(&t.id).is_ok());
        assert_eq!(
            t.publish_properties()
                .message_id()
                .as_ref()
                .unwrap()
                .as_str(),
            t.id
        );
        assert_eq!(t.attempt, 1);
        assert_eq!(t.priority, 0);
        // A redelivery (the same bytes) gets the same id ...
        let again = Task::decode("default", &props("a.b"), b"x").unwrap();
        assert_eq!(again.id, t.id);
        // ... and another body, queue, type or header another one.
        let others = [
            Task::decode("default", &props("a.b"), b"y"),
            Task::decode("other", &props("a.b"), b"x"),
            Task::decode("default", &props("a.c"), b"x"),
            Task::decode("default", &with_header(props("a.b"), "k", text("v")), b"x"),
        ];
        for o in others {
            assert_ne!(o.unwrap().id, t.id);
        }
    }

    #[test]
    fn max_retries_over_the_cap_says_so() {
        let p = with_header(props("t"), H_MAX_RETRIES, AMQPValue::LongLongInt(1 << 40));
        let err = Task::decode("q", &p, b"").unwrap_err().to_string();
        assert!(err.contains("exceeds the cap of 1000"), "{err}");
        assert!(!err.contains("negative"), "{err}");
        let p = with_header(props("t"), H_MAX_RETRIES, AMQPValue::LongLongInt(-1));
        let err = Task::decode("q", &p, b"").unwrap_err().to_string();
        assert!(err.contains("negative"), "{err}");
        let p = with_header(
            props("t"),
            H_MAX_RETRIES,
            AMQPValue::LongLongInt(i64::from(MAX_RETRIES_CAP)),
        );
        assert_eq!(
            Task::decode("q", &p, b"").unwrap().max_retries,
            Some(MAX_RETRIES_CAP)
        );
    }

    #[test]
    fn ids_must_be_printable_ascii_up_to_128() {
        assert!(validate_id("abc-123 x").is_ok());
        assert!(validate_id(&"a".repeat(128)).is_ok());
        assert!(validate_id(&"a".repeat(129)).is_err());
        assert!(validate_id("").is_err());
        assert!(validate_id("é").is_err());
        assert!(validate_id("a\nb").is_err());
    }

    #[test]
    fn integer_headers_accept_every_width_and_decimal_strings() {
        let cases = [
            AMQPValue::ShortShortInt(7),
            AMQPValue::ShortShortUInt(7),
            AMQPValue::ShortInt(7),
            AMQPValue::ShortUInt(7),
            AMQPValue::LongInt(7),
            AMQPValue::LongUInt(7),
            AMQPValue::LongLongInt(7),
            AMQPValue::LongString("7".into()),
            AMQPValue::ShortString("7".into()),
        ];
        for v in cases {
            let p = with_header(props("t"), H_MAX_RETRIES, v.clone());
            let t = Task::decode("q", &p, b"").unwrap();
            assert_eq!(t.max_retries, Some(7), "{v:?}");
        }
    }

    #[test]
    fn non_integer_run_at_is_a_bad_header() {
        let p = with_header(props("t"), H_RUN_AT, text("abc"));
        let err = Task::decode("q", &p, b"").unwrap_err();
        assert!(matches!(
            err,
            ProtocolError::BadHeader { name: H_RUN_AT, .. }
        ));
        assert!(err.to_string().contains("x-run-at"));
        let p = with_header(props("t"), H_DELAY_MS, AMQPValue::Double(1.5));
        assert!(Task::decode("q", &p, b"").is_err());
    }

    #[test]
    fn priority_above_nine_counts_as_nine() {
        let t = Task::decode("q", &props("t").with_priority(200), b"").unwrap();
        assert_eq!(t.priority, 9);
        assert_eq!(t.publish_properties().priority(), &Some(9));
    }

    #[test]
    fn run_at_wins_over_delay() {
        let p = with_header(props("t"), H_RUN_AT, AMQPValue::LongLongInt(5_000));
        let p = with_header(p, H_DELAY_MS, AMQPValue::LongLongInt(10));
        let t = Task::decode("q", &p, b"").unwrap();
        assert_eq!(t.due_at(1_000), 5_000);
        let p = with_header(props("t"), H_DELAY_MS, AMQPValue::LongLongInt(10));
        assert_eq!(Task::decode("q", &p, b"").unwrap().due_at(1_000), 1_010);
        assert_eq!(
            Task::decode("q", &props("t"), b"").unwrap().due_at(1_000),
            1_000
        );
    }

    #[test]
    fn publish_properties_keep_pass_through_fields_and_set_attempt() {
        let p = props("t")
            .with_content_type("application/json".into())
            .with_correlation_id("c-1".into())
            .with_message_id("id-1".into());
        let p = with_header(p, "custom", text("v"));
        let mut t = Task::decode("q", &p, b"{}").unwrap();
        t.attempt = 3;
        let out = t.publish_properties();
        assert_eq!(
            out.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(out.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!(out.delivery_mode(), &Some(2));
        let h = out.headers().as_ref().unwrap();
        assert_eq!(h.inner().get(H_ATTEMPT), Some(&AMQPValue::LongLongInt(3)));
        assert_eq!(h.inner().get("custom"), Some(&text("v")));
    }

    #[test]
    fn dead_letter_headers_are_set() {
        let t = Task::decode("emails", &props("t"), b"").unwrap();
        let p = t.dead_letter_properties("boom", 42);
        let h = p.headers().as_ref().unwrap();
        assert_eq!(h.inner().get(H_ERROR), Some(&text("boom")));
        assert_eq!(
            h.inner().get(H_FAILED_AT),
            Some(&AMQPValue::LongLongInt(42))
        );
        assert_eq!(h.inner().get(H_ORIGIN_QUEUE), Some(&text("emails")));
        assert_eq!(h.inner().get(H_ATTEMPT), Some(&AMQPValue::LongLongInt(1)));
    }

    #[test]
    fn undecodable_messages_keep_their_properties_in_the_dead_letter() {
        let p = with_header(BasicProperties::default(), H_RUN_AT, text("abc"));
        let out = raw_dead_letter_properties(&p, "default", "bad x-run-at", 7);
        let h = out.headers().as_ref().unwrap();
        assert_eq!(h.inner().get(H_RUN_AT), Some(&text("abc")));
        assert_eq!(h.inner().get(H_ERROR), Some(&text("bad x-run-at")));
        assert_eq!(h.inner().get(H_ATTEMPT), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(h.inner().get(H_ORIGIN_QUEUE), Some(&text("default")));
    }

    #[test]
    fn short_strings_that_were_not_utf8_are_refused_by_name() {
        let bad = "x\u{FFFD}y";
        let cases = [
            (props(bad), "property `type`"),
            (
                props("t").with_message_id(bad.into()),
                "property `message_id`",
            ),
            (
                props("t").with_content_type(bad.into()),
                "property `content_type`",
            ),
            (
                props("t").with_correlation_id(bad.into()),
                "property `correlation_id`",
            ),
            (props("t").with_app_id(bad.into()), "property `app_id`"),
            (
                with_header(props("t"), bad, text("v")),
                "a header name (\"x\u{FFFD}y\")",
            ),
        ];
        for (p, field) in cases {
            let err = Task::decode("q", &p, b"").unwrap_err();
            assert_eq!(err, ProtocolError::NotUtf8(field.to_string()));
            assert!(
                err.to_string()
                    .starts_with(&format!("{field} is not valid UTF-8")),
                "{err}"
            );
        }
        let err = Task::decode(bad, &props("t"), b"").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("the routing key is not valid UTF-8"));
    }

    #[test]
    fn header_names_are_checked_inside_tables_and_arrays() {
        let mut inner = FieldTable::default();
        inner.insert("ok\u{FFFD}".into(), AMQPValue::Void);
        let nested = AMQPValue::FieldArray(vec![AMQPValue::FieldTable(inner)].into());
        let mut outer = FieldTable::default();
        outer.insert("deep".into(), nested);
        let p = with_header(props("t"), "top", AMQPValue::FieldTable(outer));
        let err = Task::decode("q", &p, b"").unwrap_err();
        assert!(err.to_string().contains("a header name"), "{err}");
        // The same shapes with good names pass.
        let mut inner = FieldTable::default();
        inner.insert("fine".into(), text("\u{FFFD} in a value is data"));
        let p = with_header(props("t"), "top", AMQPValue::FieldTable(inner));
        assert!(Task::decode("q", &p, b"").is_ok());
    }

    #[test]
    fn headers_nested_past_the_parser_limit_are_refused() {
        let mut cut = FieldTable::default();
        cut.insert(
            NESTED_TOO_DEEP_KEY.into(),
            AMQPValue::LongString(vec![b'V'].into()),
        );
        let p = with_header(props("t"), "deep", AMQPValue::FieldTable(cut));
        let err = Task::decode("q", &p, b"").unwrap_err();
        assert_eq!(err, ProtocolError::TooDeep);
        assert!(err.to_string().contains("32 levels"), "{err}");
    }

    #[test]
    fn readable_means_present_non_empty_and_utf8() {
        assert_eq!(readable(&Some("id-1".into())), Some("id-1".to_string()));
        assert_eq!(readable(&Some("".into())), None);
        assert_eq!(readable(&Some("a\u{FFFD}".into())), None);
        assert_eq!(readable(&None), None);
    }

    #[test]
    fn huge_errors_are_truncated_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let cut = truncate(&long);
        assert!(cut.len() < long.len());
        assert!(cut.ends_with('…'));
    }
}
