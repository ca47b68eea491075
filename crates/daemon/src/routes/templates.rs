//! `/v1/templates...`: immutable snapshots that sandboxes are created from.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use forkvm_api::v1::{CreateTemplate, ErrorBody, Privacy, Template, TemplateList};

use crate::app::Shared;
use crate::auth::Caller;
use crate::db;
use crate::error::{ApiError, ApiResult, Body};
use crate::ops::fork;

#[utoipa::path(post, path = "/v1/templates", request_body = CreateTemplate, security(("bearer" = [])),
    responses((status = 201, body = Template), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create(
    State(app): State<Shared>,
    Caller(ws): Caller,
    Body(req): Body<CreateTemplate>,
) -> ApiResult<(StatusCode, Json<Template>)> {
    Ok((StatusCode::CREATED, Json(fork::create_template(&app, &ws, req).await?)))
}

#[utoipa::path(get, path = "/v1/templates", security(("bearer" = [])), responses((status = 200, body = TemplateList)))]
pub async fn list(State(app): State<Shared>, Caller(ws): Caller) -> ApiResult<Json<TemplateList>> {
    Ok(Json(TemplateList { templates: db::templates::list(&app.db.lock(), &ws)? }))
}

#[utoipa::path(delete, path = "/v1/templates/{id}", security(("bearer" = [])),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn delete(State(app): State<Shared>, Caller(ws): Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    fork::delete_template(&app, &ws, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/templates/{id}", security(("bearer" = [])),
    responses((status = 200, body = Template), (status = 404, body = ErrorBody)))]
pub async fn get(State(app): State<Shared>, Caller(ws): Caller, Path(id): Path<String>) -> ApiResult<Json<Template>> {
    db::templates::get(&app.db.lock(), &id)?
        .map(|(t, _)| t)
        .filter(|t| t.workspace == ws || t.privacy != Privacy::Private)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no template {id:?}")))
}
