//! The templates table (rows are never updated: templates are immutable).

use forkvm_api::v1::{Privacy, Template};
use rusqlite::{params, Connection, OptionalExtension, Row};

const COLS: &str = "id, name, workspace, privacy, source, memory_mib, vcpus, created_at, dir";

fn from_row(r: &Row<'_>) -> rusqlite::Result<(Template, String)> {
    let privacy: String = r.get(3)?;
    Ok((
        Template {
            id: r.get(0)?,
            name: r.get(1)?,
            workspace: r.get(2)?,
            privacy: Privacy::parse(&privacy).unwrap_or_default(),
            source: r.get(4)?,
            memory_mib: r.get(5)?,
            vcpus: r.get(6)?,
            created_at: r.get(7)?,
        },
        r.get(8)?,
    ))
}

pub fn insert(c: &Connection, t: &Template, dir: &str) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO templates(id, name, workspace, privacy, source, memory_mib, vcpus, created_at, dir)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![t.id, t.name, t.workspace, t.privacy.as_str(), t.source, t.memory_mib, t.vcpus, t.created_at, dir],
    )?;
    Ok(())
}

/// The template and its snapshot directory.
pub fn get(c: &Connection, id: &str) -> rusqlite::Result<Option<(Template, String)>> {
    c.query_row(&format!("SELECT {COLS} FROM templates WHERE id = ?1"), [id], from_row).optional()
}

pub fn delete(c: &Connection, id: &str) -> rusqlite::Result<()> {
    c.execute("DELETE FROM templates WHERE id = ?1", [id])?;
    Ok(())
}

/// `workspace`'s templates and every public one.
pub fn list(c: &Connection, workspace: &str) -> rusqlite::Result<Vec<Template>> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLS} FROM templates WHERE workspace = ?1 OR privacy = 'public' ORDER BY created_at"
    ))?;
    let rows = st.query_map([workspace], from_row)?;
    rows.map(|r| r.map(|(t, _)| t)).collect()
}
