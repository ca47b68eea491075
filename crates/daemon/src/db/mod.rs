//! The daemon's state in SQLite (WAL, migrations in code, one connection behind a mutex: every
//! query is short).

pub mod events;
pub mod repos;
pub mod sandboxes;
pub mod templates;
pub mod tokens;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;

/// Each entry migrates the schema from version `i` to `i + 1` (`PRAGMA user_version`).
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE sandboxes(
        id TEXT PRIMARY KEY, name TEXT NOT NULL, workspace TEXT NOT NULL, privacy TEXT NOT NULL,
        template TEXT, parent TEXT, state TEXT NOT NULL, memory_mib INTEGER NOT NULL,
        vcpus INTEGER NOT NULL, created_at REAL NOT NULL, last_active REAL NOT NULL,
        state_since REAL NOT NULL, pause_after INTEGER NOT NULL, hibernate_after INTEGER NOT NULL,
        pid INTEGER);
     CREATE INDEX sandboxes_workspace ON sandboxes(workspace);
     CREATE INDEX sandboxes_parent ON sandboxes(parent);
     CREATE TABLE templates(
        id TEXT PRIMARY KEY, name TEXT NOT NULL, workspace TEXT NOT NULL, privacy TEXT NOT NULL,
        source TEXT NOT NULL, dir TEXT NOT NULL, memory_mib INTEGER NOT NULL, vcpus INTEGER NOT NULL,
        created_at REAL NOT NULL);
     CREATE TABLE tokens(hash TEXT PRIMARY KEY, workspace TEXT NOT NULL, created_at REAL NOT NULL);
     CREATE TABLE repos(
        repo TEXT PRIMARY KEY, workspace TEXT NOT NULL, template TEXT NOT NULL, setup TEXT,
        secret TEXT NOT NULL, created_at REAL NOT NULL);
     CREATE TABLE pulls(
        repo TEXT NOT NULL, number INTEGER NOT NULL, sandbox TEXT NOT NULL, head_sha TEXT NOT NULL,
        PRIMARY KEY(repo, number));
     CREATE TABLE deliveries(id TEXT PRIMARY KEY, received_at REAL NOT NULL);
     CREATE TABLE events(
        id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, workspace TEXT NOT NULL,
        sandbox TEXT NOT NULL, kind TEXT NOT NULL, from_state TEXT, to_state TEXT,
        detail TEXT NOT NULL);
     CREATE INDEX events_workspace ON events(workspace, id);",
    // How many children a sandbox was ever forked into: its children are named <name>-fork<n>
    // with n counting on across forks. Before, every fork counted from 1; start after the
    // children there are, so no new name repeats one of theirs.
    "ALTER TABLE sandboxes ADD COLUMN forks INTEGER NOT NULL DEFAULT 0;
     UPDATE sandboxes SET forks = (SELECT COUNT(*) FROM sandboxes AS c WHERE c.parent = sandboxes.id);",
];

#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
}

impl Db {
    /// Opens (creating, mode 0600) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Db, String> {
        let fail = |e: rusqlite::Error| format!("database {}: {e}", path.display());
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        }
        let conn = Connection::open(path).map_err(fail)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(fail)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(fail)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(fail)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(fail)?;
        migrate(&conn).map_err(fail)?;
        Ok(Db { conn: Mutex::new(conn) })
    }

    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn migrations_run_once_and_reopen_cleanly() {
        let dir = std::env::temp_dir().join(format!("forkvmd-db-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        drop(Db::open(&path).unwrap());
        let db = Db::open(&path).unwrap();
        let v: usize = db.lock().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(v, MIGRATIONS.len());
        let mode: String = db.lock().pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fork_numbers_of_an_old_database_start_after_its_children() {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(MIGRATIONS[0]).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        let row = "INSERT INTO sandboxes(id, name, workspace, privacy, parent, state, memory_mib, vcpus,
                created_at, last_active, state_since, pause_after, hibernate_after)
             VALUES (?1, ?2, 'ws', 'private', ?3, 'running', 64, 1, 0, 0, 0, 0, 0)";
        c.execute(row, rusqlite::params!["sb-p", "p", None::<String>]).unwrap();
        // Two forks of one child each, both named p-fork1 before.
        for id in ["sb-a", "sb-b"] {
            c.execute(row, rusqlite::params![id, "p-fork1", "sb-p"]).unwrap();
        }
        migrate(&c).unwrap();
        assert_eq!(sandboxes::take_fork_numbers(&c, "sb-p", 2).unwrap(), 3);
        assert_eq!(sandboxes::take_fork_numbers(&c, "sb-p", 1).unwrap(), 5);
        assert_eq!(sandboxes::take_fork_numbers(&c, "sb-a", 1).unwrap(), 1);
    }
}
