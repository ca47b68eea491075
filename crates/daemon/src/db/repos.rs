//! Repositories registered for pull-request preloading, their PR sandboxes, and the webhook
//! deliveries already seen.

use forkvm_api::v1::Repo;
use rusqlite::{params, Connection, OptionalExtension};

pub fn upsert(c: &Connection, r: &Repo, secret: &str) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO repos(repo, workspace, template, setup, secret, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(repo) DO UPDATE SET template = ?3, setup = ?4, secret = ?5",
        params![r.repo, r.workspace, r.template, r.setup, secret, crate::util::now()],
    )?;
    Ok(())
}

/// The repos that preload pull requests from template `tid`.
pub fn using_template(c: &Connection, tid: &str) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare_cached("SELECT repo FROM repos WHERE template = ?1 ORDER BY repo")?;
    let rows = st.query_map([tid], |r| r.get(0))?;
    rows.collect()
}

/// The repo and its webhook secret.
pub fn get(c: &Connection, repo: &str) -> rusqlite::Result<Option<(Repo, String)>> {
    c.query_row("SELECT repo, workspace, template, setup, secret FROM repos WHERE repo = ?1", [repo], |r| {
        Ok((Repo { repo: r.get(0)?, workspace: r.get(1)?, template: r.get(2)?, setup: r.get(3)? }, r.get(4)?))
    })
    .optional()
}

/// Records a delivery id; false when it was seen before (a replay).
pub fn first_delivery(c: &Connection, id: &str) -> rusqlite::Result<bool> {
    let n = c.execute(
        "INSERT OR IGNORE INTO deliveries(id, received_at) VALUES (?1, ?2)",
        params![id, crate::util::now()],
    )?;
    Ok(n == 1)
}

/// The PR's sandbox and head sha.
pub fn pull(c: &Connection, repo: &str, number: u64) -> rusqlite::Result<Option<(String, String)>> {
    c.query_row("SELECT sandbox, head_sha FROM pulls WHERE repo = ?1 AND number = ?2", params![repo, number], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

pub fn set_pull(c: &Connection, repo: &str, number: u64, sandbox: &str, sha: &str) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO pulls(repo, number, sandbox, head_sha) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(repo, number) DO UPDATE SET sandbox = ?3, head_sha = ?4",
        params![repo, number, sandbox, sha],
    )?;
    Ok(())
}

pub fn delete_pull(c: &Connection, repo: &str, number: u64) -> rusqlite::Result<()> {
    c.execute("DELETE FROM pulls WHERE repo = ?1 AND number = ?2", params![repo, number])?;
    Ok(())
}
