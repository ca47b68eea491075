//! What the API does to sandboxes. Every operation on one sandbox holds its lock, reloads its
//! row, acts on its VMM, then records the transition (row + event in one transaction).

pub mod fork;
pub mod lifecycle;

use std::time::{Duration, Instant};

use forkvm_api::v1::{CameUp, Privacy, SandboxState};
use forkvm_api::vm::{Op, Resume};

use crate::app::App;
use crate::db::sandboxes::{self, Rec};
use crate::error::{ApiError, ApiResult};
use crate::vmproc::VmError;

pub const QUICK: Duration = Duration::from_secs(10);
pub const SLOW: Duration = Duration::from_secs(600);

/// The sandbox if the caller's workspace may see it: its own, or another's unlisted/public one.
/// Anything else is 404 so existence does not leak.
pub fn visible(app: &App, ws: &str, id: &str) -> ApiResult<Rec> {
    let rec = sandboxes::get(&app.db.lock(), id)?;
    match rec {
        Some(r) if r.sb.workspace == ws || r.sb.privacy != Privacy::Private => Ok(r),
        _ => Err(ApiError::not_found(format!("no sandbox {id:?}"))),
    }
}

/// The sandbox if the caller's workspace owns it (others' visible ones: 403).
pub fn owned(app: &App, ws: &str, id: &str) -> ApiResult<Rec> {
    let r = visible(app, ws, id)?;
    if r.sb.workspace != ws {
        return Err(ApiError::forbidden(format!(
            "sandbox {id:?} belongs to another workspace: you may read and fork it, not change it"
        )));
    }
    Ok(r)
}

/// Reloads a row under its lock (it may have changed while we waited).
pub fn reload(app: &App, id: &str) -> ApiResult<Rec> {
    sandboxes::get(&app.db.lock(), id)?.ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))
}

/// Sends a request to the sandbox's VMM. A VMM that is gone marks the sandbox crashed (409).
pub async fn vm_call<O: Op>(app: &App, rec: &Rec, op: O, timeout: Duration) -> ApiResult<O::Response> {
    match app.vmms.call(&rec.sb.id, op, timeout).await {
        Ok(v) => Ok(v),
        Err(VmError::Gone(why)) => {
            if let Some(pid) = rec.sb.pid {
                // Reap it (if ours) before anyone hears that it crashed.
                app.vmms.children.wait_gone(pid, Duration::from_secs(2)).await;
            }
            let why = format!("its VMM is gone ({why})");
            app.transition(rec, SandboxState::Crashed, None, "crashed", &why)?;
            Err(ApiError::conflict(format!("sandbox {} crashed: {why}", rec.sb.id)))
        }
        Err(VmError::Timeout(t)) => Err(ApiError::new(
            axum::http::StatusCode::GATEWAY_TIMEOUT,
            format!("sandbox {}: no answer from its VMM within {t:?}", rec.sb.id),
        )),
        Err(VmError::Refused(e)) if e.starts_with("no answer") => {
            Err(ApiError::new(axum::http::StatusCode::GATEWAY_TIMEOUT, e))
        }
        Err(VmError::Refused(e)) => Err(ApiError::conflict(e)),
    }
}

/// Brings a locked sandbox up: resumes a paused one, wakes a hibernated one. Returns how it came
/// up and how long that took.
pub async fn ensure_up(app: &App, rec: &mut Rec) -> ApiResult<(CameUp, f64)> {
    let t0 = Instant::now();
    let came = match rec.sb.state {
        SandboxState::Running => return Ok((CameUp::Running, 0.0)),
        SandboxState::Paused => {
            vm_call(app, rec, Resume {}, QUICK).await?;
            app.transition(rec, SandboxState::Running, rec.sb.pid, "resumed", "")?;
            CameUp::Resumed
        }
        SandboxState::Hibernated => {
            let args = crate::vmproc::wake_args(&rec.sb.id, &app.cfg.store);
            let pid = app
                .vmms
                .spawn(&rec.sb.id, args)
                .await
                .map_err(|e| ApiError::internal(format!("cannot wake sandbox {}: {e}", rec.sb.id)))?;
            app.transition(rec, SandboxState::Running, Some(pid), "woken", "")?;
            rec.sb.pid = Some(pid);
            CameUp::Woken
        }
        SandboxState::Creating => {
            return Err(ApiError::conflict(format!("sandbox {} is still being created", rec.sb.id)))
        }
        SandboxState::Crashed => return Err(ApiError::conflict(format!("sandbox {} crashed: delete it", rec.sb.id))),
    };
    let ms = crate::util::ms(t0.elapsed());
    app.metrics.observe_wake(came, ms);
    rec.sb.state = SandboxState::Running;
    Ok((came, ms))
}

/// Refuses unless the host has `mib` MiB available beyond a reserve (503).
pub fn check_host_memory(mib: u64) -> ApiResult<()> {
    const RESERVE_MIB: u64 = 256;
    if let Some(avail) = crate::metrics::mem_available_mib() {
        if mib + RESERVE_MIB > avail {
            return Err(ApiError::unavailable(format!(
                "the host lacks memory: {mib} MiB asked, {avail} MiB available (keeping {RESERVE_MIB} MiB)"
            )));
        }
    }
    Ok(())
}
