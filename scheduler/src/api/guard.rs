//! What every HTTP request passes before it reaches a route:
//!
//! * the bearer token (`KAIROS_API_TOKEN`), when one is set: 401 without it
//!   or with another, on every path but the probes `/healthz` and `/readyz`
//!   (load balancers and orchestrators call those without credentials)
//!   and the GETs of the dashboard page and its assets (`ui`: they hold no
//!   data; the page asks the user for the token);
//! * a JSON content type on every POST, PUT and PATCH, even an empty one:
//!   a web page can make a browser send a cross-site POST with a form or
//!   text content type (or none) without asking the API first, but not one
//!   declared `application/json`. So a page a user of the API visits
//!   cannot make the browser enqueue tasks or replay dead letters. 415
//!   otherwise.

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use kairos_shared::secrets::{same_secret, Secret};
use serde_json::json;
use std::sync::Arc;

/// Paths served without a token.
const OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// `router` behind the checks above; `token` `None` leaves it open (the
/// content type is checked either way).
pub(crate) fn guard(router: Router, token: Option<Secret>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(Arc::new(token), check))
}

async fn check(State(token): State<Arc<Option<Secret>>>, req: Request, next: Next) -> Response {
    if let Some(token) = token.as_ref() {
        if !is_open(&req) && !authorized(&req, token) {
            return unauthorized();
        }
    }
    if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) && !is_json(&req) {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Json(json!({
                "error": "request bodies must be JSON: send Content-Type: application/json (also with an empty body)",
                "field": "content-type",
            })),
        )
            .into_response();
    }
    next.run(req).await
}

/// A probe, or a GET (or HEAD) of the dashboard page or an asset of it.
fn is_open(req: &Request) -> bool {
    let path = req.uri().path();
    OPEN_PATHS.contains(&path)
        || (matches!(*req.method(), Method::GET | Method::HEAD) && super::ui::is_page(path))
}

fn authorized(req: &Request, token: &Secret) -> bool {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    let Some((scheme, given)) = value.as_bytes().split_at_checked(7) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer ") && same_secret(given, token.expose().as_bytes())
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({
            "error": "missing or wrong token: send Authorization: Bearer <KAIROS_API_TOKEN>",
        })),
    )
        .into_response()
}

/// `application/json`, with parameters (`; charset=utf-8`) or not.
fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).expect("request")
    }

    async fn status(router: &Router, req: Request) -> u16 {
        use tower::ServiceExt;
        router
            .clone()
            .oneshot(req)
            .await
            .expect("infallible")
            .status()
            .as_u16()
    }

    fn app(token: Option<&str>) -> Router {
        let routes = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(|| async { "ok" }))
            .route("/v1/x", get(|| async { "x" }).post(|| async { "posted" }))
            .route("/", get(|| async { "page" }).post(|| async { "posted" }))
            .route("/ui/app.js", get(|| async { "js" }));
        guard(routes, token.map(Secret::new))
    }

    #[tokio::test]
    async fn a_token_guards_all_but_the_probes() {
        let app = app(Some("0123456789abcdef"));
        let json = ("content-type", "application/json");
        for (req, want) in [
            (request("GET", "/v1/x", &[]), 401),
            (
                request("GET", "/v1/x", &[("authorization", "Bearer nope")]),
                401,
            ),
            (
                request(
                    "GET",
                    "/v1/x",
                    &[("authorization", "Basic 0123456789abcdef")],
                ),
                401,
            ),
            (
                request(
                    "GET",
                    "/v1/x",
                    &[("authorization", "Bearer 0123456789abcdef")],
                ),
                200,
            ),
            (
                request(
                    "GET",
                    "/v1/x",
                    &[("authorization", "bearer 0123456789abcdef")],
                ),
                200,
            ),
            (request("POST", "/v1/x", &[json]), 401),
            (
                request(
                    "POST",
                    "/v1/x",
                    &[json, ("authorization", "Bearer 0123456789abcdef")],
                ),
                200,
            ),
            // Unknown paths tell a stranger nothing either.
            (request("GET", "/v1/nope", &[]), 401),
            (request("GET", "/healthz/", &[]), 401),
            (request("GET", "/%68ealthz", &[]), 401),
            (request("GET", "/healthz", &[]), 200),
            (request("GET", "/readyz", &[]), 200),
            // The dashboard page holds no data: served without the token.
            (request("GET", "/", &[]), 200),
            (request("GET", "/ui/app.js", &[]), 200),
            (request("POST", "/", &[json]), 401),
            (request("GET", "/ui/nope.js", &[]), 401),
            (request("GET", "/ui/../v1/x", &[]), 401),
        ] {
            let what = format!("{} {} {:?}", req.method(), req.uri(), req.headers());
            assert_eq!(status(&app, req).await, want, "{what}");
        }
    }

    #[tokio::test]
    async fn posts_must_declare_json() {
        let app = app(None);
        for (ct, want) in [
            (None, 415),
            (Some("text/plain"), 415),
            (Some("application/x-www-form-urlencoded"), 415),
            (Some("multipart/form-data; boundary=x"), 415),
            (Some("application/json"), 200),
            (Some("Application/JSON; charset=utf-8"), 200),
        ] {
            let headers: Vec<_> = ct.iter().map(|c| ("content-type", *c)).collect();
            assert_eq!(
                status(&app, request("POST", "/v1/x", &headers)).await,
                want,
                "{ct:?}"
            );
        }
        assert_eq!(status(&app, request("GET", "/v1/x", &[])).await, 200);
    }
}
