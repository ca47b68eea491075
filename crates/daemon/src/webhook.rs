//! `POST /v1/hooks/github`: GitHub `pull_request` deliveries preload a sandbox per pull request.
//! The signature (`X-Hub-Signature-256`, HMAC-SHA256 keyed by the repo's secret) is checked in
//! constant time before anything happens; a delivery id seen before changes nothing.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use forkvm_api::v1::{CreateSandbox, ErrorBody, HookOutcome};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::app::{App, Shared};
use crate::db::{self, repos};
use crate::error::{ApiError, ApiResult};
use crate::ops::{self, lifecycle};

/// Checks `sig` (`sha256=<hex>`) over `body` with `secret`, in constant time.
pub fn signature_ok(secret: &str, body: &[u8], sig: &str) -> bool {
    let Some(hexsig) = sig.strip_prefix("sha256=") else { return false };
    let Ok(want) = hex::decode(hexsig) else { return false };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(body);
    mac.verify_slice(&want).is_ok()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn outcome(what: &str, sandbox: Option<String>) -> Json<HookOutcome> {
    Json(HookOutcome { outcome: what.to_string(), sandbox })
}

#[utoipa::path(post, path = "/v1/hooks/github", request_body(content = Object, description = "GitHub pull_request payload"),
    responses((status = 202, body = HookOutcome), (status = 200, body = HookOutcome), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn github(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<HookOutcome>)> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "webhook body too large")
        } else {
            ApiError::bad(r.body_text())
        }
    })?;
    let sig =
        header(&headers, "x-hub-signature-256").ok_or_else(|| ApiError::unauthorized("missing X-Hub-Signature-256"))?;
    let delivery = header(&headers, "x-github-delivery")
        .filter(|d| !d.is_empty() && d.len() <= 128)
        .ok_or_else(|| ApiError::bad("missing or bad X-GitHub-Delivery"))?;
    let payload: Value = serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("malformed payload: {e}")))?;
    let repo_name = payload["repository"]["full_name"]
        .as_str()
        .ok_or_else(|| ApiError::bad("payload has no repository.full_name"))?;
    let (repo, secret) = repos::get(&app.db.lock(), repo_name)?
        .ok_or_else(|| ApiError::not_found(format!("repository {repo_name:?} is not registered")))?;
    if !signature_ok(&secret, &body, sig) {
        return Err(ApiError::unauthorized("bad X-Hub-Signature-256"));
    }
    if !repos::first_delivery(&app.db.lock(), delivery)? {
        return Ok((StatusCode::OK, outcome("replayed", None)));
    }
    if header(&headers, "x-github-event") != Some("pull_request") {
        return Ok((StatusCode::OK, outcome("ignored", None)));
    }
    let number = payload["pull_request"]["number"]
        .as_u64()
        .or_else(|| payload["number"].as_u64())
        .ok_or_else(|| ApiError::bad("payload has no pull request number"))?;
    let sha = payload["pull_request"]["head"]["sha"].as_str().unwrap_or("").chars().take(64).collect::<String>();
    let existing = repos::pull(&app.db.lock(), &repo.repo, number)?;
    match payload["action"].as_str().unwrap_or("") {
        "opened" | "reopened" | "synchronize" => {
            if let Some((sb, old_sha)) = &existing {
                let alive = db::sandboxes::get(&app.db.lock(), sb)?.is_some();
                if alive && *old_sha == sha {
                    return Ok((StatusCode::OK, outcome("unchanged", Some(sb.clone()))));
                }
            }
            let id = crate::util::new_id("sb");
            // Hold the new sandbox's lock before anyone can find it: `open` waits for the setup.
            let guard = app.sandbox_lock(&id).lock_owned().await;
            repos::set_pull(&app.db.lock(), &repo.repo, number, &id, &sha)?;
            let (app2, id2, old) = (app.clone(), id.clone(), existing.map(|(s, _)| s));
            let what = if old.is_some() { "refreshed" } else { "created" };
            tokio::spawn(async move {
                if let Some(old) = old {
                    let _ = lifecycle::delete(&app2, &old, "pull request updated").await;
                }
                if let Err(e) = preload(&app2, &repo, number, &id2).await {
                    tracing::warn!("preloading {}#{number}: {}", repo.repo, e.message);
                }
                drop(guard);
            });
            Ok((StatusCode::ACCEPTED, outcome(what, Some(id))))
        }
        "closed" => {
            repos::delete_pull(&app.db.lock(), &repo.repo, number)?;
            if let Some((sb, _)) = existing {
                let _ = lifecycle::delete(&app, &sb, "pull request closed").await;
                return Ok((StatusCode::OK, outcome("deleted", Some(sb))));
            }
            Ok((StatusCode::OK, outcome("ignored", None)))
        }
        _ => Ok((StatusCode::OK, outcome("ignored", None))),
    }
}

/// Creates the PR's sandbox from the repo's template, runs the setup line, then pauses it. The
/// caller holds the sandbox's lock.
async fn preload(app: &App, repo: &forkvm_api::v1::Repo, number: u64, id: &str) -> ApiResult<()> {
    let req = CreateSandbox {
        name: Some(format!("{}#{number}", repo.repo)),
        template: Some(repo.template.clone()),
        ..Default::default()
    };
    lifecycle::create_locked(app, &repo.workspace, id, req).await?;
    let rec = ops::reload(app, id)?;
    if let Some(setup) = &repo.setup {
        let op = forkvm_api::vm::Exec { line: setup.clone(), wait_for: None, timeout_ms: 60_000 };
        let v = ops::vm_call(app, &rec, op, ops::SLOW).await?;
        let c = app.db.lock();
        let detail = format!("setup: {:?}", v.lines);
        app.event_in(&c, &repo.workspace, id, "setup", Some(rec.sb.state), Some(rec.sb.state), &detail)?;
    }
    lifecycle::pause_locked(app, &rec, "preloaded").await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn signatures() {
        let body = br#"{"zen":"x"}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(body);
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert!(signature_ok("s3cret", body, &good));
        assert!(!signature_ok("other", body, &good));
        assert!(!signature_ok("s3cret", b"{}", &good));
        for bad in ["", "sha256=", "sha1=abcd", "sha256=zz", &good[..good.len() - 2]] {
            assert!(!signature_ok("s3cret", body, bad), "{bad}");
        }
    }
}
