//! Following a scheduler's live events (`GET /v1/events`, Server-Sent
//! Events): the reader behind `kairosctl tail`.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

/// The longest connecting and getting the answer's head may take; the
/// stream itself runs as long as the server keeps it open.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest line of the stream read; a longer one ends it with an error
/// (a published event is far shorter).
const MAX_LINE_BYTES: u64 = 1 << 20;

/// What a stream is filtered by (each `None` matches all).
#[derive(Debug, Default, Clone)]
pub struct TailFilter {
    /// The task id.
    pub id: Option<String>,
    /// The task name.
    pub name: Option<String>,
    /// The logical queue.
    pub queue: Option<String>,
    /// Event kinds, comma-separated (`started,succeeded`).
    pub event: Option<String>,
}

impl TailFilter {
    /// The query string (with its `?`, or empty), percent-encoded.
    fn query(&self) -> String {
        let pairs: Vec<String> = [
            ("id", &self.id),
            ("name", &self.name),
            ("queue", &self.queue),
            ("event", &self.event),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    }
}

/// `value` percent-encoded for a query (unreserved characters kept).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Why following the stream stopped short.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// Connecting or reading failed.
    #[error("cannot follow {url}: {source}")]
    Http {
        /// What was asked for.
        url: String,
        /// The cause.
        #[source]
        source: ureq::Error,
    },
    /// Reading the stream failed.
    #[error("reading the event stream: {0}")]
    Read(#[from] std::io::Error),
    /// The server answered with an error (its status and body).
    #[error("HTTP {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The `error` of its JSON body, or the body.
        message: String,
    },
}

/// An open event stream: [`EventStream::next_event`] reads it.
pub struct EventStream {
    reader: BufReader<ureq::BodyReader<'static>>,
}

impl EventStream {
    /// Opens the event stream of the scheduler at `addr` (as for
    /// [`crate::Api::new`]); once this returns, the server listens for the
    /// client, so no event published afterwards is missed.
    pub fn open(addr: &str, token: Option<&str>, filter: &TailFilter) -> Result<Self, TailError> {
        let url = format!("{}/v1/events{}", crate::base_url(addr), filter.query());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(OPEN_TIMEOUT))
            .timeout_recv_response(Some(OPEN_TIMEOUT))
            .build()
            .into();
        let mut req = agent.get(&url).header("accept", "text/event-stream");
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let resp = req
            .call()
            .map_err(|source| TailError::Http { url, source })?;
        let status = resp.status().as_u16();
        let reader = BufReader::new(resp.into_body().into_reader());
        if !(200..300).contains(&status) {
            let mut body = String::new();
            reader.take(MAX_LINE_BYTES).read_to_string(&mut body)?;
            let message = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or(body);
            return Err(TailError::Status { status, message });
        }
        Ok(EventStream { reader })
    }

    /// The next event's JSON (blocking until one comes), or `None` when the
    /// server ended the stream.
    pub fn next_event(&mut self) -> Result<Option<Value>, TailError> {
        // SSE: `data:` lines gather until a blank line ends the event;
        // lines starting with `:` are keep-alive comments; `event:` repeats
        // the JSON's own `event`.
        let mut data = String::new();
        loop {
            let mut line = String::new();
            let read = (&mut self.reader)
                .take(MAX_LINE_BYTES)
                .read_line(&mut line)?;
            if read == 0 {
                return Ok(None);
            }
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(rest) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
            } else if line.is_empty() && !data.is_empty() {
                return Ok(Some(
                    serde_json::from_str(&data).unwrap_or(Value::String(data)),
                ));
            }
        }
    }
}

/// One event as a line for people: time (UTC), event, id, name, queue,
/// and the attempt and error when there are.
pub fn human_line(event: &Value) -> String {
    let text = |field: &str| event.get(field).and_then(Value::as_str).unwrap_or("-");
    let at = event
        .get("at")
        .and_then(Value::as_i64)
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| "-".to_string(), |t| t.format("%H:%M:%S%.3f").to_string());
    let mut line = format!(
        "{at} {:<9} {} {} queue={}",
        text("event"),
        text("id"),
        text("name"),
        text("queue")
    );
    if let Some(attempt) = event.get("attempt").and_then(Value::as_u64) {
        line.push_str(&format!(" attempt={attempt}"));
    }
    if let Some(error) = event.get("error").and_then(Value::as_str) {
        line.push_str(&format!(" error={error:?}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encodes_the_filter() {
        let f = TailFilter {
            id: Some("a b&c".into()),
            event: Some("started,succeeded".into()),
            ..TailFilter::default()
        };
        assert_eq!(f.query(), "?id=a%20b%26c&event=started,succeeded");
        assert_eq!(TailFilter::default().query(), "");
    }

    #[test]
    fn human_line_shows_what_is_there() {
        let ev = serde_json::json!({"event":"failed","id":"t1","name":"n","queue":"q","attempt":2,"at":0,"error":"boom"});
        assert_eq!(
            human_line(&ev),
            "00:00:00.000 failed    t1 n queue=q attempt=2 error=\"boom\""
        );
    }
}
