//! kairosctl: manage Kairos schedules, enqueue tasks and handle dead letters
//! through a scheduler's HTTP API (`KAIROS_HTTP_ADDR`). The library part is
//! the small blocking client the binary and the tests share.

use serde_json::Value;
use std::time::Duration;

/// A blocking client for `/v1/schedules`, `/v1/tasks` and `/v1/dead`.
pub struct Api {
    base: String,
    agent: ureq::Agent,
}

/// An HTTP answer: status and JSON body (`null` when empty).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl Api {
    /// `addr` is `host:port`, or a URL starting with `http://`.
    pub fn new(addr: &str) -> Self {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build();
        Api {
            base,
            agent: config.into(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/schedules{path}", self.base)
    }

    /// Enqueues a task (`POST /v1/tasks`, the JSON of
    /// `kairos_shared::request::TaskRequest`).
    pub fn enqueue(&self, task: &Value) -> Result<Reply, String> {
        let r = self
            .agent
            .post(&format!("{}/v1/tasks", self.base))
            .header("content-type", "application/json")
            .send(task.to_string().as_bytes());
        reply(r)
    }

    /// Up to `limit` dead letters, oldest first; nothing is removed.
    pub fn dead_list(&self, limit: usize) -> Result<Reply, String> {
        reply(
            self.agent
                .get(&format!("{}/v1/dead?limit={limit}", self.base))
                .call(),
        )
    }

    /// Replays the dead letters with these ids (all when empty).
    pub fn dead_replay(&self, ids: &[String]) -> Result<Reply, String> {
        let body = serde_json::json!({ "ids": ids }).to_string();
        let r = self
            .agent
            .post(&format!("{}/v1/dead/replay", self.base))
            .header("content-type", "application/json")
            .send(body.as_bytes());
        reply(r)
    }

    pub fn dead_purge(&self) -> Result<Reply, String> {
        reply(self.agent.delete(&format!("{}/v1/dead", self.base)).call())
    }

    pub fn put(&self, id: &str, spec: &Value) -> Result<Reply, String> {
        self.put_raw(id, spec.to_string().as_bytes())
    }

    /// Sends a body as is (tests send malformed JSON through this).
    pub fn put_raw(&self, id: &str, body: &[u8]) -> Result<Reply, String> {
        let r = self
            .agent
            .put(&self.url(&format!("/{}", encode(id))))
            .header("content-type", "application/json")
            .send(body);
        reply(r)
    }

    pub fn list(&self) -> Result<Reply, String> {
        reply(self.agent.get(&self.url("")).call())
    }

    pub fn get(&self, id: &str) -> Result<Reply, String> {
        reply(
            self.agent
                .get(&self.url(&format!("/{}", encode(id))))
                .call(),
        )
    }

    pub fn pause(&self, id: &str) -> Result<Reply, String> {
        reply(
            self.agent
                .post(&self.url(&format!("/{}/pause", encode(id))))
                .send_empty(),
        )
    }

    pub fn resume(&self, id: &str) -> Result<Reply, String> {
        reply(
            self.agent
                .post(&self.url(&format!("/{}/resume", encode(id))))
                .send_empty(),
        )
    }

    pub fn delete(&self, id: &str) -> Result<Reply, String> {
        reply(
            self.agent
                .delete(&self.url(&format!("/{}", encode(id))))
                .call(),
        )
    }
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Reply, String> {
    let mut resp = r.map_err(|e| format!("cannot reach the scheduler: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("reading the answer: {e}"))?;
    let body = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    Ok(Reply { status, body })
}

/// Percent-encodes what a schedule id may hold that a path may not; valid
/// ids need none, but a bad id must reach the server to be refused there.
fn encode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b':' | b'-' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
