//! kairosctl: manage Kairos schedules, enqueue tasks and handle dead letters
//! through a scheduler's HTTP API (`KAIROS_HTTP_ADDR`). The library part is
//! the small blocking client the binary and the tests share.

// Every public item is documented, and nothing is public that no other
// crate can reach (issue 15).
#![warn(missing_docs, unreachable_pub)]

use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

pub mod dead;
pub mod tail;

/// The longest one HTTP request may take, connecting included.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read in process: a dead-letter listing at its most.
const MAX_LOCAL_ANSWER_BYTES: usize = 64 << 20;

/// A blocking client for `/v1/schedules`, `/v1/tasks` and `/v1/dead`: over
/// HTTP to a scheduler, or in process straight to Redis and RabbitMQ.
pub struct Api {
    transport: Transport,
    /// Sent as `Authorization: Bearer` over HTTP.
    token: Option<String>,
}

enum Transport {
    Http {
        base: String,
        agent: ureq::Agent,
    },
    Local {
        runtime: tokio::runtime::Runtime,
        router: axum::Router,
    },
}

/// An HTTP answer: status and JSON body (`null` when empty).
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// The JSON answer (`null` when empty, a string when not JSON).
    pub body: Value,
}

impl Reply {
    /// A 2xx status.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The scheduler's base URL from `addr`: `host:port`, or a URL starting
/// with `http://` or `https://`.
fn base_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{addr}")
    }
}

impl Api {
    /// Over HTTP; `addr` is `host:port`, or a URL starting with `http://`.
    pub fn new(addr: &str) -> Self {
        let base = base_url(addr);
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(HTTP_TIMEOUT))
            .build();
        Api {
            transport: Transport::Http {
                base,
                agent: config.into(),
            },
            token: None,
        }
    }

    /// Sends `token` as the bearer token (the scheduler's
    /// `KAIROS_API_TOKEN`).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// In process: the scheduler's own routes over `config`'s Redis and
    /// RabbitMQ, so no scheduler needs to listen anywhere.
    pub fn local(config: &kairos_scheduler::Config) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        let router = runtime
            .block_on(kairos_scheduler::local_api(config))
            .map_err(|e| e.to_string())?;
        Ok(Api {
            transport: Transport::Local { runtime, router },
            token: None,
        })
    }

    /// One request; `path` starts with `/v1/` or `/healthz`.
    pub fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Reply, String> {
        match &self.transport {
            Transport::Http { base, agent } => {
                let url = format!("{base}{path}");
                let mut req = ureq::http::Request::builder()
                    .method(method)
                    .uri(&url)
                    .header("content-type", "application/json");
                if let Some(token) = &self.token {
                    req = req.header("authorization", format!("Bearer {token}"));
                }
                let req = req
                    .body(body.unwrap_or_default().to_vec())
                    .map_err(|e| format!("bad request {method} {path}: {e}"))?;
                reply(agent.run(req))
            }
            Transport::Local { runtime, router } => {
                use tower::ServiceExt;
                let req = axum::http::Request::builder()
                    .method(method)
                    .uri(path)
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(body.unwrap_or_default().to_vec()))
                    .map_err(|e| format!("bad request {method} {path}: {e}"))?;
                runtime.block_on(async {
                    let resp = router
                        .clone()
                        .oneshot(req)
                        .await
                        .map_err(|e| format!("{method} {path}: {e}"))?;
                    let status = resp.status().as_u16();
                    let bytes = axum::body::to_bytes(resp.into_body(), MAX_LOCAL_ANSWER_BYTES)
                        .await
                        .map_err(|e| format!("reading the answer: {e}"))?;
                    Ok(Reply {
                        status,
                        body: parse_body(&String::from_utf8_lossy(&bytes)),
                    })
                })
            }
        }
    }

    /// Creates or replaces schedule `id` (`PUT /v1/schedules/{id}`) with
    /// `spec` as JSON: a `ScheduleSpec`, or any JSON value.
    pub fn put<T: Serialize + ?Sized>(&self, id: &str, spec: &T) -> Result<Reply, String> {
        self.put_raw(id, &to_json(spec)?)
    }

    /// Sends a body as is (tests send malformed JSON through this).
    pub fn put_raw(&self, id: &str, body: &[u8]) -> Result<Reply, String> {
        self.send("PUT", &format!("/v1/schedules/{}", encode(id)), Some(body))
    }

    /// Every schedule (`GET /v1/schedules`).
    pub fn list(&self) -> Result<Reply, String> {
        self.send("GET", "/v1/schedules", None)
    }

    /// One schedule.
    pub fn get(&self, id: &str) -> Result<Reply, String> {
        self.send("GET", &format!("/v1/schedules/{}", encode(id)), None)
    }

    /// Pauses a schedule.
    pub fn pause(&self, id: &str) -> Result<Reply, String> {
        self.send("POST", &format!("/v1/schedules/{}/pause", encode(id)), None)
    }

    /// Resumes a schedule from its next tick.
    pub fn resume(&self, id: &str) -> Result<Reply, String> {
        self.send(
            "POST",
            &format!("/v1/schedules/{}/resume", encode(id)),
            None,
        )
    }

    /// Deletes a schedule.
    pub fn delete(&self, id: &str) -> Result<Reply, String> {
        self.send("DELETE", &format!("/v1/schedules/{}", encode(id)), None)
    }

    /// Enqueues a task (`POST /v1/tasks`): a
    /// `kairos_shared::template::TaskTemplate`, or any JSON value.
    pub fn enqueue<T: Serialize + ?Sized>(&self, task: &T) -> Result<Reply, String> {
        self.send("POST", "/v1/tasks", Some(&to_json(task)?))
    }

    /// Up to `limit` dead letters, oldest first; nothing is removed.
    pub fn dead_list(&self, limit: usize) -> Result<Reply, String> {
        self.send("GET", &format!("/v1/dead?limit={limit}"), None)
    }

    /// Replays the dead letters with these ids (all when empty).
    pub fn dead_replay(&self, ids: &[String]) -> Result<Reply, String> {
        self.send(
            "POST",
            "/v1/dead/replay",
            Some(&to_json(&ReplayRequest { ids })?),
        )
    }

    /// Deletes every dead letter.
    pub fn dead_purge(&self) -> Result<Reply, String> {
        self.send("DELETE", "/v1/dead", None)
    }
}

/// The body of `POST /v1/dead/replay`.
#[derive(Serialize)]
struct ReplayRequest<'a> {
    ids: &'a [String],
}

/// A request body as JSON bytes.
fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|e| format!("cannot encode the request: {e}"))
}

fn parse_body(text: &str) -> Value {
    if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(text).unwrap_or(Value::String(text.to_string()))
    }
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Reply, String> {
    let mut resp = r.map_err(|e| format!("cannot reach the scheduler: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("reading the answer: {e}"))?;
    Ok(Reply {
        status,
        body: parse_body(&text),
    })
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
