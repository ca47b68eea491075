//! `GET /v1/memory`: resident memory of the caller's live sandboxes, split into what each VMM
//! holds alone and what it shares (copy-on-write with its parent or siblings), plus the host and
//! the chunk store. Read from /proc/PID/smaps_rollup; nothing is cached.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use axum::extract::State;
use axum::Json;
use forkvm_api::v1::{ErrorBody, MemoryReport, SandboxMemory, SandboxState, StoreUsage};

use crate::app::Shared;
use crate::auth::Caller;
use crate::db;
use crate::error::ApiResult;

/// Files of the store looked at, at most (the walk is bounded).
const MAX_STORE_FILES: usize = 100_000;

#[utoipa::path(get, path = "/v1/memory", security(("bearer" = [])),
    responses((status = 200, body = MemoryReport), (status = 401, body = ErrorBody)))]
pub async fn memory(State(app): State<Shared>, Caller(ws): Caller) -> ApiResult<Json<MemoryReport>> {
    let live = db::sandboxes::in_states(&app.db.lock(), &[SandboxState::Running, SandboxState::Paused])?;
    let store = app.cfg.store.clone();
    let report = tokio::task::spawn_blocking(move || {
        let sandboxes: Vec<SandboxMemory> = live
            .iter()
            .filter(|r| r.sb.workspace == ws)
            .filter_map(|r| Some((r.sb.id.clone(), r.sb.pid?)))
            .filter_map(|(id, pid)| vmm_memory(id, pid))
            .collect();
        let total = meminfo_bytes("MemTotal").unwrap_or(0);
        let avail = meminfo_bytes("MemAvailable").unwrap_or(0);
        MemoryReport {
            host_total_bytes: total,
            host_used_bytes: total.saturating_sub(avail),
            private_bytes: sandboxes.iter().map(|s| s.private_bytes).sum(),
            shared_bytes: sandboxes.iter().map(|s| s.shared_bytes).sum(),
            sandboxes,
            store: store_usage(&store),
        }
    })
    .await
    .map_err(|e| crate::error::ApiError::internal(format!("memory report: {e}")))?;
    Ok(Json(report))
}

fn vmm_memory(id: String, pid: u32) -> Option<SandboxMemory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kib = |key: &str| field_kib(&text, key).unwrap_or(0) * 1024;
    Some(SandboxMemory {
        id,
        rss_bytes: kib("Rss:"),
        private_bytes: kib("Private_Clean:") + kib("Private_Dirty:"),
        shared_bytes: kib("Shared_Clean:") + kib("Shared_Dirty:"),
    })
}

fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn meminfo_bytes(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    field_kib(&s, &format!("{key}:")).map(|k| k * 1024)
}

/// Allocated bytes under the store and its image count; None when there is no store yet.
fn store_usage(dir: &Path) -> Option<StoreUsage> {
    std::fs::symlink_metadata(dir).ok().filter(|m| m.is_dir())?;
    let mut disk_bytes = 0u64;
    let mut seen = 0usize;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            seen += 1;
            if seen > MAX_STORE_FILES {
                break;
            }
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                disk_bytes += m.blocks() * 512;
            }
        }
    }
    let images = std::fs::read_dir(dir.join("manifests"))
        .map(|it| it.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "manifest")).count())
        .unwrap_or(0) as u64;
    Some(StoreUsage { disk_bytes, images })
}
