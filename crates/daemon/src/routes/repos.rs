//! `/v1/repos...`: repositories whose pull requests get preloaded sandboxes.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use forkvm_api::v1::{CreateRepo, ErrorBody, Privacy, PullSandbox, Repo};

use crate::app::Shared;
use crate::auth::Caller;
use crate::db::{self, repos};
use crate::error::{ApiError, ApiResult, Body};
use crate::ops::lifecycle;

fn check_repo(r: &str) -> ApiResult<()> {
    let ok = |s: &str| {
        !s.is_empty() && s.len() <= 100 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    match r.split_once('/') {
        Some((o, n)) if ok(o) && ok(n) => Ok(()),
        _ => Err(ApiError::bad(format!("repo must be owner/name, not {r:?}"))),
    }
}

#[utoipa::path(post, path = "/v1/repos", request_body = CreateRepo, security(("bearer" = [])),
    responses((status = 201, body = Repo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create(
    State(app): State<Shared>,
    Caller(ws): Caller,
    Body(req): Body<CreateRepo>,
) -> ApiResult<(StatusCode, Json<Repo>)> {
    check_repo(&req.repo)?;
    if req.secret.is_empty() || req.secret.len() > 256 {
        return Err(ApiError::bad("secret must be 1 to 256 bytes"));
    }
    if req.setup.as_ref().is_some_and(|s| s.len() > 4096 || s.contains(['\n', '\r'])) {
        return Err(ApiError::bad("setup must be one line of at most 4096 bytes"));
    }
    let c = app.db.lock();
    db::templates::get(&c, &req.template)?
        .filter(|(t, _)| t.workspace == ws || t.privacy != Privacy::Private)
        .ok_or_else(|| ApiError::not_found(format!("no template {:?}", req.template)))?;
    if let Some((r, _)) = repos::get(&c, &req.repo)? {
        if r.workspace != ws {
            return Err(ApiError::conflict(format!("repo {} is registered by another workspace", req.repo)));
        }
    }
    let repo = Repo { repo: req.repo, workspace: ws, template: req.template, setup: req.setup };
    repos::upsert(&c, &repo, &req.secret)?;
    Ok((StatusCode::CREATED, Json(repo)))
}

#[utoipa::path(post, path = "/v1/repos/{owner}/{name}/pulls/{number}/open", security(("bearer" = [])),
    responses((status = 200, body = PullSandbox), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn open(
    State(app): State<Shared>,
    Caller(ws): Caller,
    Path((owner, name, number)): Path<(String, String, u64)>,
) -> ApiResult<(HeaderMap, Json<PullSandbox>)> {
    let repo = format!("{owner}/{name}");
    let (r, sb, sha) = {
        let c = app.db.lock();
        // Another workspace's repo answers as one that does not exist.
        let (r, _) = repos::get(&c, &repo)?
            .filter(|(r, _)| r.workspace == ws)
            .ok_or_else(|| ApiError::not_found(format!("no repo {repo} in this workspace (forkvm repo add)")))?;
        let (sb, sha) = repos::pull(&c, &repo, number)?.ok_or_else(|| {
            ApiError::not_found(format!(
                "no sandbox for {repo}#{number}: one is made when GitHub's pull_request webhook (opened, reopened, \
                 synchronize) for it reaches POST /v1/hooks/github, and deleted when it is closed"
            ))
        })?;
        (r, sb, sha)
    };
    let up = lifecycle::up(&app, &sb).await?;
    let h = super::sandboxes::up_headers(up.came_up, up.wake_ms);
    Ok((
        h,
        Json(PullSandbox {
            repo: r.repo,
            number,
            head_sha: sha,
            sandbox: up.sandbox,
            came_up: up.came_up,
            wake_ms: up.wake_ms,
        }),
    ))
}
