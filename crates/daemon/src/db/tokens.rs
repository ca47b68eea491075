//! Workspace bearer tokens, stored as SHA-256 hashes (the token itself is shown once).

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A workspace name: 1..=64 of `[A-Za-z0-9._-]`.
pub fn check_workspace(w: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if w.is_empty() || w.len() > 64 || !w.chars().all(ok) {
        return Err(format!("invalid workspace {w:?}: use 1 to 64 letters, digits, '.', '_' or '-'"));
    }
    Ok(())
}

/// Creates a token for `workspace` and returns it (the only time it is visible).
pub fn create(conn: &Connection, workspace: &str) -> Result<String, String> {
    check_workspace(workspace)?;
    let token = format!("fkv_{}", crate::util::random_hex(24));
    conn.execute(
        "INSERT INTO tokens(hash, workspace, created_at) VALUES (?1, ?2, ?3)",
        params![hash(&token), workspace, crate::util::now()],
    )
    .map_err(|e| e.to_string())?;
    Ok(token)
}

/// The workspace of `token`, if it is one of ours.
pub fn workspace_of(conn: &Connection, token: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT workspace FROM tokens WHERE hash = ?1", [hash(token)], |r| r.get(0)).optional()
}
