//! kairosctl: manage Kairos schedules, enqueue tasks and handle dead letters
//! through a scheduler's HTTP API (`KAIROS_HTTP_ADDR`). The library part is
//! the small blocking client the binary and the tests share.
//!
//! # Layout
//! * this file: [`Api`], one request at a time or many at once
//!   ([`Api::send_many`]), over HTTP or in process;
//! * `exit`: the exit codes scripts can rely on;
//! * `ops`: `task show|cancel|abort|list`, `queues`, `queue pause|resume`;
//! * `bulk`: `task add --file` (JSON lines, bounded concurrency, summary);
//! * `table`: the plain-text tables the human output uses;
//! * `tail`: following `/v1/events`.

// Every public item is documented, and nothing is public that no other
// crate can reach (issue 15).
#![warn(missing_docs, unreachable_pub)]

use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

pub mod dead;
pub mod tail;

pub mod bulk;
pub mod exit;
pub mod ops;
pub mod table;

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

/// Why a request got no answer. (An answer with an error status is a
/// [`Reply`], not this.)
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// Nothing was sent: the address, a setting or the request itself is
    /// wrong (exit code [`exit::USAGE`]).
    #[error("{0}")]
    Config(String),
    /// No answer came: the scheduler (over HTTP) or Redis (in process)
    /// cannot be reached, or the answer broke off (exit code
    /// [`exit::UNREACHABLE`]).
    #[error("{0}")]
    Unreachable(String),
}

impl CallError {
    /// The exit code this failure ends kairosctl with.
    pub fn exit_code(&self) -> u8 {
        match self {
            CallError::Config(_) => exit::USAGE,
            CallError::Unreachable(_) => exit::UNREACHABLE,
        }
    }
}

impl From<CallError> for String {
    fn from(e: CallError) -> Self {
        e.to_string()
    }
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

    /// The answer's `error` text, or the whole body when it has none.
    pub fn error_text(&self) -> String {
        match self.body.get("error").and_then(Value::as_str) {
            Some(e) => e.to_string(),
            None if self.body.is_null() => "(no body)".to_string(),
            None => match &self.body {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
        }
    }

    /// The exit code this answer ends kairosctl with ([`exit::for_status`]).
    pub fn exit_code(&self) -> u8 {
        exit::for_status(self.status)
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
    /// Over HTTP, after checking that `addr` makes a usable URL (a
    /// [`CallError::Config`] when not): `host:port`, or a URL starting with
    /// `http://` or `https://`.
    pub fn try_new(addr: &str) -> Result<Self, CallError> {
        let base = base_url(addr);
        let uri: ureq::http::Uri = format!("{base}/v1/")
            .parse()
            .map_err(|e| CallError::Config(format!("KAIROS_HTTP_ADDR {addr:?}: {e}")))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(CallError::Config(format!(
                "KAIROS_HTTP_ADDR {addr:?}: no host (use host:port or http://host:port)"
            )));
        }
        Ok(Api::new(addr))
    }

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
        Self::connect_local(config).map_err(String::from)
    }

    /// As [`Api::local`], telling a wrong setting ([`CallError::Config`])
    /// from a Redis that cannot be reached ([`CallError::Unreachable`]).
    pub fn connect_local(config: &kairos_scheduler::Config) -> Result<Self, CallError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CallError::Config(format!("cannot start a runtime: {e}")))?;
        let router = runtime
            .block_on(kairos_scheduler::local_api(config))
            .map_err(local_error)?;
        Ok(Api {
            transport: Transport::Local { runtime, router },
            token: None,
        })
    }

    /// One request; `path` starts with `/v1/` or `/healthz`. An `Err` means
    /// no answer came (see [`Api::request`]).
    pub fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Reply, String> {
        self.request(method, path, body).map_err(String::from)
    }

    /// One request, telling why no answer came when none did.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply, CallError> {
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
                    .map_err(|e| CallError::Config(format!("bad request {method} {path}: {e}")))?;
                reply(agent.run(req))
            }
            Transport::Local { runtime, router } => {
                use tower::ServiceExt;
                let req = local_request(method, path, body.unwrap_or_default().to_vec())?;
                let what = format!("{method} {path}");
                runtime.block_on(async {
                    local_answer(router.clone().oneshot(req).await, &what).await
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

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Reply, CallError> {
    let mut resp =
        r.map_err(|e| CallError::Unreachable(format!("cannot reach the scheduler: {e}")))?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| CallError::Unreachable(format!("reading the answer: {e}")))?;
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

/// Why the in-process routes could not be set up: a setting (exit 2) or a
/// Redis that does not answer (exit 3).
fn local_error(e: kairos_scheduler::SchedulerError) -> CallError {
    use kairos_scheduler::delay::store::QueueError;
    use kairos_scheduler::SchedulerError;
    match &e {
        SchedulerError::Queue(QueueError::Pool(_)) => CallError::Unreachable(e.to_string()),
        SchedulerError::Queue(QueueError::Redis(r))
            if r.is_io_error()
                || r.is_timeout()
                || r.is_connection_refusal()
                || r.is_connection_dropped() =>
        {
            CallError::Unreachable(format!("cannot reach Redis: {e}"))
        }
        _ => CallError::Config(e.to_string()),
    }
}

/// Percent-encodes a query parameter's value (unreserved characters kept).
fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What `GET /v1/tasks` is asked for (each `None` leaves it to the server).
#[derive(Debug, Default, Clone)]
pub struct TaskQuery {
    /// Only tasks in this state.
    pub state: Option<String>,
    /// Only tasks of this logical queue.
    pub queue: Option<String>,
    /// Only tasks of this name.
    pub name: Option<String>,
    /// At most this many (the server takes 1 to 1000, 100 by default).
    pub limit: Option<u32>,
    /// Where the previous page ended (its `next_cursor`).
    pub cursor: Option<String>,
}

impl TaskQuery {
    /// The path with its query string, percent-encoded.
    fn path(&self) -> String {
        let limit = self.limit.map(|l| l.to_string());
        let pairs: Vec<String> = [
            ("state", self.state.as_ref()),
            ("queue", self.queue.as_ref()),
            ("name", self.name.as_ref()),
            ("limit", limit.as_ref()),
            ("cursor", self.cursor.as_ref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode_query(v))))
        .collect();
        if pairs.is_empty() {
            "/v1/tasks".to_string()
        } else {
            format!("/v1/tasks?{}", pairs.join("&"))
        }
    }
}

/// The task status and queue routes (docs/HTTP.md), each telling why no
/// answer came when none did.
impl Api {
    /// A task's state, timeline, progress and result
    /// (`GET /v1/tasks/{id}`; 404 when unknown or expired).
    pub fn task_get(&self, id: &str) -> Result<Reply, CallError> {
        self.request("GET", &format!("/v1/tasks/{}", encode(id)), None)
    }

    /// Cancels a task waiting in the delay queue (`DELETE /v1/tasks/{id}`;
    /// 409 with its state when it is past waiting).
    pub fn task_cancel(&self, id: &str) -> Result<Reply, CallError> {
        self.request("DELETE", &format!("/v1/tasks/{}", encode(id)), None)
    }

    /// Aborts a running task, or cancels a waiting one
    /// (`POST /v1/tasks/{id}/abort`).
    pub fn task_abort(&self, id: &str) -> Result<Reply, CallError> {
        self.request("POST", &format!("/v1/tasks/{}/abort", encode(id)), None)
    }

    /// Recent tasks, newest first (`GET /v1/tasks`).
    pub fn task_list(&self, query: &TaskQuery) -> Result<Reply, CallError> {
        self.request("GET", &query.path(), None)
    }

    /// Every logical queue with its depths and rates (`GET /v1/queues`).
    pub fn queues(&self) -> Result<Reply, CallError> {
        self.request("GET", "/v1/queues", None)
    }

    /// Workers stop taking from queue `name`
    /// (`POST /v1/queues/{name}/pause`).
    pub fn queue_pause(&self, name: &str) -> Result<Reply, CallError> {
        self.request("POST", &format!("/v1/queues/{}/pause", encode(name)), None)
    }

    /// Workers take from queue `name` again
    /// (`POST /v1/queues/{name}/resume`).
    pub fn queue_resume(&self, name: &str) -> Result<Reply, CallError> {
        self.request("POST", &format!("/v1/queues/{}/resume", encode(name)), None)
    }

    /// Sends every request `requests` yields, at most `concurrency` at
    /// once, calling `done` with each one's key and outcome as it comes
    /// (in completion order, on the calling thread). `requests` is pulled
    /// only as fast as answers come, so a long input is never held whole;
    /// it stops being pulled once `stop` returns true (checked after each
    /// answer).
    pub fn send_many<K, I>(
        &self,
        method: &str,
        path: &str,
        requests: I,
        concurrency: usize,
        mut done: impl FnMut(K, Result<Reply, CallError>),
        stop: impl Fn() -> bool + Sync,
    ) where
        K: Send,
        I: Iterator<Item = (K, Vec<u8>)> + Send,
    {
        let concurrency = concurrency.max(1);
        match &self.transport {
            Transport::Http { .. } => {
                let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<(K, Vec<u8>)>(concurrency);
                let job_rx = std::sync::Mutex::new(job_rx);
                let (done_tx, done_rx) = std::sync::mpsc::channel();
                std::thread::scope(|s| {
                    for _ in 0..concurrency {
                        let done_tx = done_tx.clone();
                        let job_rx = &job_rx;
                        s.spawn(move || loop {
                            // The lock is held only to take the next job.
                            let job = match job_rx.lock() {
                                Ok(rx) => rx.recv(),
                                Err(_) => return,
                            };
                            let Ok((key, body)) = job else { return };
                            let outcome = self.request(method, path, Some(&body));
                            if done_tx.send((key, outcome)).is_err() {
                                return;
                            }
                        });
                    }
                    drop(done_tx);
                    let stop = &stop;
                    s.spawn(move || {
                        let mut requests = requests;
                        // `stop` is asked before a request is taken, so
                        // every request taken is sent and answered.
                        while !stop() {
                            let Some(job) = requests.next() else { break };
                            if job_tx.send(job).is_err() {
                                break;
                            }
                        }
                    });
                    for (key, outcome) in done_rx {
                        done(key, outcome);
                    }
                });
            }
            Transport::Local { runtime, router } => {
                use tower::ServiceExt;
                let mut requests = requests;
                runtime.block_on(async {
                    let mut running = tokio::task::JoinSet::new();
                    let mut keys = std::collections::HashMap::new();
                    let mut more = true;
                    loop {
                        while more && running.len() < concurrency && !stop() {
                            let Some((key, body)) = requests.next() else {
                                more = false;
                                break;
                            };
                            let router = router.clone();
                            let what = format!("{method} {path}");
                            let req = local_request(method, path, body);
                            let handle = running.spawn(async move {
                                local_answer(router.oneshot(req?).await, &what).await
                            });
                            keys.insert(handle.id(), key);
                        }
                        let outcome = match running.join_next_with_id().await {
                            None => break,
                            Some(Ok((id, outcome))) => (id, outcome),
                            // A request that panicked fails alone.
                            Some(Err(e)) => (
                                e.id(),
                                Err(CallError::Unreachable(format!("the request failed: {e}"))),
                            ),
                        };
                        if let Some(key) = keys.remove(&outcome.0) {
                            done(key, outcome.1);
                        }
                    }
                });
            }
        }
    }
}

/// An in-process request.
fn local_request(
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<axum::http::Request<axum::body::Body>, CallError> {
    axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .map_err(|e| CallError::Config(format!("bad request {method} {path}: {e}")))
}

/// The in-process answer: status and body.
async fn local_answer(
    resp: Result<axum::response::Response, std::convert::Infallible>,
    what: &str,
) -> Result<Reply, CallError> {
    let resp = resp.map_err(|e| CallError::Unreachable(format!("{what}: {e}")))?;
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), MAX_LOCAL_ANSWER_BYTES)
        .await
        .map_err(|e| CallError::Unreachable(format!("reading the answer: {e}")))?;
    Ok(Reply {
        status,
        body: parse_body(&String::from_utf8_lossy(&bytes)),
    })
}
