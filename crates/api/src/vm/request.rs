//! Requests to a VMM process: one struct per operation, tagged by `op` on the wire.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::limits::*;
use super::response::*;

/// A request to a VMM process: `{"op":"exec","line":"ping"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status(Status),
    Pause(Pause),
    Resume(Resume),
    Exec(Exec),
    AgentExec(AgentExec),
    Snapshot(Snapshot),
    Fork(Fork),
    Hibernate(Hibernate),
    Stop(Stop),
    CloneServe(CloneServe),
}

/// An operation: its request struct and the response struct its answer carries.
pub trait Op: Into<Request> {
    type Response: Serialize + DeserializeOwned;
}

macro_rules! op {
    ($req:ident => $resp:ident) => {
        impl From<$req> for Request {
            fn from(r: $req) -> Request {
                Request::$req(r)
            }
        }
        impl Op for $req {
            type Response = $resp;
        }
    };
}

/// Name, pid, state, memory size, generation, parent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {}
op!(Status => StatusResponse);

/// Park all vCPUs at an instruction boundary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pause {}
op!(Pause => PauseResponse);

/// Continue parked vCPUs exactly where they stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resume {}
op!(Resume => ResumeResponse);

fn default_timeout_ms() -> u64 {
    DEFAULT_EXEC_TIMEOUT_MS
}

/// Send `line` to the guest console and return the lines it prints: the next one, or all up to
/// the first containing `wait_for`, within `timeout_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    pub line: String,
    #[serde(default)]
    pub wait_for: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}
op!(Exec => ExecResponse);

impl Exec {
    /// `line`, answered by the next console line, default timeout.
    pub fn new(line: impl Into<String>) -> Self {
        Exec { line: line.into(), wait_for: None, timeout_ms: DEFAULT_EXEC_TIMEOUT_MS }
    }
}

/// Run `argv` through the guest agent (vsock port 52) after the clone hook (if one is pending):
/// stdout and stderr apart, the exit code or signal, within `timeout_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentExec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes for the program's stdin (UTF-8, at most `MAX_AGENT_STDIN`).
    #[serde(default)]
    pub stdin: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}
op!(AgentExec => AgentExecResponse);

/// Snapshot into `dir` (full, or a diff against this VM's previous snapshot). A running VM is
/// paused for the snapshot and resumed afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub dir: PathBuf,
    #[serde(default)]
    pub diff: bool,
}
op!(Snapshot => SnapshotResponse);

/// Fork-clone into `count` running children, each its own VMM process with its own API socket
/// and console log, named `<prefix><i>` (default prefix `<name>-c`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fork {
    pub count: usize,
    #[serde(default)]
    pub prefix: Option<String>,
}
op!(Fork => ForkResponse);

/// Snapshot into the chunk store (default: the VMM's default store) and exit, freeing the VM's
/// memory; the VM's directory keeps the hibernation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hibernate {
    #[serde(default)]
    pub store: Option<PathBuf>,
}
op!(Hibernate => HibernateResponse);

/// Stop the VM; the answer comes once the VM is stopped and its files are removed, and the
/// connection closes when the VMM process has exited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stop {}
op!(Stop => StopResponse);

/// Serve live clones of this VM (shared-file memory) to other hosts over TCP: every
/// authenticated connection to `listen` is one clone request (the VM pauses to capture its state
/// and write-protect its memory, then runs on; the client gets the state and the memory of that
/// instant). `listen: None` stops serving (clones not yet filled then stop).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneServe {
    /// HOST:PORT to listen on.
    #[serde(default)]
    pub listen: Option<String>,
    /// The shared secret file (absolute path, mode 0600).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}
op!(CloneServe => CloneServeResponse);

/// Why a request line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("bad request: longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    #[error("bad request: {0}")]
    Malformed(String),
    #[error("bad request: {0}")]
    Invalid(String),
}

/// Parses and validates one request line (with or without its trailing newline): the one
/// entry point servers use, and the one the fuzz target drives.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLong);
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let req: Request = serde_json::from_slice(line).map_err(|e| RequestError::Malformed(e.to_string()))?;
    req.validate().map_err(RequestError::Invalid)?;
    Ok(req)
}

fn check_path(what: &str, p: &Path) -> Result<(), String> {
    let bytes = p.as_os_str().len();
    if bytes == 0 || bytes > MAX_PATH_BYTES {
        return Err(format!("{what} must be 1 to {MAX_PATH_BYTES} bytes"));
    }
    if !p.is_absolute() {
        return Err(format!("{what} must be an absolute path, not {}", p.display()));
    }
    if p.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(format!("{what} contains a NUL byte"));
    }
    Ok(())
}

impl Request {
    /// Checks every bound of the request (see [`super::limits`]).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Request::Exec(e) => {
                if e.line.len() > MAX_EXEC_LINE {
                    return Err(format!("exec line is {} bytes, the limit is {MAX_EXEC_LINE}", e.line.len()));
                }
                if e.line.contains(['\n', '\r', '\0']) {
                    return Err("exec line must not contain newlines or NUL bytes".into());
                }
                if e.wait_for.as_ref().is_some_and(|w| w.len() > MAX_EXEC_LINE) {
                    return Err(format!("wait_for is longer than {MAX_EXEC_LINE} bytes"));
                }
                if e.timeout_ms == 0 || e.timeout_ms > MAX_EXEC_TIMEOUT_MS {
                    return Err(format!(
                        "exec timeout_ms must be 1 to {MAX_EXEC_TIMEOUT_MS} ({} s), not {}",
                        MAX_EXEC_TIMEOUT_MS / 1000,
                        e.timeout_ms
                    ));
                }
            }
            Request::AgentExec(e) => {
                if e.argv.is_empty() || e.argv.len() > MAX_AGENT_ARGS || e.env.len() > MAX_AGENT_ARGS {
                    return Err(format!(
                        "agent_exec needs 1 to {MAX_AGENT_ARGS} arguments and at most as many env vars"
                    ));
                }
                let strings = e.argv.iter().chain(e.env.iter().flat_map(|(k, v)| [k, v])).chain(&e.cwd);
                if strings.clone().any(|a| a.contains('\0'))
                    || e.env.iter().any(|(k, _)| k.is_empty() || k.contains('='))
                {
                    return Err(
                        "agent_exec arguments must not contain NUL bytes; env names are non-empty without '='".into()
                    );
                }
                if e.stdin.as_ref().is_some_and(|s| s.len() > MAX_AGENT_STDIN) {
                    return Err(format!("agent_exec stdin is over {MAX_AGENT_STDIN} bytes"));
                }
                if e.timeout_ms == 0 || e.timeout_ms > MAX_EXEC_TIMEOUT_MS {
                    return Err(format!(
                        "agent_exec timeout_ms must be 1 to {MAX_EXEC_TIMEOUT_MS}, not {}",
                        e.timeout_ms
                    ));
                }
            }
            Request::Snapshot(s) => check_path("snapshot dir", &s.dir)?,
            Request::Hibernate(h) => {
                if let Some(s) = &h.store {
                    check_path("store", s)?;
                }
            }
            Request::Fork(f) => {
                if !(1..=MAX_FORK_COUNT).contains(&f.count) {
                    return Err(format!("fork count must be 1 to {MAX_FORK_COUNT}, not {}", f.count));
                }
                if let Some(p) = &f.prefix {
                    super::check_name(&format!("{p}{MAX_FORK_COUNT}")).map_err(|_| {
                        format!("invalid VM name prefix {p:?}: children are named <prefix>1..<prefix>N")
                    })?;
                }
            }
            Request::CloneServe(c) => match (&c.listen, &c.secret_file) {
                (Some(l), Some(f)) => {
                    if l.is_empty() || l.len() > 256 || l.contains(['\0', '\n', '/']) {
                        return Err(format!("clone_serve listen must be HOST:PORT, not {l:?}"));
                    }
                    check_path("secret file", f)?;
                }
                (Some(_), None) => return Err("clone_serve needs secret_file with listen".into()),
                (None, _) => {}
            },
            Request::Status(_) | Request::Pause(_) | Request::Resume(_) | Request::Stop(_) => {}
        }
        Ok(())
    }

    /// The operation's name as on the wire (`"exec"`).
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Status(_) => "status",
            Request::Pause(_) => "pause",
            Request::Resume(_) => "resume",
            Request::Exec(_) => "exec",
            Request::AgentExec(_) => "agent_exec",
            Request::Snapshot(_) => "snapshot",
            Request::Fork(_) => "fork",
            Request::Hibernate(_) => "hibernate",
            Request::Stop(_) => "stop",
            Request::CloneServe(_) => "clone_serve",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_junk() {
        let r = parse_request(br#"{"op":"exec","line":"ping"}"#).unwrap();
        assert_eq!(r, Request::Exec(Exec::new("ping")));
        assert_eq!(parse_request(b"{\"op\":\"status\"}\r\n").unwrap(), Request::Status(Status {}));
        let s = serde_json::to_string(&Request::from(Fork { count: 3, prefix: None })).unwrap();
        assert_eq!(s, r#"{"op":"fork","count":3,"prefix":null}"#);
        assert_eq!(parse_request(s.as_bytes()).unwrap(), Request::Fork(Fork { count: 3, prefix: None }));
        for junk in [
            r#"{"op":"explode"}"#,
            r#"{"op":"fork"}"#,
            r#"{"op":"exec","line":"x","y":1}"#,
            r#"{"op":"status","x":1}"#,
            "[]",
            "{",
            "",
            "\u{0}",
        ] {
            assert!(matches!(parse_request(junk.as_bytes()), Err(RequestError::Malformed(_))), "{junk}");
        }
    }

    #[test]
    fn bounds_are_enforced() {
        let too_long = format!(r#"{{"op":"exec","line":"{}"}}"#, "x".repeat(MAX_REQUEST_BYTES));
        assert_eq!(parse_request(too_long.as_bytes()), Err(RequestError::TooLong));
        for bad in [
            r#"{"op":"exec","line":"ping","timeout_ms":18446744073709551615}"#.to_string(),
            r#"{"op":"exec","line":"ping","timeout_ms":0}"#.to_string(),
            r#"{"op":"exec","line":"a\nb"}"#.to_string(),
            format!(r#"{{"op":"exec","line":"{}"}}"#, "x".repeat(MAX_EXEC_LINE + 1)),
            r#"{"op":"fork","count":65}"#.to_string(),
            r#"{"op":"fork","count":0}"#.to_string(),
            r#"{"op":"fork","count":1,"prefix":"../x"}"#.to_string(),
            r#"{"op":"snapshot","dir":"relative"}"#.to_string(),
            r#"{"op":"snapshot","dir":""}"#.to_string(),
            r#"{"op":"hibernate","store":"rel"}"#.to_string(),
        ] {
            assert!(matches!(parse_request(bad.as_bytes()), Err(RequestError::Invalid(_))), "{bad}");
        }
        for bad in [
            r#"{"op":"agent_exec","argv":[]}"#.to_string(),
            r#"{"op":"agent_exec","argv":["a\u0000b"]}"#.to_string(),
            r#"{"op":"agent_exec","argv":["true"],"env":[["A=B","c"]]}"#.to_string(),
            r#"{"op":"agent_exec","argv":["true"],"timeout_ms":0}"#.to_string(),
            format!(r#"{{"op":"agent_exec","argv":["cat"],"stdin":"{}"}}"#, "x".repeat(MAX_AGENT_STDIN + 1)),
        ] {
            assert!(matches!(parse_request(bad.as_bytes()), Err(RequestError::Invalid(_))), "{bad}");
        }
        let ok = parse_request(br#"{"op":"agent_exec","argv":["sh","-c","exit 3"],"env":[["A","1"]]}"#).unwrap();
        assert_eq!(ok.op_name(), "agent_exec");
        let huge = r#"{"op":"fork","count":99999999999999999999999}"#;
        assert!(parse_request(huge.as_bytes()).is_err());
        let e = parse_request(br#"{"op":"exec","line":"p","timeout_ms":700000}"#).unwrap_err();
        assert!(e.to_string().contains("timeout_ms must be 1 to 600000"), "{e}");
    }

    #[test]
    fn clone_serve_requests_are_bounded() {
        for bad in [
            r#"{"op":"clone_serve","listen":"10.0.0.1:7070"}"#.to_string(),
            r#"{"op":"clone_serve","listen":"10.0.0.1:7070","secret_file":"rel/key"}"#.to_string(),
            r#"{"op":"clone_serve","listen":"","secret_file":"/k"}"#.to_string(),
            r#"{"op":"clone_serve","listen":"a/b:1","secret_file":"/k"}"#.to_string(),
            format!(r#"{{"op":"clone_serve","listen":"{}:1","secret_file":"/k"}}"#, "h".repeat(300)),
        ] {
            assert!(matches!(parse_request(bad.as_bytes()), Err(RequestError::Invalid(_))), "{bad}");
        }
        let r = parse_request(br#"{"op":"clone_serve","listen":"10.0.0.1:7070","secret_file":"/etc/k"}"#).unwrap();
        assert_eq!(r.op_name(), "clone_serve");
        assert_eq!(parse_request(br#"{"op":"clone_serve"}"#).unwrap(), Request::CloneServe(CloneServe::default()));
        assert!(parse_request(br#"{"op":"clone_serve","port":1}"#).is_err(), "unknown fields are refused");
    }
}
