//! The OpenAPI document of the HTTP API, served at `GET /v1/openapi.json`
//! (docs/HTTP.md, "OpenAPI").
//!
//! Every route module builds a utoipa-axum `OpenApiRouter` with
//! `routes!(handler, ...)`: the method and path a handler is served at
//! come from its `#[utoipa::path]` attribute, the very attribute its
//! document entry is made from. So a route cannot be served without being
//! in the document, nor documented at a path it is not served at. A unit
//! test (below) checks that no module registers a route any other way.
//!
//! Everything here is built once, when the router is: serving the
//! document is handing out the same bytes.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::sync::{Arc, OnceLock};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Content, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The security scheme every route but the probes names: the bearer token
/// `KAIROS_API_TOKEN` (docs/HTTP.md, "Authentication"). `ApiDoc`'s
/// `security` spells it out (the macro takes a literal).
pub(crate) const BEARER: &str = "bearer";

/// The document's fixed part: title, tags, the bearer scheme. The paths
/// and their schemas are added by the routers merged into it.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Kairos HTTP API",
        description = "Enqueue tasks, follow their status and events, manage dead letters, \
            schedules and queues. Errors are JSON `{\"error\": ..., \"field\"?: ...}`. \
            Every POST, PUT and PATCH must send `Content-Type: application/json` (415 \
            otherwise). With `KAIROS_API_TOKEN` set, every route but `/healthz` and \
            `/readyz` needs `Authorization: Bearer <token>` (401 otherwise). See docs/HTTP.md."
    ),
    modifiers(&BearerToken),
    security(("bearer" = [])),
    components(schemas(ErrorBody)),
    tags(
        (name = "tasks", description = "Enqueue tasks; status, progress, checkpoints and results"),
        (name = "dead letters", description = "Tasks that exhausted their retries or failed for good"),
        (name = "schedules", description = "Recurring and one-shot schedules (docs/SCHEDULES.md)"),
        (name = "queues", description = "Queues: overview, pause and resume"),
        (name = "events", description = "Live lifecycle events (Server-Sent Events)"),
        (name = "probes", description = "Liveness, readiness and metrics; no token needed"),
        (name = "openapi", description = "This document"),
    )
)]
pub(crate) struct ApiDoc;

/// Adds the bearer scheme named [`BEARER`] to the components.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description =
            Some("KAIROS_API_TOKEN, when the scheduler has one; without it the API is open".into());
        components.add_security_scheme(BEARER, SecurityScheme::Http(scheme));
    }
}

/// The body of every error answer, as `super::json_error` makes it.
#[derive(ToSchema)]
#[schema(as = Error)]
// Only describes the JSON that `json_error` builds: never constructed.
#[allow(dead_code)]
pub(crate) struct ErrorBody {
    /// What is wrong, for a person.
    error: String,
    /// The request field, parameter or header at fault (400, 413, 415).
    field: Option<String>,
    /// The task or letter id concerned (409, some 404s).
    id: Option<String>,
    /// The task's state, when it forbids the request (409).
    state: Option<kairos_shared::status::TaskState>,
}

/// The document as served, filled in once the whole router is built.
#[derive(Clone, Default)]
pub(crate) struct Document(Arc<OnceLock<String>>);

impl Document {
    /// Sets the document from the merged routers' `doc`; later calls
    /// change nothing.
    pub(crate) fn set(&self, doc: &utoipa::openapi::OpenApi) {
        let text = doc
            .to_pretty_json()
            .unwrap_or_else(|e| format!(r#"{{"error": "cannot write the document: {e}"}}"#));
        let _ = self.0.set(text);
    }
}

/// The router of `GET /v1/openapi.json`, answering `doc` (empty until
/// [`Document::set`]).
pub(crate) fn router(doc: Document) -> OpenApiRouter {
    OpenApiRouter::default()
        .routes(routes!(openapi_json))
        .with_state(doc)
}

/// The API's routes together with their document at
/// `GET /v1/openapi.json`.
pub(crate) fn serve(routes: OpenApiRouter) -> axum::Router {
    let doc = Document::default();
    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes)
        .merge(router(doc.clone()))
        .split_for_parts();
    let mut openapi = openapi;
    add_guard_answers(&mut openapi);
    doc.set(&openapi);
    router
}

/// The answers of the guard (`super::guard`), which no handler lists: 401
/// on every operation that needs the token, 415 on every one that takes a
/// body (POST, PUT, PATCH).
fn add_guard_answers(openapi: &mut utoipa::openapi::OpenApi) {
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                Content::new(Some(Ref::from_schema_name("Error"))),
            )
            .build()
    };
    for item in openapi.paths.paths.values_mut() {
        let ops: [(&mut Option<Operation>, bool); 8] = [
            (&mut item.get, false),
            (&mut item.head, false),
            (&mut item.delete, false),
            (&mut item.options, false),
            (&mut item.trace, false),
            (&mut item.post, true),
            (&mut item.put, true),
            (&mut item.patch, true),
        ];
        for (op, takes_body) in ops {
            let Some(op) = op.as_mut() else { continue };
            // `security(())` marks the open probes; the rest inherit the
            // document's bearer requirement.
            if op.security.is_none() {
                op.responses.responses.insert(
                    "401".into(),
                    error("Missing or wrong token (`WWW-Authenticate: Bearer`)").into(),
                );
            }
            if takes_body {
                op.responses.responses.insert(
                    "415".into(),
                    error("The request does not declare `Content-Type: application/json`; `field` is `content-type`").into(),
                );
            }
        }
    }
}

/// This OpenAPI 3.1 document: every route of this scheduler, with its
/// parameters, bodies and answers.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
async fn openapi_json(State(doc): State<Document>) -> Response {
    let text = doc.0.get().cloned().unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registrations that bypass the document: files of this directory
    /// and what they may hold. Only the dashboard's page and its assets
    /// (HTML, JS, CSS for a browser, no API route).
    const ALLOWED: &[(&str, &str)] = &[("ui.rs", ".route("), ("ui.rs", "axum::routing::")];

    /// What registers a route on an axum `Router` (or on an
    /// `OpenApiRouter`, which passes them through undocumented).
    const BYPASSES: &[&str] = &[
        ".route(",
        ".route_service(",
        ".nest(",
        ".nest_service(",
        ".fallback(",
        ".fallback_service(",
        "axum::routing::",
        "OpenApiRouter::from(",
    ];

    #[test]
    fn every_route_goes_through_the_openapi_router() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
        let mut offences = Vec::new();
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).expect("src/api") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            files += 1;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let text = std::fs::read_to_string(&path).expect("read");
            // The unit tests at the end of a file build routers of their own.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (n, line) in code.lines().enumerate() {
                let line = line.trim_start();
                if line.starts_with("//") {
                    continue;
                }
                for bypass in BYPASSES {
                    if line.contains(bypass)
                        && !ALLOWED
                            .iter()
                            .any(|(f, what)| *f == name && line.contains(what))
                    {
                        offences.push(format!("{name}:{}: {line}", n + 1));
                    }
                }
            }
        }
        assert!(files >= 5, "read only {files} files of {}", dir.display());
        assert!(
            offences.is_empty(),
            "routes registered outside utoipa_axum::routes!() are missing from \
             /v1/openapi.json; give the handler #[utoipa::path] and register it with \
             .routes(routes!(handler)):\n{}",
            offences.join("\n")
        );
    }

    #[test]
    fn the_document_names_the_bearer_scheme_and_itself() {
        let (_, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
            .merge(router(Document::default()))
            .split_for_parts();
        let json = serde_json::to_value(&doc).expect("json");
        assert!(json["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")));
        assert_eq!(
            json["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        assert!(json["paths"]["/v1/openapi.json"]["get"].is_object());
        assert!(json["components"]["schemas"]["Error"].is_object());
    }

    /// An open route, as the probes are.
    #[utoipa::path(get, path = "/open", tag = "probes", security(()), responses((status = 200, description = "ok")))]
    async fn open() {}

    /// A route that takes a body, behind the token.
    #[utoipa::path(post, path = "/closed", tag = "tasks", responses((status = 200, description = "ok")))]
    async fn closed() {}

    #[test]
    fn the_guards_answers_are_listed() {
        let (_, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
            .routes(routes!(open))
            .routes(routes!(closed))
            .merge(router(Document::default()))
            .split_for_parts();
        add_guard_answers(&mut doc);
        let json = serde_json::to_value(&doc).expect("json");
        let answers = |path: &str, method: &str| -> Vec<String> {
            json["paths"][path][method]["responses"]
                .as_object()
                .map(|r| r.keys().cloned().collect())
                .unwrap_or_default()
        };
        assert_eq!(answers("/v1/openapi.json", "get"), ["200", "401"]);
        assert_eq!(answers("/open", "get"), ["200"]);
        assert_eq!(answers("/closed", "post"), ["200", "401", "415"]);
    }
}
