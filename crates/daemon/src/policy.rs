//! The lifecycle policy: pause sandboxes idle for `pause_after` seconds, hibernate those paused
//! for `hibernate_after` seconds (0 = never), and notice VMMs that died.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use forkvm_api::v1::SandboxState;

use axum::http::StatusCode;

use crate::app::{App, Shared};
use crate::db::sandboxes::{self, Rec};
use crate::error::ApiResult;
use crate::ops::lifecycle;
use crate::vmproc::Vmms;

fn idle(r: &Rec, now: f64) -> bool {
    r.sb.state == SandboxState::Running
        && r.sb.policy.pause_after > 0
        && now - r.sb.last_active_at >= r.sb.policy.pause_after as f64
}

fn sleepy(r: &Rec, now: f64) -> bool {
    r.sb.state == SandboxState::Paused
        && r.sb.policy.hibernate_after > 0
        && now - r.state_since >= r.sb.policy.hibernate_after as f64
}

/// Runs forever, every `cfg.policy_tick`.
pub async fn run(app: Shared) {
    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tick = tokio::time::interval(app.cfg.policy_tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let recs = match sandboxes::in_states(&app.db.lock(), &[SandboxState::Running, SandboxState::Paused]) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("policy: {e}");
                continue;
            }
        };
        let now = crate::util::now();
        for r in recs {
            let dead = r.sb.pid.is_some_and(|p| !Vmms::alive(p));
            // A sandbox with open preview connections is in use, whatever its last API call.
            let quiet = idle(&r, now) && !app.preview_active.busy(&r.sb.id);
            if !(dead || quiet || sleepy(&r, now)) {
                continue;
            }
            if !busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(r.sb.id.clone()) {
                continue;
            }
            let (app, busy) = (app.clone(), busy.clone());
            tokio::spawn(async move {
                let id = r.sb.id.clone();
                let res = if dead {
                    crashed(&app, &id).await
                } else if quiet {
                    let busy = app.preview_active.clone();
                    let cond = move |x: &Rec| idle(x, crate::util::now()) && !busy.busy(&x.sb.id);
                    lifecycle::pause_if(&app, &id, "policy", cond).await.map(|_| ())
                } else {
                    lifecycle::hibernate_if(&app, &id, "policy", |x| sleepy(x, crate::util::now())).await.map(|_| ())
                };
                settle(&app, &id, res);
                busy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
            });
        }
    }
}

/// Reports what the policy's action on `id` came to. A sandbox deleted since the tick read it is
/// no news (debug, not a warning), and the lock the action took for it is dropped again, as
/// delete does: nothing else will.
fn settle(app: &App, id: &str, res: ApiResult<()>) {
    match res {
        Ok(()) => {}
        Err(e) if e.status == StatusCode::NOT_FOUND => {
            tracing::debug!("policy on {id}: deleted meanwhile ({})", e.message);
            app.forget_lock(id);
        }
        Err(e) => tracing::warn!("policy on {id}: {}", e.message),
    }
}

async fn crashed(app: &Shared, id: &str) -> ApiResult<()> {
    let lock = app.sandbox_lock(id);
    let _g = lock.lock().await;
    let rec = crate::ops::reload(app, id)?;
    let gone = matches!(rec.sb.state, SandboxState::Running | SandboxState::Paused)
        && rec.sb.pid.is_some_and(|p| !Vmms::alive(p));
    if gone {
        if let Some(pid) = rec.sb.pid {
            app.vmms.children.wait_gone(pid, std::time::Duration::from_secs(10)).await;
        }
        app.transition(&rec, SandboxState::Crashed, None, "crashed", "its VMM exited")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn app(dir: &std::path::Path) -> App {
        let cfg = crate::app::Config {
            run_dir: dir.join("run"),
            state_dir: dir.join("state"),
            store: dir.join("store"),
            exe: "/nonexistent/forkvm".into(),
            listen: None,
            policy_tick: std::time::Duration::from_secs(1),
            max_body: 1 << 20,
            head_timeout: std::time::Duration::from_secs(1),
            body_timeout: std::time::Duration::from_secs(1),
            api_max_connections: 1,
            preview: None,
            images: Default::default(),
            pool: 0,
        };
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let db = crate::db::Db::open(&cfg.db_path()).unwrap();
        App::new(cfg, db)
    }

    #[tokio::test]
    async fn a_sandbox_deleted_before_the_policy_acts_is_forgotten() {
        let dir = std::env::temp_dir().join(format!("forkvmd-policy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let app = app(&dir);
        // The tick read sb-gone; delete removed it (and its lock) before the action ran.
        let res = lifecycle::pause_if(&app, "sb-gone", "policy", |_| true).await.map(|_| ());
        assert_eq!(res.as_ref().map_err(|e| e.status), Err(StatusCode::NOT_FOUND));
        settle(&app, "sb-gone", res);
        assert_eq!(app.lock_count(), 0, "the action's lock for a deleted sandbox is dropped");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
