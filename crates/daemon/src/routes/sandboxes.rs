//! `/v1/sandboxes...`

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::Json;
use forkvm_api::v1::{
    CameUp, CreateSandbox, ErrorBody, EventList, ExecRequest, ExecResponse, ForkRequest, ForkResponse, Sandbox,
    SandboxList, SandboxState, SandboxUp, TreeNode, HEADER_CAME_UP, HEADER_WAKE_MS,
};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::app::Shared;
use crate::auth::Caller;
use crate::db::{self, sandboxes};
use crate::error::{ApiError, ApiResult, Body};
use crate::ops::{self, fork, lifecycle};

/// Headers saying how the sandbox came up and how long it took.
pub fn up_headers(came: CameUp, ms: f64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HEADER_CAME_UP, HeaderValue::from_static(came.as_str()));
    if let Ok(v) = HeaderValue::from_str(&format!("{ms:.3}")) {
        h.insert(HEADER_WAKE_MS, v);
    }
    h
}

#[utoipa::path(post, path = "/v1/sandboxes", request_body = CreateSandbox, security(("bearer" = [])),
    responses((status = 201, body = Sandbox), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn create(
    State(app): State<Shared>,
    Caller(ws): Caller,
    Body(req): Body<CreateSandbox>,
) -> ApiResult<(StatusCode, HeaderMap, Json<Sandbox>)> {
    let sb = lifecycle::create(&app, &ws, req).await?;
    Ok((StatusCode::CREATED, up_headers(CameUp::Created, 0.0), Json(sb)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// creating, running, paused, hibernated, crashed
    state: Option<String>,
    name: Option<String>,
    template: Option<String>,
    parent: Option<String>,
    /// From the previous page's `next_cursor`.
    cursor: Option<String>,
    /// 1..=1000, default 100.
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/sandboxes", params(ListQuery), security(("bearer" = [])),
    responses((status = 200, body = SandboxList), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(app): State<Shared>,
    Caller(ws): Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<SandboxList>> {
    let Query(q) = q?;
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(SandboxState::parse(s).ok_or_else(|| ApiError::bad(format!("unknown state {s:?}")))?),
    };
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad("limit must be 1 to 1000"));
    }
    let cursor = match q.cursor.as_deref() {
        None => 0,
        Some(c) => c.parse::<i64>().map_err(|_| ApiError::bad(format!("bad cursor {c:?}")))?,
    };
    let f = sandboxes::Filter { state, name: q.name, template: q.template, parent: q.parent };
    let rows = sandboxes::list(&app.db.lock(), &ws, &f, cursor, limit + 1)?;
    let next_cursor = (rows.len() > limit).then(|| rows[limit - 1].rowid.to_string());
    Ok(Json(SandboxList { sandboxes: rows.into_iter().take(limit).map(|r| r.sb).collect(), next_cursor }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", security(("bearer" = [])),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
pub async fn get(State(app): State<Shared>, Caller(ws): Caller, Path(id): Path<String>) -> ApiResult<Json<Sandbox>> {
    Ok(Json(ops::visible(&app, &ws, &id)?.sb))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", security(("bearer" = [])),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete(State(app): State<Shared>, Caller(ws): Caller, Path(id): Path<String>) -> ApiResult<StatusCode> {
    ops::owned(&app, &ws, &id)?;
    lifecycle::delete(&app, &id, "api").await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", request_body = ExecRequest, security(("bearer" = [])),
    responses((status = 200, body = ExecResponse, headers(("x-forkvm-came-up" = String), ("x-forkvm-wake-ms" = String))),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 504, body = ErrorBody)))]
pub async fn exec(
    State(app): State<Shared>,
    Caller(ws): Caller,
    Path(id): Path<String>,
    Body(req): Body<ExecRequest>,
) -> ApiResult<(HeaderMap, Json<ExecResponse>)> {
    let r = lifecycle::exec(&app, &ws, &id, req).await?;
    Ok((up_headers(r.came_up, r.wake_ms), Json(r)))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", request_body = ForkRequest, security(("bearer" = [])),
    responses((status = 201, body = ForkResponse), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn fork_(
    State(app): State<Shared>,
    Caller(ws): Caller,
    Path(id): Path<String>,
    Body(req): Body<ForkRequest>,
) -> ApiResult<(StatusCode, HeaderMap, Json<ForkResponse>)> {
    let r = fork::fork(&app, &ws, &id, req).await?;
    Ok((StatusCode::CREATED, up_headers(CameUp::Forked, r.wake_ms), Json(r)))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", security(("bearer" = [])),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn pause(State(app): State<Shared>, Caller(ws): Caller, Path(id): Path<String>) -> ApiResult<Json<Sandbox>> {
    ops::owned(&app, &ws, &id)?;
    Ok(Json(lifecycle::pause(&app, &id, "api").await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/hibernate", security(("bearer" = [])),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn hibernate(
    State(app): State<Shared>,
    Caller(ws): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Sandbox>> {
    ops::owned(&app, &ws, &id)?;
    Ok(Json(lifecycle::hibernate(&app, &id, "api").await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", security(("bearer" = [])),
    responses((status = 200, body = SandboxUp), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn resume(
    State(app): State<Shared>,
    Caller(ws): Caller,
    Path(id): Path<String>,
) -> ApiResult<(HeaderMap, Json<SandboxUp>)> {
    let r = lifecycle::resume(&app, &ws, &id).await?;
    Ok((up_headers(r.came_up, r.wake_ms), Json(r)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/tree", security(("bearer" = [])),
    responses((status = 200, body = TreeNode), (status = 404, body = ErrorBody)))]
pub async fn tree(State(app): State<Shared>, Caller(ws): Caller, Path(id): Path<String>) -> ApiResult<Json<TreeNode>> {
    Ok(Json(fork::tree(&app, &ws, &id)?))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/events", security(("bearer" = [])),
    responses((status = 200, body = EventList), (status = 404, body = ErrorBody)))]
pub async fn events(
    State(app): State<Shared>,
    Caller(ws): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<EventList>> {
    let rec = ops::owned(&app, &ws, &id)?;
    let events = db::events::list(&app.db.lock(), &rec.sb.workspace, Some(&id), 0, 10_000)?;
    Ok(Json(EventList { events }))
}
