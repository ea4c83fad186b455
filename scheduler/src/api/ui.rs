//! The dashboard (docs/DASHBOARD.md): one HTML page at `/` and its assets
//! under `/ui/`, embedded in the binary. The page holds no data, so it is
//! served without the token (see `guard`); everything it shows it fetches
//! from the API with the token the user gives it.
//!
//! Every answer carries a strict Content-Security-Policy (scripts and
//! styles from this origin only, no inline script, no framing, fetches to
//! this origin only), `X-Content-Type-Options: nosniff` and
//! `X-Frame-Options: DENY`.

use axum::http::header::{self, HeaderName, HeaderValue};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// The page and its assets: (path, content type, content).
const FILES: [(&str, &str, &str); 4] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("ui/index.html"),
    ),
    (
        "/ui/app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "/ui/style.css",
        "text/css; charset=utf-8",
        include_str!("ui/style.css"),
    ),
    (
        "/ui/favicon.svg",
        "image/svg+xml",
        include_str!("ui/favicon.svg"),
    ),
];

/// The paths the page is served at: the guard lets GETs of these through
/// without the token.
pub(crate) fn is_page(path: &str) -> bool {
    FILES.iter().any(|(p, _, _)| *p == path)
}

/// What the page may load and do: only this origin's script, style, image
/// and fetches; no inline script or style, no plugins, no framing, no form
/// posting elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The routes of the page and its assets.
pub(crate) fn router() -> Router {
    let mut router = Router::new();
    for (path, content_type, body) in FILES {
        router = router.route(path, get(move || async move { serve(content_type, body) }));
    }
    router
}

fn serve(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    let headers: [(HeaderName, HeaderValue); 7] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        // A new binary serves a new page: the browser asks again each time.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    #[tokio::test]
    async fn serves_each_file_with_its_type_and_the_security_headers() {
        for (path, content_type, body) in FILES {
            let res = router()
                .oneshot(Request::get(path).body(Body::empty()).expect("request"))
                .await
                .expect("infallible");
            assert_eq!(res.status(), StatusCode::OK, "{path}");
            let h = res.headers();
            assert_eq!(h[header::CONTENT_TYPE], content_type, "{path}");
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
            let got = axum::body::to_bytes(res.into_body(), usize::MAX)
                .await
                .expect("body");
            assert_eq!(got, body.as_bytes(), "{path}");
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let html = FILES[0].2;
        assert!(html.contains(r#"<script src="/ui/app.js" defer></script>"#));
        assert_eq!(html.matches("<script").count(), 1, "one external script");
        assert!(!html.contains("<style") && !html.contains("style="));
        let handler = |w: &str| w.starts_with("on") && w.contains('=');
        assert!(
            !html.split_whitespace().any(handler),
            "no inline event handlers"
        );
        let js = FILES[1].2;
        for sink in [
            ".innerHTML",
            ".outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(
                !js.contains(sink),
                "app.js renders with textContent, not {sink}"
            );
        }
    }

    #[test]
    fn only_the_page_paths_are_the_page() {
        assert!(is_page("/") && is_page("/ui/app.js") && is_page("/ui/style.css"));
        assert!(!is_page("/ui/") && !is_page("/ui/x.js") && !is_page("/v1/dead"));
    }
}
