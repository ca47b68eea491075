//! Answers of a VMM process: the [`Reply`] envelope and one response struct per operation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Every answer line: `{"ok":true,"data":{...}}` or `{"ok":false,"error":"why"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply<T> {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
}

impl<T> Reply<T> {
    pub fn ok(data: T) -> Self {
        Reply { ok: true, error: None, data: Some(data) }
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Reply { ok: false, error: Some(msg.into()), data: None }
    }

    /// The data, or the error as `Err`.
    pub fn into_result(self) -> Result<T, String> {
        match (self.ok, self.data, self.error) {
            (true, Some(d), _) => Ok(d),
            (true, None, _) => Err("the answer has no data".into()),
            (false, _, Some(e)) => Err(e),
            (false, _, None) => Err("the request was refused".into()),
        }
    }
}

impl<T: Serialize> Reply<T> {
    /// The answer line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|e| format!(r#"{{"ok":false,"error":"cannot encode the answer: {e}"}}"#));
        s.push('\n');
        s
    }
}

/// Whether a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
    /// The guest exited or the VM was stopped; the VMM is about to go.
    Exited,
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Exited => "exited",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub name: String,
    pub pid: u32,
    pub state: RunState,
    /// Why it exited (state `exited`).
    #[serde(default)]
    pub exit: Option<String>,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub generation: u64,
    /// The VM this one was forked from.
    #[serde(default)]
    pub parent: Option<String>,
    pub uptime_s: f64,
    pub console_log: PathBuf,
    /// Whether this clone's guest agent took its fresh seed: true, false, "no agent",
    /// "pending", or null for a VM that is not a clone (booted).
    #[serde(default)]
    pub reseeded: serde_json::Value,
    /// What the clone hook did (generation, clock step, user hooks) or why it did not run.
    #[serde(default)]
    pub clone_hook: serde_json::Value,
    /// The page server of a lazily woken VM (absent once all memory is resident, or never woken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_server: Option<PageServerStats>,
}

/// Counters of a woken VM's page server (userfaultfd faults served from the chunk store).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PageServerStats {
    pub faults: u64,
    pub pages_served: u64,
    pub pages_prefetched: u64,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PauseResponse {
    pub pause_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResumeResponse {
    pub resume_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResponse {
    /// The console lines, without line ends.
    pub lines: Vec<String>,
}

/// A program's outcome through the guest agent (output decoded as UTF-8, lossily).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentExecResponse {
    pub stdout: String,
    pub stderr: String,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The agent killed it at the deadline.
    pub timed_out: bool,
    /// Output beyond `MAX_AGENT_OUTPUT` was dropped.
    pub truncated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    Full,
    Diff,
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Diff => "diff",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotResponse {
    pub dir: PathBuf,
    pub kind: SnapshotKind,
    pub pause_ms: f64,
    pub snapshot_ms: f64,
    pub state_bytes: u64,
    pub pages_written: u64,
    pub memory_disk_bytes: u64,
    /// The memory file was linked in, not written (shared-file memory).
    pub linked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkChild {
    pub name: String,
    pub pid: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForkResponse {
    pub children: Vec<ForkChild>,
    pub pause_ms: f64,
    pub save_ms: f64,
    pub fork_ms: f64,
    pub fork_total_ms: f64,
    /// Until every child answered that its VM runs.
    pub ready_ms: f64,
    /// How the children were made: "fork" (fork() of the VMM) or "pool" (live clone into warm
    /// pool VMMs; then fork_ms is the write-protect time and fork_total_ms the parent's pause).
    #[serde(default)]
    pub via: String,
}

/// Where clones of the VM are served (`None`: no longer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneServeResponse {
    /// The address bound (tcp://HOST:PORT).
    pub listening: Option<String>,
    /// Clones served since serving began (connections that took a clone instant).
    pub clones: u64,
}

/// What a hibernation did (times in ms, sizes in bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HibernateResponse {
    /// Image name in the store.
    pub image: String,
    pub store: PathBuf,
    pub pause_ms: f64,
    pub save_ms: f64,
    pub store_ms: f64,
    pub total_ms: f64,
    pub bytes_raw: u64,
    pub bytes_nonzero: u64,
    /// Bytes newly appended to the store.
    pub bytes_stored: u64,
    pub pages_total: u64,
    pub pages_zero: u64,
    pub pages_unique: u64,
    pub pages_dedup: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopResponse {
    /// The VMM process, exiting.
    pub pid: u32,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replies_round_trip() {
        let line = Reply::ok(PauseResponse { pause_ms: 1.5 }).to_line();
        assert_eq!(line, "{\"ok\":true,\"data\":{\"pause_ms\":1.5}}\n");
        let r: Reply<PauseResponse> = serde_json::from_str(&line).unwrap();
        assert_eq!(r.into_result().unwrap().pause_ms, 1.5);
        let line = Reply::<()>::err("VM \"a\" is paused").to_line();
        let r: Reply<ExecResponse> = serde_json::from_str(&line).unwrap();
        assert_eq!(r.into_result().unwrap_err(), "VM \"a\" is paused");
    }
}
