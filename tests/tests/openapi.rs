//! `GET /v1/openapi.json` (docs/HTTP.md, "OpenAPI"): an OpenAPI 3 document
//! that lists every route a user relies on, behind the token like the
//! rest, and names nothing the scheduler does not serve.

use kairos_shared::secrets::Secret;
use kairos_tests::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::time::Duration;

const TOKEN: &str = "openapi-token-0123456789abcdef";

/// Every route docs/HTTP.md names (and docs/SCHEDULES.md for the
/// schedules): a user relies on each, so each must be in the document.
const DOCUMENTED: &[(&str, &str)] = &[
    ("post", "/v1/tasks"),
    ("get", "/v1/tasks"),
    ("get", "/v1/tasks/{id}"),
    ("delete", "/v1/tasks/{id}"),
    ("post", "/v1/tasks/{id}/abort"),
    ("put", "/v1/tasks/{id}/checkpoint"),
    ("get", "/v1/tasks/{id}/checkpoint"),
    ("put", "/v1/tasks/{id}/progress"),
    ("put", "/v1/tasks/{id}/result"),
    ("get", "/v1/dead"),
    ("delete", "/v1/dead"),
    ("get", "/v1/dead/{id}"),
    ("post", "/v1/dead/replay"),
    ("get", "/v1/events"),
    ("get", "/v1/queues"),
    ("post", "/v1/queues/{name}/pause"),
    ("post", "/v1/queues/{name}/resume"),
    ("get", "/v1/schedules"),
    ("get", "/v1/schedules/{id}"),
    ("put", "/v1/schedules/{id}"),
    ("delete", "/v1/schedules/{id}"),
    ("post", "/v1/schedules/{id}/pause"),
    ("post", "/v1/schedules/{id}/resume"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
];

/// The routes docs/HTTP.md and docs/SCHEDULES.md name as `` `METHOD
/// /path` ``, lowercase method first, so [`DOCUMENTED`] cannot fall behind
/// the docs. The dashboard page (`/`, `/ui/...`) is no API route.
fn routes_named_in_docs() -> Vec<(String, String)> {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut found = Vec::new();
    for file in ["HTTP.md", "SCHEDULES.md"] {
        let text = std::fs::read_to_string(docs.join(file)).expect("read the docs");
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            for (at, _) in text.match_indices(&format!("`{method} /")) {
                let rest = &text[at + method.len() + 2..];
                let quoted = &rest[..rest.find('`').unwrap_or(rest.len())];
                let path = quoted
                    .split('?')
                    .next()
                    .unwrap_or_default()
                    .replace("\\|", "|");
                let path = path
                    .split('/')
                    .map(|seg| if seg == "ID" { "{id}" } else { seg })
                    .collect::<Vec<_>>()
                    .join("/");
                // `.../pause|resume`: both.
                let (head, last) = path.rsplit_once('/').unwrap_or(("", &path));
                for alt in last.split('|') {
                    let path = format!("{head}/{alt}");
                    if path != "/" && !path.starts_with("/ui/") {
                        found.push((method.to_ascii_lowercase(), path));
                    }
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The HTTP methods an OpenAPI path item may hold.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// One HTTP/1.0 request to 127.0.0.1:`port`: the status, and the body
/// unless the answer is a 200 (which may be an endless event stream: only
/// its head is read).
fn request(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let body = if matches!(method, "POST" | "PUT" | "PATCH") {
        "{}"
    } else {
        ""
    };
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).expect("read the head") {
            0 => break,
            _ => head.push(byte[0]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line in {head:?}"));
    let mut rest = String::new();
    if status != 200 || !head.to_ascii_lowercase().contains("text/event-stream") {
        s.read_to_string(&mut rest).expect("read the body");
    }
    (status, rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_route_and_names_only_served_ones() {
    let env = TestEnv::new("openapi").await;
    let addr = free_addr();
    let mut sc = env.scheduler_config();
    sc.http_addr = addr;
    sc.api_token = Some(Secret::new(TOKEN));
    let scheduler = InProcess::scheduler(sc);
    let port = addr.port();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while http_get(port, "/healthz").map(|r| r.0) != Some(200) {
        assert!(tokio::time::Instant::now() < deadline, "no scheduler");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Behind the token like every route but the probes.
    let (status, _) = request(port, "GET", "/v1/openapi.json", None);
    assert_eq!(status, 401);
    let (status, text) = request(port, "GET", "/v1/openapi.json", Some(TOKEN));
    assert_eq!(status, 200, "{text}");
    let doc: Value = serde_json::from_str(&text).expect("the document is JSON");
    let version = doc["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3."), "OpenAPI 3.x, not {version:?}");
    assert!(doc["info"]["title"].is_string());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );

    let paths = doc["paths"].as_object().expect("paths");
    let mut operations = Vec::new();
    for (path, item) in paths {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                operations.push((method.to_string(), path.clone(), op.clone()));
            }
        }
    }
    for (method, path) in routes_named_in_docs() {
        assert!(
            DOCUMENTED.contains(&(method.as_str(), path.as_str())),
            "the docs name {method} {path}: add it to DOCUMENTED"
        );
    }
    for (method, path) in DOCUMENTED {
        assert!(
            operations.iter().any(|(m, p, _)| m == method && p == path),
            "{method} {path} is missing from the document"
        );
    }
    let mut ids: Vec<&str> = operations
        .iter()
        .filter_map(|(_, _, op)| op["operationId"].as_str())
        .collect();
    assert_eq!(
        ids.len(),
        operations.len(),
        "an operation without operationId"
    );
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), operations.len(), "operationIds must be unique");
    for (method, path, op) in &operations {
        let what = format!("{method} {path}");
        assert!(
            op["responses"].as_object().is_some_and(|r| !r.is_empty()),
            "{what} documents no answer"
        );
        assert!(
            op["tags"].as_array().is_some_and(|t| !t.is_empty()),
            "{what} has no tag"
        );
        // Path parameters are declared, so clients can fill them in.
        for name in path.split('{').skip(1).filter_map(|s| s.split('}').next()) {
            let declared = op["parameters"].as_array().is_some_and(|ps| {
                ps.iter()
                    .any(|p| p["name"] == name && p["in"] == "path" && p["required"] == true)
            });
            assert!(declared, "{what}: path parameter {name} is not declared");
        }
        // Open probes say so; the rest inherit the bearer requirement.
        let open = op["security"].as_array().is_some_and(|s| {
            s.iter()
                .any(|r| r.as_object().is_some_and(|o| o.is_empty()))
        });
        assert_eq!(
            open,
            matches!(path.as_str(), "/healthz" | "/readyz"),
            "{what}: security {}",
            op["security"]
        );
    }

    // Every operation of the document is served: whatever the route makes
    // of a made-up id and an empty body, it is not axum's bodiless 404 or
    // 405 for a route it does not have.
    for (method, path, _) in &operations {
        let concrete: String = path
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') {
                    "openapi-probe"
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        let m = method.to_ascii_uppercase();
        let (status, body) = request(port, &m, &concrete, Some(TOKEN));
        assert_ne!(status, 405, "{m} {concrete}: not served ({body})");
        if status == 404 {
            let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            assert!(
                json["error"].is_string(),
                "{m} {concrete}: 404 without a JSON error, so no route: {body:?}"
            );
        }
    }
    // What the check tells apart: a route the server lacks gets a bodiless
    // 404, a method it lacks on a known path a bodiless 405.
    let (status, body) = request(port, "GET", "/v1/no-such-route", Some(TOKEN));
    assert_eq!((status, body.as_str()), (404, ""));
    let (status, body) = request(port, "PATCH", "/v1/schedules", Some(TOKEN));
    assert_eq!((status, body.as_str()), (405, ""));

    scheduler.stop().await;
}
