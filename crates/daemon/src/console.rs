//! The web console at `/`: one HTML page, one stylesheet and one ES module from
//! `crates/daemon/console/`, embedded in the binary (no CDN, works offline). The page holds no
//! data: it asks for a workspace token and then uses the same `/v1` API as every other client.

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::app::Shared;

const INDEX: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const STYLE: &str = include_str!("../console/style.css");

/// Scripts and styles only from this origin; no inline script, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; \
                   img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, content_type),
            (CONTENT_SECURITY_POLICY, CSP),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// `/`, `/console/app.js`, `/console/style.css`.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/console/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/console/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
}
