//! Bearer tokens: `Authorization: Bearer fkv_...` names the caller's workspace.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::app::Shared;
use crate::error::ApiError;

/// The workspace a request acts for.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

impl FromRequestParts<Shared> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Shared) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token> (forkvm token create)"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
        let ws = crate::db::tokens::workspace_of(&app.db.lock(), token)?;
        ws.map(Caller).ok_or_else(|| ApiError::unauthorized("unknown token"))
    }
}
