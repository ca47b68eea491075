//! Live forks, the clone tree, and templates (snapshots that sandboxes are created from).

use std::time::Instant;

use forkvm_api::v1::{CreateTemplate, ForkRequest, ForkResponse, Privacy, Sandbox, SandboxState, Template, TreeNode};
use forkvm_api::vm;

use super::{ensure_up, owned, reload, visible, vm_call, QUICK, SLOW};
use crate::app::App;
use crate::db::{self, sandboxes};
use crate::error::{ApiError, ApiResult};

/// Forks sandbox `id` into `count` running children in the caller's workspace.
pub async fn fork(app: &App, ws: &str, id: &str, req: ForkRequest) -> ApiResult<ForkResponse> {
    if !(1..=64).contains(&req.count) {
        return Err(ApiError::bad(format!("count must be 1 to 64, not {}", req.count)));
    }
    let rec = visible(app, ws, id)?;
    let same_ws = rec.sb.workspace == ws;
    if !same_ws && rec.sb.privacy != Privacy::Public {
        return Err(ApiError::forbidden(format!(
            "sandbox {id} is {} in another workspace: a live fork would copy its memory (and any secrets in it) \
             into workspace {ws}; its owners can make a template of it and share that instead",
            rec.sb.privacy.as_str()
        )));
    }
    super::check_host_memory(rec.sb.memory_mib * req.count as u64)?;
    let lock = app.sandbox_lock(id);
    let _g = lock.lock().await;
    let mut rec = reload(app, id)?;
    let (parent_came_up, wake_ms) = ensure_up(app, &mut rec).await?;
    let t0 = Instant::now();
    let prefix = format!("{}-", crate::util::new_id("sb"));
    let names: Vec<String> = (1..=req.count).map(|i| format!("{prefix}{i}")).collect();
    let answer = vm_call(app, &rec, vm::Fork { count: req.count, prefix: Some(prefix) }, SLOW).await;
    sandboxes::touch(&app.db.lock(), id)?;
    let v = match answer {
        Ok(v) => v,
        Err(e) => {
            // Children that did start must not outlive a failed fork unrecorded.
            for n in &names {
                let _ = app.vmms.call(n, vm::Stop {}, QUICK).await;
            }
            return Err(e);
        }
    };
    let fork_ms = crate::util::ms(t0.elapsed());
    app.metrics.observe_fork(fork_ms);
    let now = crate::util::now();
    let mut children = Vec::new();
    for c in v.children {
        let pid = u32::try_from(c.pid).ok();
        children.push(Sandbox {
            id: c.name,
            name: String::new(), // numbered below, with the parent's row
            workspace: ws.to_string(),
            privacy: req.privacy.unwrap_or(if same_ws { rec.sb.privacy } else { Privacy::Private }),
            template: rec.sb.template.clone(),
            parent: Some(id.to_string()),
            state: SandboxState::Running,
            memory_mib: rec.sb.memory_mib,
            vcpus: rec.sb.vcpus,
            created_at: now,
            last_active_at: now,
            policy: req.policy.unwrap_or(if same_ws { rec.sb.policy } else { Default::default() }),
            pid,
        });
    }
    {
        let mut c = app.db.lock();
        let tx = c.transaction()?;
        let first = sandboxes::take_fork_numbers(&tx, id, children.len())?;
        for (n, ch) in (first..).zip(children.iter_mut()) {
            ch.name = format!("{}-fork{n}", rec.sb.name);
            sandboxes::insert(&tx, ch)?;
        }
        tx.commit()?;
        for ch in &children {
            app.event_in(&c, ws, &ch.id, "forked", None, Some(SandboxState::Running), &format!("from {id}"))?;
        }
        let detail = format!("{} children in {fork_ms:.1} ms", children.len());
        app.event_in(&c, &rec.sb.workspace, id, "fork", Some(rec.sb.state), Some(rec.sb.state), &detail)?;
    }
    Ok(ForkResponse { sandboxes: children, parent_came_up, wake_ms, fork_ms })
}

/// The sandbox and its descendants that the caller may see.
pub fn tree(app: &App, ws: &str, id: &str) -> ApiResult<TreeNode> {
    let rec = visible(app, ws, id)?;
    let c = app.db.lock();
    fn node(c: &rusqlite::Connection, ws: &str, sb: &Sandbox, depth: usize) -> ApiResult<TreeNode> {
        let mut children = Vec::new();
        if depth < 64 {
            for ch in sandboxes::children(c, &sb.id)? {
                if ch.sb.workspace == ws || ch.sb.privacy != Privacy::Private {
                    children.push(node(c, ws, &ch.sb, depth + 1)?);
                }
            }
        }
        Ok(TreeNode { id: sb.id.clone(), name: sb.name.clone(), state: sb.state, children })
    }
    node(&c, ws, &rec.sb, 0)
}

/// Snapshots a sandbox of the caller's workspace into an immutable template.
pub async fn create_template(app: &App, ws: &str, req: CreateTemplate) -> ApiResult<Template> {
    let id = &req.sandbox;
    owned(app, ws, id)?;
    let tid = crate::util::new_id("tpl");
    let name = req.name.clone().unwrap_or_else(|| tid.clone());
    super::lifecycle::check_name(&name)?;
    let root = app.cfg.templates_dir();
    create_private_dir(&root)?;
    let dir = root.join(&tid);
    let lock = app.sandbox_lock(id);
    let _g = lock.lock().await;
    let mut rec = reload(app, id)?;
    if rec.sb.state == SandboxState::Hibernated {
        ensure_up(app, &mut rec).await?;
    }
    if !matches!(rec.sb.state, SandboxState::Running | SandboxState::Paused) {
        return Err(ApiError::conflict(format!("sandbox {id} is {}", rec.sb.state.as_str())));
    }
    let snap = vm_call(app, &rec, vm::Snapshot { dir: dir.clone(), diff: false }, SLOW).await;
    if let Err(e) = snap {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    make_read_only(&dir);
    let t = Template {
        id: tid.clone(),
        name,
        workspace: ws.to_string(),
        privacy: req.privacy.unwrap_or_default(),
        source: id.clone(),
        memory_mib: rec.sb.memory_mib,
        vcpus: rec.sb.vcpus,
        created_at: crate::util::now(),
    };
    let c = app.db.lock();
    db::templates::insert(&c, &t, &dir.to_string_lossy())?;
    app.event_in(&c, ws, id, "template", Some(rec.sb.state), Some(rec.sb.state), &format!("template {tid}"))?;
    Ok(t)
}

/// Deletes a template of the caller's workspace: its row and its files. Sandboxes created from it
/// keep working (their VMMs hold its memory file and disk layers open; hibernation moves their
/// memory into the chunk store), so they do not keep it; a repo that preloads from it does (409).
pub async fn delete_template(app: &App, ws: &str, tid: &str) -> ApiResult<()> {
    let _w = app.templates_lock.write().await;
    let (t, dir) = db::templates::get(&app.db.lock(), tid)?
        .filter(|(t, _)| t.workspace == ws || t.privacy != Privacy::Private)
        .ok_or_else(|| ApiError::not_found(format!("no template {tid:?}")))?;
    if t.workspace != ws {
        return Err(ApiError::forbidden(format!("template {tid} belongs to another workspace")));
    }
    let repos = db::repos::using_template(&app.db.lock(), tid)?;
    if !repos.is_empty() {
        return Err(ApiError::conflict(format!(
            "template {tid} preloads pull requests of {}: point them at another template first",
            repos.join(", ")
        )));
    }
    {
        let c = app.db.lock();
        db::templates::delete(&c, tid)?;
        app.event_in(&c, ws, &t.source, "template_deleted", None, None, &format!("template {tid}"))?;
    }
    // The files were made read-only; the directory must be writable again to empty it.
    use std::os::unix::fs::PermissionsExt;
    let dir = std::path::PathBuf::from(dir);
    if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!("template {tid}: cannot remove {}: {e}", dir.display());
        }
    }
    Ok(())
}

fn create_private_dir(p: &std::path::Path) -> ApiResult<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p) {
        Ok(()) => Ok(()),
        Err(e) => Err(ApiError::internal(format!("cannot create {}: {e}", p.display()))),
    }
}

/// Templates are immutable: their files become read-only.
fn make_read_only(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o400));
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o500));
}
