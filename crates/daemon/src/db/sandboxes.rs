//! The sandboxes table.

use forkvm_api::v1::{Policy, Privacy, Sandbox, SandboxState};
use rusqlite::{params, Connection, OptionalExtension, Row};

const COLS: &str = "id, name, workspace, privacy, template, parent, state, memory_mib, vcpus, created_at, \
                    last_active, pause_after, hibernate_after, pid, state_since, rowid";

/// A sandbox row plus what only the daemon needs.
#[derive(Debug, Clone)]
pub struct Rec {
    pub sb: Sandbox,
    pub state_since: f64,
    pub rowid: i64,
}

fn from_row(r: &Row<'_>) -> rusqlite::Result<Rec> {
    let privacy: String = r.get(3)?;
    let state: String = r.get(6)?;
    let sb = Sandbox {
        id: r.get(0)?,
        name: r.get(1)?,
        workspace: r.get(2)?,
        privacy: Privacy::parse(&privacy).unwrap_or_default(),
        template: r.get(4)?,
        parent: r.get(5)?,
        state: SandboxState::parse(&state).unwrap_or(SandboxState::Crashed),
        memory_mib: r.get(7)?,
        vcpus: r.get(8)?,
        created_at: r.get(9)?,
        last_active_at: r.get(10)?,
        policy: Policy { pause_after: r.get(11)?, hibernate_after: r.get(12)? },
        pid: r.get(13)?,
    };
    Ok(Rec { sb, state_since: r.get(14)?, rowid: r.get(15)? })
}

pub fn insert(c: &Connection, s: &Sandbox) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO sandboxes(id, name, workspace, privacy, template, parent, state, memory_mib, vcpus,
            created_at, last_active, state_since, pause_after, hibernate_after, pid)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?10, ?12, ?13, ?14)",
        params![
            s.id,
            s.name,
            s.workspace,
            s.privacy.as_str(),
            s.template,
            s.parent,
            s.state.as_str(),
            s.memory_mib,
            s.vcpus,
            s.created_at,
            s.last_active_at,
            s.policy.pause_after,
            s.policy.hibernate_after,
            s.pid
        ],
    )?;
    Ok(())
}

pub fn get(c: &Connection, id: &str) -> rusqlite::Result<Option<Rec>> {
    c.query_row(&format!("SELECT {COLS} FROM sandboxes WHERE id = ?1"), [id], from_row).optional()
}

/// Sets the state (and the VMM pid) and restarts the state's clock.
pub fn set_state(c: &Connection, id: &str, state: SandboxState, pid: Option<u32>) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE sandboxes SET state = ?2, pid = ?3, state_since = ?4 WHERE id = ?1",
        params![id, state.as_str(), pid, crate::util::now()],
    )?;
    Ok(())
}

/// Records activity (resets the idle clock).
pub fn touch(c: &Connection, id: &str) -> rusqlite::Result<()> {
    c.execute("UPDATE sandboxes SET last_active = ?2 WHERE id = ?1", params![id, crate::util::now()])?;
    Ok(())
}

/// Takes the next `n` fork numbers of sandbox `id` (its children are `<name>-fork<number>`);
/// returns the first. Numbers are never given twice, even once children are deleted.
pub fn take_fork_numbers(c: &Connection, id: &str, n: usize) -> rusqlite::Result<u64> {
    let after: u64 = c.query_row(
        "UPDATE sandboxes SET forks = forks + ?2 WHERE id = ?1 RETURNING forks",
        params![id, n as u64],
        |r| r.get(0),
    )?;
    Ok(after - n as u64 + 1)
}

pub fn delete(c: &Connection, id: &str) -> rusqlite::Result<()> {
    c.execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
    Ok(())
}

#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub state: Option<SandboxState>,
    pub name: Option<String>,
    pub template: Option<String>,
    pub parent: Option<String>,
}

/// One page of `workspace`'s sandboxes after `cursor` (a rowid), oldest first.
pub fn list(c: &Connection, workspace: &str, f: &Filter, cursor: i64, limit: usize) -> rusqlite::Result<Vec<Rec>> {
    let sql = format!(
        "SELECT {COLS} FROM sandboxes WHERE workspace = ?1 AND rowid > ?2
           AND (?3 IS NULL OR state = ?3) AND (?4 IS NULL OR name = ?4)
           AND (?5 IS NULL OR template = ?5) AND (?6 IS NULL OR parent = ?6)
         ORDER BY rowid LIMIT ?7"
    );
    let mut st = c.prepare_cached(&sql)?;
    let rows = st.query_map(
        params![workspace, cursor, f.state.map(SandboxState::as_str), f.name, f.template, f.parent, limit as i64],
        from_row,
    )?;
    rows.collect()
}

/// Every sandbox in one of `states` (all workspaces).
pub fn in_states(c: &Connection, states: &[SandboxState]) -> rusqlite::Result<Vec<Rec>> {
    let mut st = c.prepare_cached(&format!("SELECT {COLS} FROM sandboxes"))?;
    let rows = st.query_map([], from_row)?;
    Ok(rows.filter_map(Result::ok).filter(|r| states.contains(&r.sb.state)).collect())
}

pub fn children(c: &Connection, id: &str) -> rusqlite::Result<Vec<Rec>> {
    let mut st = c.prepare_cached(&format!("SELECT {COLS} FROM sandboxes WHERE parent = ?1 ORDER BY rowid"))?;
    let rows = st.query_map([id], from_row)?;
    rows.collect()
}

/// Sandboxes per state (for /metrics).
pub fn count_by_state(c: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut st = c.prepare_cached("SELECT state, COUNT(*) FROM sandboxes GROUP BY state")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}
