//! `GET /v1/images`: the kernel images this daemon boots (`forkvm serve --image`), by name.

use axum::extract::State;
use axum::Json;
use forkvm_api::v1::{ErrorBody, ImageList};

use crate::app::Shared;
use crate::auth::Caller;

#[utoipa::path(get, path = "/v1/images", security(("bearer" = [])),
    responses((status = 200, body = ImageList), (status = 401, body = ErrorBody)))]
pub async fn list(State(app): State<Shared>, Caller(_): Caller) -> Json<ImageList> {
    Json(ImageList { images: app.cfg.images.keys().cloned().collect() })
}
