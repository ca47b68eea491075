//! `forkvm exec NAME -- ARGV...`: the VMM process runs the program through the guest agent
//! (after the clone hook, if one is pending) and answers with both streams and the exit status;
//! the CLI prints the streams apart and exits with the program's code.

use std::path::Path;
use std::time::Duration;

use forkvm_api::vm::{self, limits, AgentExecResponse, Client};
use vmm::agent::{AgentAddr, ExecRequest, HookState, Stream};
use vmm::MicroVm;

use crate::cli::ExecArgs;

/// The VM's vsock host socket in its directory (Firecracker's convention).
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Longest wait for a clone hook before a guest request is refused.
pub const GATE_WAIT: Duration = Duration::from_secs(60);

/// The agent of the VM whose directory is `dir`: behind its vsock socket, or (debugging and
/// host tests) on the Unix socket `FORKVM_AGENT_SOCKET` names.
pub fn addr(dir: &Path) -> AgentAddr {
    match std::env::var_os("FORKVM_AGENT_SOCKET") {
        Some(p) => AgentAddr::Unix(p.into()),
        None => AgentAddr::vsock(dir.join(VSOCK_SOCKET)),
    }
}

/// Waits until the clone hook (if any) has run: nothing reaches the guest before it.
pub fn wait_gate(vm: &MicroVm) -> Result<HookState, String> {
    match vm.agent_gate().wait(GATE_WAIT) {
        HookState::Pending => Err(format!("the clone hook is still running after {GATE_WAIT:?}")),
        s => Ok(s),
    }
}

/// Runs a program through the agent (the VMM side of `agent_exec`).
pub fn exec(vm: &MicroVm, dir: &Path, req: vm::AgentExec) -> Result<AgentExecResponse, String> {
    if vm.is_paused() {
        return Err("the VM is paused: resume it first".into());
    }
    wait_gate(vm)?;
    let timeout = Duration::from_millis(req.timeout_ms);
    let mut c = addr(dir).connect(Duration::from_secs(10)).map_err(|e| {
        format!("no guest agent answers ({e}); `forkvm exec NAME LINE` types into the serial console instead")
    })?;
    let stdin = req.stdin.map(String::into_bytes);
    let er = ExecRequest {
        argv: req.argv,
        env: req.env,
        cwd: req.cwd,
        stdin: false,
        timeout_ms: req.timeout_ms,
        max_output: limits::MAX_AGENT_OUTPUT,
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    // The guest is untrusted: whatever its agent sends, we keep at most MAX_AGENT_OUTPUT bytes.
    let mut dropped = false;
    let exit = c
        .exec(er, stdin.as_deref(), timeout, |s, d| {
            let room = (limits::MAX_AGENT_OUTPUT as usize).saturating_sub(out.len() + err.len());
            let keep = &d[..d.len().min(room)];
            dropped |= keep.len() < d.len();
            match s {
                Stream::Stdout => out.extend_from_slice(keep),
                Stream::Stderr => err.extend_from_slice(keep),
            }
        })
        .map_err(|e| format!("exec through the agent: {e}"))?;
    Ok(AgentExecResponse {
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        code: exit.code,
        signal: exit.signal,
        timed_out: exit.timed_out,
        truncated: exit.truncated || dropped,
    })
}

/// The CLI side: sends the request, prints the streams apart, returns the program's exit code.
pub fn run_cli(a: &ExecArgs, timeout: Duration) -> Result<i32, String> {
    use std::io::{Read, Write};
    let env = a
        .env
        .iter()
        .map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect::<Option<Vec<_>>>()
        .ok_or("--env takes NAME=VALUE")?;
    let stdin = if a.stdin {
        let mut s = String::new();
        let max = limits::MAX_AGENT_STDIN as u64;
        std::io::stdin().take(max + 1).read_to_string(&mut s).map_err(|e| format!("stdin: {e}"))?;
        if s.len() as u64 > max {
            return Err(format!("stdin is over {max} bytes"));
        }
        Some(s)
    } else {
        None
    };
    let req =
        vm::AgentExec { argv: a.argv.clone(), env, cwd: a.cwd.clone(), stdin, timeout_ms: timeout.as_millis() as u64 };
    let c = Client::for_name(&a.name).map_err(|e| e.to_string())?;
    let r = c.timeout(timeout + GATE_WAIT + Client::DEFAULT_TIMEOUT).call(req).map_err(|e| e.to_string())?;
    let _ = std::io::stdout().write_all(r.stdout.as_bytes());
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(r.stderr.as_bytes());
    if r.truncated {
        eprintln!("forkvm: output truncated at {} bytes", limits::MAX_AGENT_OUTPUT);
    }
    if r.timed_out {
        return Err(format!("the program ran out of time ({timeout:?}) and was killed"));
    }
    if let Some(sig) = r.signal {
        eprintln!("forkvm: the program was killed by signal {sig}");
        return Ok(128 + sig);
    }
    Ok(r.code.unwrap_or(1))
}
