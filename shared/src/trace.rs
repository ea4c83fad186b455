//! W3C Trace Context (`traceparent`, `tracestate`) carried on a task.
//!
//! A client that traces its requests sets the header `traceparent` (and
//! optionally `tracestate`) on the task, as an AMQP header or in the
//! `headers` of `POST /v1/tasks`. Kairos keeps every header through the
//! delay queue, retries and dead letters, so each attempt's handler span
//! (and each dead letter) names the trace the client started.
//!
//! The value is parsed strictly, as the W3C recommendation says
//! (<https://www.w3.org/TR/trace-context/>): lowercase hex, the right
//! lengths, neither id all zeros, version `ff` refused. A value that does
//! not parse is ignored (the task runs as if it had none, and the header
//! is passed on untouched); it is never an error.

use crate::contract::Task;
use lapin::types::{AMQPValue, FieldTable};
use std::fmt;

/// The header a client sets: `00-TRACEID-PARENTID-FLAGS`.
pub const H_TRACEPARENT: &str = "traceparent";
/// Vendor-specific trace data passed along with `traceparent`.
pub const H_TRACESTATE: &str = "tracestate";

/// `tracestate` longer than this is dropped (the recommendation's limit
/// for what a vendor must propagate).
const MAX_TRACESTATE: usize = 512;
/// Length of a version 00 `traceparent`.
const TRACEPARENT_LEN: usize = 55;

/// A parsed `traceparent`: which trace, which span is the parent, and the
/// flags (bit 0: sampled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace's id: 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The id of the span that sent the task: 8 bytes, not all zero.
    pub parent_id: [u8; 8],
    /// The trace flags; bit 0 says the caller sampled (records) the trace.
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` for anything the
    /// recommendation says to ignore. Versions above 00 are read for their
    /// first four fields (as the recommendation asks), version `ff` never.
    pub fn parse(value: &str) -> Option<Self> {
        let b = value.as_bytes();
        if b.len() < TRACEPARENT_LEN {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        if version == 0xff {
            return None;
        }
        if version == 0 && b.len() != TRACEPARENT_LEN {
            return None;
        }
        // A later version may append fields, after a dash.
        if b.len() > TRACEPARENT_LEN && b[TRACEPARENT_LEN] != b'-' {
            return None;
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        hex_into(&b[3..35], &mut trace_id)?;
        let mut parent_id = [0u8; 8];
        hex_into(&b[36..52], &mut parent_id)?;
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The `traceparent` of a task's headers, where one is set and valid
    /// (a text header: short or long string, or bytes).
    pub fn from_headers(headers: &FieldTable) -> Option<Self> {
        let value = header_text(headers, H_TRACEPARENT)?;
        Self::parse(value.trim())
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The parent span id as 16 lowercase hex digits.
    pub fn parent_id_hex(&self) -> String {
        hex(&self.parent_id)
    }

    /// Whether the caller sampled the trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// The header value, version 00: `00-TRACEID-PARENTID-FLAGS`.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.parent_id_hex(),
            self.flags
        )
    }
}

/// The `tracestate` of a task's headers, where it is printable ASCII of
/// at most 512 bytes and the task has a valid `traceparent` (a
/// `tracestate` alone means nothing).
pub fn tracestate(headers: &FieldTable) -> Option<String> {
    TraceParent::from_headers(headers)?;
    let value = header_text(headers, H_TRACESTATE)?;
    let ok = value.len() <= MAX_TRACESTATE && value.bytes().all(|c| (0x20..0x7f).contains(&c));
    ok.then_some(value)
}

/// The span one attempt of `task` runs in (the worker's handler span):
/// `task` with `task_id`, `kind` and `attempt`, plus `trace_id` and
/// `parent_span` when the task carries a valid `traceparent`. With OTLP
/// export on, the caller's span is its parent.
pub fn task_span(task: &Task) -> tracing::Span {
    let span = tracing::info_span!(
        "task",
        task_id = %task.id,
        kind = %task.name,
        attempt = task.attempt,
        trace_id = tracing::field::Empty,
        parent_span = tracing::field::Empty,
    );
    if let Some(headers) = task.properties.headers() {
        if let Some(tp) = TraceParent::from_headers(headers) {
            span.record("trace_id", tracing::field::display(tp.trace_id_hex()));
            span.record("parent_span", tracing::field::display(tp.parent_id_hex()));
            crate::trace_init::set_parent(&span, &tp, tracestate(headers).as_deref());
        }
    }
    span
}

/// `task` with the `traceparent` (and `tracestate`) of the HTTP request
/// that enqueues it, when the task's own headers carry none and the HTTP
/// one is valid: a traced HTTP client's span becomes the task's parent
/// without it having to copy the header into the body.
pub fn adopt_http_traceparent(
    task: crate::client::NewTask,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
) -> crate::client::NewTask {
    if task.headers.inner().contains_key(H_TRACEPARENT) {
        return task;
    }
    let Some(tp) = traceparent.and_then(|v| TraceParent::parse(v.trim())) else {
        return task;
    };
    let task = task.traceparent(tp.to_string());
    match tracestate {
        Some(state) if !task.headers.inner().contains_key(H_TRACESTATE) => task.tracestate(state),
        _ => task,
    }
}

/// Marks a step of `task`'s journey outside the worker (`kairos.hold`,
/// `kairos.publish`) with a span in the caller's trace, while spans are
/// exported (`KAIROS_OTLP_ENDPOINT`) and the task carries a
/// `traceparent`. Otherwise it costs one atomic load.
pub fn step(name: &'static str, task: &Task) {
    if crate::trace_init::exporting() {
        let headers = task.properties.headers().as_ref();
        step_of(
            name,
            &task.id,
            &task.name,
            &task.queue,
            task.attempt,
            headers,
        );
    }
}

/// [`step`] for a task given by its parts (the client's `kairos.enqueue`,
/// before there is a [`Task`]).
pub fn step_of(
    name: &'static str,
    id: &str,
    kind: &str,
    queue: &str,
    attempt: u32,
    headers: Option<&FieldTable>,
) {
    if !crate::trace_init::exporting() {
        return;
    }
    let Some(headers) = headers else {
        return;
    };
    let Some(tp) = TraceParent::from_headers(headers) else {
        return;
    };
    let span = tracing::info_span!(
        "step",
        otel.name = name,
        task_id = %id,
        kind = %kind,
        queue = %queue,
        attempt = attempt,
    );
    crate::trace_init::set_parent(&span, &tp, tracestate(headers).as_deref());
}

/// A text header's value (short string, long string or byte array).
fn header_text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_string),
        AMQPValue::ByteArray(s) => std::str::from_utf8(s.as_slice()).ok().map(str::to_string),
        _ => None,
    }
}

/// One lowercase hex digit's value (uppercase is not allowed).
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    Some(nibble(two[0])? << 4 | nibble(two[1])?)
}

fn hex_into(digits: &[u8], out: &mut [u8]) -> Option<()> {
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = hex_byte(pair)?;
    }
    Some(())
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, LongString, ShortString};

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_recommendations_example_parses_and_prints_back() {
        let tp = TraceParent::parse(GOOD).unwrap();
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id_hex(), "00f067aa0ba902b7");
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), GOOD);
    }

    #[test]
    fn bad_values_are_ignored() {
        for bad in [
            "",
            "00",
            // uppercase hex
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // all-zero ids
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // version ff, and version 00 with more after it
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // wrong separators and lengths
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // multi-byte characters where hex belongs
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_for_its_first_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-whatever";
        let tp = TraceParent::parse(later).unwrap();
        assert!(!tp.sampled());
        assert_eq!(tp.to_string(), GOOD.replace("-01", "-00"));
        let glued = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00x";
        assert_eq!(TraceParent::parse(glued), None);
    }

    #[test]
    fn headers_of_any_text_type_are_read() {
        for value in [
            AMQPValue::LongString(LongString::from(GOOD)),
            AMQPValue::ShortString(ShortString::from(GOOD)),
            AMQPValue::ByteArray(ByteArray::from(GOOD.as_bytes())),
        ] {
            let mut h = FieldTable::default();
            h.insert(H_TRACEPARENT.into(), value);
            h.insert(
                H_TRACESTATE.into(),
                AMQPValue::LongString("congo=t61rcWkgMzE".into()),
            );
            assert!(TraceParent::from_headers(&h).is_some());
            assert_eq!(tracestate(&h).as_deref(), Some("congo=t61rcWkgMzE"));
        }
        let mut h = FieldTable::default();
        h.insert(H_TRACEPARENT.into(), AMQPValue::LongLongInt(7));
        h.insert(H_TRACESTATE.into(), AMQPValue::LongString("a=b".into()));
        assert_eq!(TraceParent::from_headers(&h), None);
        assert_eq!(tracestate(&h), None, "no tracestate without traceparent");
        let mut h = FieldTable::default();
        h.insert(H_TRACEPARENT.into(), AMQPValue::LongString(GOOD.into()));
        h.insert(
            H_TRACESTATE.into(),
            AMQPValue::LongString("a=".repeat(300).as_str().into()),
        );
        assert_eq!(tracestate(&h), None, "over 512 bytes");
    }
}
