//! The HTTP surface: the `/v1` router, `/metrics`, and the OpenAPI document built from the
//! handlers' annotations.

pub mod events;
pub mod images;
pub mod memory;
mod openapi_bounds;
pub mod preview;
pub mod repos;
pub mod sandboxes;
pub mod templates;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use forkvm_api::v1::SandboxState;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::app::Shared;
use crate::error::ApiError;
use openapi_bounds::BoundsResponses;

#[derive(OpenApi)]
#[openapi(
    info(title = "forkvm daemon API", version = "1", description = "Sandboxes as a service: `forkvm serve`."),
    paths(
        sandboxes::create, sandboxes::list, sandboxes::get, sandboxes::delete, sandboxes::exec, sandboxes::fork_,
        sandboxes::pause, sandboxes::hibernate, sandboxes::resume, sandboxes::tree, sandboxes::events,
        templates::create, templates::list, templates::get, templates::delete, images::list, events::stream, memory::memory, repos::create, repos::open,
        crate::webhook::github, metrics, preview::info, preview::link
    ),
    modifiers(&Bearer, &BoundsResponses)
)]
#[derive(Debug)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let comps = openapi.components.get_or_insert_with(Default::default);
        comps.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document as committed in docs/openapi.json.
pub fn openapi_json() -> String {
    let mut s = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}

pub fn router(app: Shared) -> Router {
    let max_body = app.cfg.max_body;
    Router::new()
        .route("/v1/sandboxes", post(sandboxes::create).get(sandboxes::list))
        .route("/v1/sandboxes/{id}", get(sandboxes::get).delete(sandboxes::delete))
        .route("/v1/sandboxes/{id}/exec", post(sandboxes::exec))
        .route("/v1/sandboxes/{id}/fork", post(sandboxes::fork_))
        .route("/v1/sandboxes/{id}/pause", post(sandboxes::pause))
        .route("/v1/sandboxes/{id}/hibernate", post(sandboxes::hibernate))
        .route("/v1/sandboxes/{id}/resume", post(sandboxes::resume))
        .route("/v1/sandboxes/{id}/tree", get(sandboxes::tree))
        .route("/v1/sandboxes/{id}/events", get(sandboxes::events))
        .route("/v1/sandboxes/{id}/ports/{port}/preview", post(preview::link))
        .route("/v1/preview", get(preview::info))
        .route("/v1/templates", post(templates::create).get(templates::list))
        .route("/v1/templates/{id}", get(templates::get).delete(templates::delete))
        .route("/v1/images", get(images::list))
        .route("/v1/events", get(events::stream))
        .route("/v1/memory", get(memory::memory))
        .route("/v1/repos", post(repos::create))
        .route("/v1/repos/{owner}/{name}/pulls/{number}/open", post(repos::open))
        .route("/v1/hooks/github", post(crate::webhook::github))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .merge(crate::console::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}

async fn openapi() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], openapi_json())
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "OpenMetrics text (Prometheus scrapes it)",
    content_type = "application/openmetrics-text")))]
async fn metrics(State(app): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let (by_state, live) = {
        let c = app.db.lock();
        let by_state = crate::db::sandboxes::count_by_state(&c)?;
        let live = crate::db::sandboxes::in_states(&c, &[SandboxState::Running, SandboxState::Paused])?;
        (by_state, live)
    };
    let pids = live.iter().filter_map(|r| r.sb.pid).collect::<Vec<_>>();
    // Page servers: ask every live VMM (concurrently, briefly) for its counters.
    let asks = live.iter().map(|r| {
        let app = app.clone();
        let id = r.sb.id.clone();
        async move {
            let st = app.vmms.call(&id, forkvm_api::vm::Status {}, std::time::Duration::from_millis(500)).await.ok()?;
            Some((st.pid, st.page_server?))
        }
    });
    let servers: Vec<_> = futures_util::future::join_all(asks).await.into_iter().flatten().collect();
    app.metrics.observe_page_servers(&servers);
    let text = app.metrics.render(&by_state, &pids);
    // prometheus-client writes OpenMetrics (`x_total` samples under `# TYPE x counter`, `# EOF`):
    // declared as Prometheus' 0.0.4 text, its counters would be read as untyped.
    Ok(([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn committed_openapi_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        let generated = super::openapi_json();
        assert!(generated.contains("\"openapi\": \"3.1"), "not OpenAPI 3.1");
        assert!(
            committed == generated,
            "docs/openapi.json differs from the code: run `cargo run -p forkvm -- serve --openapi > docs/openapi.json`"
        );
    }
}
