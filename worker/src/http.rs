//! The worker's probes and metrics on `KAIROS_WORKER_HTTP_ADDR` (off when
//! unset; no token, so keep it on loopback or the pod network):
//!
//! * `GET /healthz`: 200 while the process runs (liveness).
//! * `GET /readyz`: 200 when the worker is connected to RabbitMQ, consumes
//!   each of its queues (a paused queue counts: it is not consumed on
//!   purpose) and every background loop runs; else 503 with a JSON body
//!   naming what does not. 503 too once shutdown began.
//! * `GET /metrics`: the process's metrics in the Prometheus text format
//!   (the same as `KAIROS_METRICS_ADDR` serves).
//!
//! Every answer comes from the process's own state, so a probe costs the
//! broker nothing. The listener is the small hyper server of
//! `kairos_shared::metrics`: no web framework in the worker.

use crate::control::Control;
use crate::prefetch::Consuming;
use kairos_shared::metrics::{Answer, Reply};
use kairos_shared::supervise::{Health, State};
use serde_json::json;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The setting that names the address.
pub(crate) const SETTING: &str = "KAIROS_WORKER_HTTP_ADDR";

/// The loop that holds the broker connection the consumers run on.
const SESSION_LOOP: &str = "amqp_session";

/// What `/readyz` looks at.
pub(crate) struct Probes {
    pub(crate) health: Health,
    pub(crate) consuming: Arc<Consuming>,
    pub(crate) control: Arc<Control>,
    pub(crate) queues: Vec<String>,
    /// Fired when shutdown begins.
    pub(crate) stopping: CancellationToken,
}

impl Probes {
    /// Serves the probes on `listener` until `stop` fires.
    pub(crate) fn serve(
        self,
        listener: std::net::TcpListener,
        stop: CancellationToken,
    ) -> Result<(), String> {
        let probes = Arc::new(self);
        let answer: Answer = Arc::new(move |path: &str| probes.answer(path));
        kairos_shared::metrics::serve(listener, answer, stop)
    }

    fn answer(&self, path: &str) -> Reply {
        match path {
            "/healthz" => Reply::json(200, &json!({"status": "ok"})),
            "/readyz" => self.readyz(),
            "/metrics" => Reply::metrics(),
            _ => kairos_shared::metrics::not_found(
                "the worker serves /healthz, /readyz and /metrics",
            ),
        }
    }

    fn readyz(&self) -> Reply {
        let loops = self.health.snapshot();
        let mut failing: Vec<String> = Vec::new();
        let mut reasons: Vec<String> = Vec::new();
        if self.stopping.is_cancelled() {
            failing.push("shutdown".into());
            reasons.push("the worker is shutting down".into());
        }
        match loops.get(SESSION_LOOP) {
            Some(l) if l.state == State::Running => {}
            Some(l) => {
                failing.push(SESSION_LOOP.into());
                let why = l.last_error.as_deref().unwrap_or("not running");
                reasons.push(format!("not connected to RabbitMQ: {why}"));
            }
            None => {
                failing.push(SESSION_LOOP.into());
                reasons.push("not connected to RabbitMQ yet".into());
            }
        }
        let down: Vec<String> = self
            .health
            .failing()
            .into_iter()
            .filter(|l| l != SESSION_LOOP)
            .collect();
        if !down.is_empty() {
            reasons.push(format!("background loops not running: {}", down.join(", ")));
            failing.extend(down);
        }
        let mut queues = serde_json::Map::new();
        let mut idle = Vec::new();
        for q in &self.queues {
            let state = if self.consuming.is_consuming(q) {
                "consuming"
            } else if self.control.is_paused(q) {
                "paused"
            } else {
                idle.push(q.clone());
                "not_consumed"
            };
            queues.insert(q.clone(), json!(state));
        }
        if !idle.is_empty() {
            reasons.push(format!("queues not consumed: {}", idle.join(", ")));
            failing.extend(idle.into_iter().map(|q| format!("queue:{q}")));
        }
        if failing.is_empty() {
            Reply::json(
                200,
                &json!({"status": "ready", "queues": queues, "loops": loops}),
            )
        } else {
            Reply::json(
                503,
                &json!({
                    "status": "unavailable",
                    "error": format!("not ready: {}", reasons.join("; ")),
                    "failing": failing,
                    "queues": queues,
                    "loops": loops,
                }),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes() -> Probes {
        let queues = vec!["a".to_string(), "b".to_string()];
        Probes {
            health: Health::new(),
            consuming: Arc::new(Consuming::default()),
            control: Control::new(&queues),
            queues,
            stopping: CancellationToken::new(),
        }
    }

    #[test]
    fn not_ready_before_the_session_runs() {
        let p = probes();
        let r = p.answer("/readyz");
        assert_eq!(r.status, 503);
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            body["failing"],
            json!(["amqp_session", "queue:a", "queue:b"])
        );
        assert!(
            body["error"].as_str().unwrap().contains("RabbitMQ"),
            "{body}"
        );
        assert_eq!(p.answer("/healthz").status, 200);
        assert_eq!(p.answer("/nope").status, 404);
    }

    #[tokio::test]
    async fn ready_when_connected_and_every_queue_is_consumed_or_paused() {
        let p = probes();
        let work = kairos_shared::supervise::Supervisor::new();
        work.start_loop(SESSION_LOOP, |cancel| async move {
            cancel.cancelled().await;
            Ok(())
        });
        let p = Probes {
            health: work.health().clone(),
            ..p
        };
        let _a = p.consuming.up("a");
        assert_eq!(p.answer("/readyz").status, 503, "b is not consumed");
        p.control
            .apply(kairos_shared::control::ControlMessage::Pause { queue: "b".into() });
        let r = p.answer("/readyz");
        assert_eq!(r.status, 200, "{}", r.body);
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["queues"], json!({"a": "consuming", "b": "paused"}));
        p.stopping.cancel();
        assert_eq!(p.answer("/readyz").status, 503, "shutting down");
        work.stop();
        work.wait().await;
    }
}
