//! The per-VM control API: every VMM process serves one Unix socket, `<run dir>/<name>/api.sock`,
//! taking one JSON request line per connection and answering one JSON response line.
//!
//! ```text
//! {"op":"status"}                         -> {"ok":true,"data":{"name":..,"state":"running",..}}
//! {"op":"exec","line":"ping"}             -> {"ok":true,"data":{"lines":["pong"]}}
//! {"op":"snapshot","dir":"/s","diff":false}
//! {"op":"fork","count":2}                 -> {"ok":true,"data":{"children":[{"name":..,"pid":..}],..}}
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest request or response line accepted.
pub const MAX_LINE: u64 = 1 << 20;

fn default_timeout_ms() -> u64 {
    10_000
}

/// A request to a VMM process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Name, pid, state, memory size, generation, parent.
    Status,
    /// Park all vCPUs.
    Pause,
    /// Continue parked vCPUs.
    Resume,
    /// Send `line` to the guest console and return the lines it prints: the next one, or all up
    /// to the first containing `wait_for`.
    Exec {
        line: String,
        #[serde(default)]
        wait_for: Option<String>,
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
    /// Snapshot into `dir` (full, or a diff against this VM's previous snapshot). A running VM is
    /// paused for the snapshot and resumed afterwards.
    Snapshot {
        dir: PathBuf,
        #[serde(default)]
        diff: bool,
    },
    /// Fork-clone into `count` running children, each its own VMM process with its own API socket
    /// and console log, named `<prefix><i>` (default prefix `<name>-c`).
    Fork {
        count: usize,
        #[serde(default)]
        prefix: Option<String>,
    },
    /// Snapshot into the chunk store and exit, freeing the VM's memory.
    Hibernate {
        #[serde(default)]
        store: Option<PathBuf>,
    },
    /// Stop the VM and its VMM process.
    Stop,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Response { ok: true, error: None, data }
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Response { ok: false, error: Some(msg.into()), data: serde_json::Value::Null }
    }
}

/// Where VMM processes keep their sockets, logs and pid files: `FORKVM_RUN_DIR`, else
/// `/run/forkvm` for root, else `$XDG_RUNTIME_DIR/forkvm`, else `/tmp/forkvm-<uid>`.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FORKVM_RUN_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return PathBuf::from("/run/forkvm");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("forkvm"),
        None => std::env::temp_dir().join(format!("forkvm-{uid}")),
    }
}

/// A VM name: 1..=64 of `[A-Za-z0-9._-]`, not starting with a dot or dash.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok_char) || name.starts_with(['.', '-']) {
        return Err(format!("invalid VM name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'"));
    }
    Ok(())
}

/// The directory of VM `name`.
pub fn vm_dir(name: &str) -> Result<PathBuf, String> {
    check_name(name)?;
    Ok(run_dir().join(name))
}

pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("api.sock")
}

/// Sends one request to the VM in `dir` and returns its data, or its error as `Err`.
pub fn call_dir(dir: &Path, name: &str, req: &Request, timeout: Duration) -> Result<serde_json::Value, String> {
    let sock = socket_path(dir);
    let stream = UnixStream::connect(&sock).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            format!("no running VM named {name:?} (see `forkvm ls`)")
        }
        _ => format!("cannot connect to {}: {e}", sock.display()),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(|e| format!("VM {name:?}: cannot send request: {e}"))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .take(MAX_LINE)
        .read_line(&mut answer)
        .map_err(|e| format!("VM {name:?}: no answer within {timeout:?}: {e}"))?;
    if answer.is_empty() {
        return Err(format!("VM {name:?} closed the connection without answering (did it exit?)"));
    }
    let resp: Response =
        serde_json::from_str(&answer).map_err(|e| format!("VM {name:?} sent a malformed answer: {e}"))?;
    match (resp.ok, resp.error) {
        (true, _) => Ok(resp.data),
        (false, Some(e)) => Err(e),
        (false, None) => Err(format!("VM {name:?} refused the request")),
    }
}

/// Sends one request to the VM called `name`.
pub fn call(name: &str, req: &Request, timeout: Duration) -> Result<serde_json::Value, String> {
    call_dir(&vm_dir(name)?, name, req, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_junk() {
        let r: Request = serde_json::from_str(r#"{"op":"exec","line":"ping"}"#).unwrap();
        assert_eq!(r, Request::Exec { line: "ping".into(), wait_for: None, timeout_ms: 10_000 });
        let s = serde_json::to_string(&Request::Fork { count: 3, prefix: None }).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), Request::Fork { count: 3, prefix: None });
        for junk in [r#"{"op":"explode"}"#, r#"{"op":"fork"}"#, r#"{"op":"exec","line":"x","y":1}"#, "[]", "{"] {
            assert!(serde_json::from_str::<Request>(junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn names() {
        for good in ["a", "vm-1", "x.y_z", &"n".repeat(64)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "-x", "a/b", "a b", &"n".repeat(65), "é"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
