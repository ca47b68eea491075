//! Create, exec, pause, hibernate, resume and delete.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use forkvm_api::v1::{CameUp, CreateSandbox, ExecRequest, ExecResponse, Privacy, Sandbox, SandboxState, SandboxUp};
use forkvm_api::vm;

use super::{ensure_up, owned, reload, vm_call, QUICK, SLOW};
use crate::app::App;
use crate::db::sandboxes::Rec;
use crate::db::{self, sandboxes};
use crate::error::{ApiError, ApiResult};

const MAX_LINE: usize = 4096;
const MAX_TIMEOUT_MS: u64 = 600_000;

pub fn check_name(name: &str) -> ApiResult<()> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::bad(format!("invalid name {name:?}: 1 to 128 printable characters")));
    }
    Ok(())
}

/// Boots the test guest, or restores a template copy-on-write.
pub async fn create(app: &App, ws: &str, req: CreateSandbox) -> ApiResult<Sandbox> {
    let id = crate::util::new_id("sb");
    let lock = app.sandbox_lock(&id);
    let _g = lock.lock().await;
    create_locked(app, ws, &id, req).await
}

/// [`create`] with a chosen id whose lock the caller holds.
pub async fn create_locked(app: &App, ws: &str, id: &str, req: CreateSandbox) -> ApiResult<Sandbox> {
    let t0 = Instant::now();
    let id = id.to_string();
    // A template is not deleted while a restore from it opens its files.
    let _template_files = match req.template {
        Some(_) => Some(app.templates_lock.read().await),
        None => None,
    };
    // A template's snapshot, restored into a warm pool VMM when the daemon has a pool.
    let mut pool_dir: Option<PathBuf> = None;
    let (template, memory_mib, vcpus, args) = match &req.template {
        Some(tid) => {
            let (t, dir) = db::templates::get(&app.db.lock(), tid)?
                .filter(|(t, _)| t.workspace == ws || t.privacy != Privacy::Private)
                .ok_or_else(|| ApiError::not_found(format!("no template {tid:?}")))?;
            if req.memory_mib.is_some_and(|m| m != t.memory_mib) || req.vcpus.is_some_and(|v| v != t.vcpus) {
                return Err(ApiError::bad(format!(
                    "template {tid} has {} MiB and {} vCPUs; leave memory_mib and vcpus out",
                    t.memory_mib, t.vcpus
                )));
            }
            if req.net.is_some() {
                return Err(ApiError::bad(format!("template {tid} carries its own network device; leave net out")));
            }
            if req.image.is_some() {
                return Err(ApiError::bad(format!("template {tid} fixes its own guest; leave image out")));
            }
            pool_dir = Some(PathBuf::from(&dir));
            (Some(t.id), t.memory_mib, t.vcpus, crate::vmproc::restore_args(&id, &PathBuf::from(dir)))
        }
        None => {
            let mem = req.memory_mib.unwrap_or(64);
            let vcpus = req.vcpus.unwrap_or(1);
            if !(16..=65536).contains(&mem) || mem & 1 == 1 {
                return Err(ApiError::bad(format!("memory_mib must be even, 16 to 65536, not {mem}")));
            }
            if !(1..=32).contains(&vcpus) {
                return Err(ApiError::bad(format!("vcpus must be 1 to 32, not {vcpus}")));
            }
            let image = match &req.image {
                None => None,
                Some(name) => Some(app.cfg.images.get(name).ok_or_else(|| {
                    let known: Vec<&str> = app.cfg.images.keys().map(String::as_str).collect();
                    ApiError::not_found(format!(
                        "no image {name:?} (this daemon boots: {}; the host adds one with forkvm serve --image NAME=KERNEL[,INITRD])",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ))
                })?),
            };
            let mut args = crate::vmproc::boot_args(&id, mem, vcpus, req.net.unwrap_or(false), image);
            if app.cfg.pool > 0 {
                // Shared memory: what a live clone into the pool needs.
                args.extend(["--backing".into(), "shared".into()]);
                if let Err(e) = app.vmms.fill_pool(app.cfg.pool, mem, vcpus).await {
                    tracing::warn!("warm pool of {mem} MiB: {e}; forks of this sandbox use fork()");
                }
            }
            (None, mem, vcpus, args)
        }
    };
    let name = req.name.clone().unwrap_or_else(|| id.clone());
    check_name(&name)?;
    super::check_host_memory(memory_mib)?;
    let now = crate::util::now();
    let mut sb = Sandbox {
        id: id.clone(),
        name,
        workspace: ws.to_string(),
        privacy: req.privacy.unwrap_or_default(),
        template,
        parent: None,
        state: SandboxState::Creating,
        memory_mib,
        vcpus,
        created_at: now,
        last_active_at: now,
        policy: req.policy.unwrap_or_default(),
        pid: None,
    };
    {
        let c = app.db.lock();
        sandboxes::insert(&c, &sb)?;
        app.event_in(&c, ws, &id, "creating", None, Some(SandboxState::Creating), "")?;
    }
    let pooled = match &pool_dir {
        Some(dir) if app.cfg.pool > 0 => app.vmms.restore_from_pool(&id, dir, app.cfg.pool, memory_mib, vcpus).await,
        _ => None,
    };
    let spawned = match pooled {
        Some(pid) => Ok(pid),
        None => app.vmms.spawn(&id, args).await,
    };
    match spawned {
        Ok(pid) => {
            let rec = reload(app, &id)?;
            let how = if sb.template.is_some() { "from template" } else { "booted" };
            app.transition(&rec, SandboxState::Running, Some(pid), "created", how)?;
            app.metrics.observe_create(sb.template.is_some(), crate::util::ms(t0.elapsed()));
            sb.state = SandboxState::Running;
            sb.pid = Some(pid);
            Ok(sb)
        }
        Err(e) => {
            let c = app.db.lock();
            sandboxes::delete(&c, &id)?;
            app.event_in(&c, ws, &id, "create_failed", Some(SandboxState::Creating), None, &e)?;
            app.vmms.remove_dir(&id);
            Err(ApiError::internal(format!("cannot create the sandbox: {e}")))
        }
    }
}

/// Sends a line to the guest console (waking the sandbox first if it sleeps).
pub async fn exec(app: &App, ws: &str, id: &str, req: ExecRequest) -> ApiResult<ExecResponse> {
    if req.line.len() > MAX_LINE || req.line.contains(['\n', '\r']) {
        return Err(ApiError::bad(format!("line must be one line of at most {MAX_LINE} bytes")));
    }
    let timeout_ms = req.timeout_ms.unwrap_or(10_000);
    if !(1..=MAX_TIMEOUT_MS).contains(&timeout_ms) {
        return Err(ApiError::bad(format!("timeout_ms must be 1 to {MAX_TIMEOUT_MS}")));
    }
    owned(app, ws, id)?;
    let lock = app.sandbox_lock(id);
    let _g = lock.lock().await;
    let mut rec = reload(app, id)?;
    let (came_up, wake_ms) = ensure_up(app, &mut rec).await?;
    let op = vm::Exec { line: req.line, wait_for: req.wait_for, timeout_ms };
    let v = vm_call(app, &rec, op, Duration::from_millis(timeout_ms) + QUICK).await;
    sandboxes::touch(&app.db.lock(), id)?;
    Ok(ExecResponse { lines: v?.lines, came_up, wake_ms })
}

/// Parks a running sandbox's vCPUs (`by`: "api" or "policy").
pub async fn pause(app: &App, id: &str, by: &str) -> ApiResult<Sandbox> {
    pause_if(app, id, by, |_| true).await?.ok_or_else(|| ApiError::conflict(format!("sandbox {id} changed")))
}

/// Pauses if `cond` still holds for the row once locked; `None` when it did not.
pub async fn pause_if(app: &App, id: &str, by: &str, cond: impl Fn(&Rec) -> bool) -> ApiResult<Option<Sandbox>> {
    let lock = app.sandbox_lock(id);
    let _g = lock.lock().await;
    let rec = reload(app, id)?;
    if !cond(&rec) {
        return Ok(None);
    }
    pause_locked(app, &rec, by).await.map(Some)
}

/// Pauses a sandbox whose lock the caller holds.
pub async fn pause_locked(app: &App, rec: &Rec, by: &str) -> ApiResult<Sandbox> {
    let id = &rec.sb.id;
    if rec.sb.state != SandboxState::Running {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}: only a running one can pause",
            rec.sb.state.as_str()
        )));
    }
    vm_call(app, rec, vm::Pause {}, QUICK).await?;
    app.transition(rec, SandboxState::Paused, rec.sb.pid, "paused", by)?;
    Ok(reload(app, id)?.sb)
}

/// Moves a running or paused sandbox's memory into the chunk store; its VMM exits.
pub async fn hibernate(app: &App, id: &str, by: &str) -> ApiResult<Sandbox> {
    hibernate_if(app, id, by, |_| true).await?.ok_or_else(|| ApiError::conflict(format!("sandbox {id} changed")))
}

/// Hibernates if `cond` still holds for the row once locked; `None` when it did not.
pub async fn hibernate_if(app: &App, id: &str, by: &str, cond: impl Fn(&Rec) -> bool) -> ApiResult<Option<Sandbox>> {
    let lock = app.sandbox_lock(id);
    let _g = lock.lock().await;
    let rec = reload(app, id)?;
    if !cond(&rec) {
        return Ok(None);
    }
    if !matches!(rec.sb.state, SandboxState::Running | SandboxState::Paused) {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}: only a running or paused one can hibernate",
            rec.sb.state.as_str()
        )));
    }
    vm_call(app, &rec, vm::Hibernate { store: Some(app.cfg.store.clone()) }, SLOW).await?;
    // The VMM exits after answering; wait for it so nothing of it is left running.
    if let Some(pid) = rec.sb.pid {
        app.vmms.children.wait_gone(pid, Duration::from_secs(10)).await;
    }
    app.transition(&rec, SandboxState::Hibernated, None, "hibernated", by)?;
    Ok(Some(reload(app, id)?.sb))
}

/// Resumes a paused sandbox or wakes a hibernated one.
pub async fn resume(app: &App, ws: &str, id: &str) -> ApiResult<SandboxUp> {
    owned(app, ws, id)?;
    let lock = app.sandbox_lock(id);
    let _g = lock.lock().await;
    let mut rec = reload(app, id)?;
    if rec.sb.state == SandboxState::Running {
        return Err(ApiError::conflict(format!("sandbox {id} is already running")));
    }
    let (came_up, wake_ms) = ensure_up(app, &mut rec).await?;
    sandboxes::touch(&app.db.lock(), id)?;
    Ok(SandboxUp { sandbox: reload(app, id)?.sb, came_up, wake_ms })
}

/// Wakes the sandbox if needed and says how it came up (used by `open`).
pub async fn up(app: &App, id: &str) -> ApiResult<SandboxUp> {
    let lock = app.sandbox_lock(id);
    let _g = lock.lock().await;
    let mut rec = reload(app, id)?;
    let (came_up, wake_ms) = ensure_up(app, &mut rec).await?;
    sandboxes::touch(&app.db.lock(), id)?;
    Ok(SandboxUp { sandbox: reload(app, id)?.sb, came_up, wake_ms })
}

/// Stops the sandbox's VMM (or drops its hibernation) and forgets it.
pub async fn delete(app: &App, id: &str, by: &str) -> ApiResult<()> {
    let lock = app.sandbox_lock(id);
    let _g = lock.lock().await;
    let rec = reload(app, id)?;
    if matches!(rec.sb.state, SandboxState::Running | SandboxState::Paused) {
        let _ = app.vmms.call(id, vm::Stop {}, QUICK).await;
        if let Some(pid) = rec.sb.pid {
            app.vmms.children.wait_gone(pid, Duration::from_secs(10)).await;
        }
    }
    app.vmms.remove_dir(id);
    {
        let c = app.db.lock();
        sandboxes::delete(&c, id)?;
        app.event_in(&c, &rec.sb.workspace, id, "deleted", Some(rec.sb.state), None, by)?;
    }
    app.forget_lock(id);
    Ok(())
}

/// The came-up kind for a fresh sandbox.
pub fn created() -> CameUp {
    CameUp::Created
}
