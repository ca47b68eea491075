//! The messages. Host → agent: hello, ping, exec (+ stdin), read_file, write_file, clone_hook.
//! Agent → host: hello, pong, stdout, stderr, exit, file_data, written, clone_hook_done, error.

use serde::{Deserialize, Serialize};

/// Run a program. With `stdin`, the host follows with `stdin` frames (the last one `eof`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub stdin: bool,
    /// Kill the process (group) after this long; 0 = the agent's default.
    #[serde(default)]
    pub timeout_ms: u64,
    /// Stop forwarding stdout + stderr after this many bytes (the rest is drained and dropped);
    /// 0 = the agent's default. The agent caps it.
    #[serde(default)]
    pub max_output: u64,
}

/// Read up to `max_len` bytes of a file from `offset`; answered by `file_data` frames, the
/// last one with `eof`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileRequest {
    pub path: String,
    #[serde(default)]
    pub offset: u64,
    pub max_len: u64,
}

/// Write the frame's data to a file: `append` = false creates / truncates it first (with
/// `mode`), true appends (the chunks after the first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileRequest {
    pub path: String,
    #[serde(default = "default_mode")]
    pub mode: u32,
    #[serde(default)]
    pub append: bool,
}

fn default_mode() -> u32 {
    0o644
}

/// One user hook's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookResult {
    pub name: String,
    pub ok: bool,
    #[serde(default)]
    pub detail: String,
}

/// What the clone hook did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookDone {
    pub generation: u64,
    pub reseeded: bool,
    pub entropy_before: i32,
    pub entropy_after: i32,
    /// How far CLOCK_REALTIME was stepped (host - guest before the step), in ns.
    pub clock_step_ns: i64,
    pub clock_set: bool,
    pub hooks: Vec<HookResult>,
    /// Failures of the reseed or clock step (the hook still answers).
    #[serde(default)]
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum Msg {
    Hello {
        version: u32,
        #[serde(default)]
        agent: String,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Exec(ExecRequest),
    /// Data: bytes for the process's stdin.
    Stdin {
        #[serde(default)]
        eof: bool,
    },
    /// Data: a chunk of the process's stdout.
    Stdout,
    /// Data: a chunk of the process's stderr.
    Stderr,
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
        #[serde(default)]
        timed_out: bool,
        #[serde(default)]
        truncated: bool,
    },
    ReadFile(ReadFileRequest),
    /// Data: a chunk of the file.
    FileData {
        #[serde(default)]
        eof: bool,
    },
    /// Data: the chunk to write.
    WriteFile(WriteFileRequest),
    Written {
        bytes: u64,
    },
    /// Data: the 32-byte seed. `host_time_ns` is the host's CLOCK_REALTIME when sent.
    CloneHook {
        generation: u64,
        host_time_ns: i64,
    },
    CloneHookDone(HookDone),
    Error {
        message: String,
    },
}

impl Msg {
    /// Messages whose frames may carry data.
    pub fn carries_data(&self) -> bool {
        matches!(
            self,
            Msg::Stdin { .. }
                | Msg::Stdout
                | Msg::Stderr
                | Msg::FileData { .. }
                | Msg::WriteFile(_)
                | Msg::CloneHook { .. }
        )
    }

    /// The message's tag, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Ping { .. } => "ping",
            Msg::Pong { .. } => "pong",
            Msg::Exec(_) => "exec",
            Msg::Stdin { .. } => "stdin",
            Msg::Stdout => "stdout",
            Msg::Stderr => "stderr",
            Msg::Exit { .. } => "exit",
            Msg::ReadFile(_) => "read_file",
            Msg::FileData { .. } => "file_data",
            Msg::WriteFile(_) => "write_file",
            Msg::Written { .. } => "written",
            Msg::CloneHook { .. } => "clone_hook",
            Msg::CloneHookDone(_) => "clone_hook_done",
            Msg::Error { .. } => "error",
        }
    }
}
