//! The events table: every state transition, in order.

use forkvm_api::v1::{Event, SandboxState};
use rusqlite::{params, Connection};

pub fn insert(
    c: &Connection,
    workspace: &str,
    sandbox: &str,
    kind: &str,
    from: Option<SandboxState>,
    to: Option<SandboxState>,
    detail: &str,
) -> rusqlite::Result<Event> {
    let ts = crate::util::now();
    c.execute(
        "INSERT INTO events(ts, workspace, sandbox, kind, from_state, to_state, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![ts, workspace, sandbox, kind, from.map(SandboxState::as_str), to.map(SandboxState::as_str), detail],
    )?;
    Ok(Event {
        id: c.last_insert_rowid(),
        ts,
        workspace: workspace.into(),
        sandbox: sandbox.into(),
        kind: kind.into(),
        from_state: from,
        to_state: to,
        detail: detail.into(),
    })
}

/// `workspace`'s events after `since`, oldest first, at most `limit`; `sandbox` narrows.
pub fn list(
    c: &Connection,
    workspace: &str,
    sandbox: Option<&str>,
    since: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Event>> {
    let mut st = c.prepare_cached(
        "SELECT id, ts, workspace, sandbox, kind, from_state, to_state, detail FROM events
         WHERE workspace = ?1 AND id > ?2 AND (?3 IS NULL OR sandbox = ?3) ORDER BY id LIMIT ?4",
    )?;
    let rows = st.query_map(params![workspace, since, sandbox, limit as i64], |r| {
        let from: Option<String> = r.get(5)?;
        let to: Option<String> = r.get(6)?;
        Ok(Event {
            id: r.get(0)?,
            ts: r.get(1)?,
            workspace: r.get(2)?,
            sandbox: r.get(3)?,
            kind: r.get(4)?,
            from_state: from.as_deref().and_then(SandboxState::parse),
            to_state: to.as_deref().and_then(SandboxState::parse),
            detail: r.get(7)?,
        })
    })?;
    rows.collect()
}
