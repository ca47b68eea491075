//! `/v1/preview` and `/v1/sandboxes/{id}/ports/{port}/preview`: where the preview proxy listens,
//! and links (with a preview token for private sandboxes) that the console opens.

use axum::extract::{Path, State};
use axum::Json;
use forkvm_api::v1::{ErrorBody, PreviewInfo, PreviewLink, Privacy, PREVIEW_TOKEN};

use crate::app::Shared;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::ops;

#[utoipa::path(get, path = "/v1/preview", security(("bearer" = [])), responses((status = 200, body = PreviewInfo)))]
pub async fn info(State(app): State<Shared>, Caller(_): Caller) -> Json<PreviewInfo> {
    let run = app.preview.get();
    Json(PreviewInfo {
        listen: run.map(|r| r.addr.to_string()),
        domain: run.map_or_else(|| "localhost".to_string(), |r| r.domain.clone()),
    })
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/ports/{port}/preview", security(("bearer" = [])),
    responses((status = 200, body = PreviewLink), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn link(
    State(app): State<Shared>,
    Caller(ws): Caller,
    Path((id, port)): Path<(String, u16)>,
) -> ApiResult<Json<PreviewLink>> {
    let rec = ops::visible(&app, &ws, &id)?;
    if port == 0 {
        return Err(ApiError::bad("port must be 1 to 65535"));
    }
    let run = app
        .preview
        .get()
        .ok_or_else(|| ApiError::conflict("this daemon serves no previews (start it with --preview-listen ADDR)"))?;
    let host = format!("{}:{}", run.domain, run.addr.port());
    let base = format!("http://{id}-{port}.{host}/");
    let path_base = format!("http://{host}/preview/{id}/{port}/");
    Ok(Json(if rec.sb.privacy == Privacy::Private {
        let t = run.minter.mint(&id);
        let q = format!("?{PREVIEW_TOKEN}={t}");
        PreviewLink { url: format!("{base}{q}"), path_url: format!("{path_base}{q}"), token: Some(t) }
    } else {
        PreviewLink { url: base, path_url: path_base, token: None }
    }))
}
