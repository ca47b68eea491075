//! The daemon's side of the per-VM sockets: start VMM processes (this forkvm binary with
//! `--background`, in their own process group so they outlive the daemon) and send them
//! requests (one JSON line per connection, see docs/api.md).

use std::ffi::OsString;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use forkvm_api::vm::{Op, Request, RunState, Status};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest answer line taken from a VMM.
const MAX_LINE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmError {
    /// Nobody answers on the socket (the VMM is gone).
    #[error("its VMM is not reachable: {0}")]
    Gone(String),
    /// The VMM answered with an error.
    #[error("{0}")]
    Refused(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug, Clone)]
pub struct Vmms {
    pub exe: PathBuf,
    pub run_dir: PathBuf,
    pub store: PathBuf,
    /// The VMM processes started here, until they are reaped (see [`crate::reap`]).
    pub children: crate::reap::Children,
}

impl Vmms {
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.run_dir.join(id)
    }

    /// A hibernated VM keeps `<vm dir>/hibernated` after its VMM exits.
    pub fn is_hibernated(&self, id: &str) -> bool {
        self.vm_dir(id).join("hibernated").exists()
    }

    pub fn remove_dir(&self, id: &str) {
        let _ = std::fs::remove_dir_all(self.vm_dir(id));
    }

    /// Sends a typed request (crates/api `vm`) to VM `id` and returns its typed answer.
    pub async fn call<O: Op>(&self, id: &str, op: O, timeout: Duration) -> Result<O::Response, VmError> {
        let req: Request = op.into();
        let req = serde_json::to_value(req).map_err(|e| VmError::Refused(e.to_string()))?;
        let data = self.call_value(id, &req, timeout).await?;
        serde_json::from_value(data).map_err(|e| VmError::Refused(format!("VM {id} sent a malformed answer: {e}")))
    }

    /// Sends `req` to VM `id` and returns its `data`.
    async fn call_value(&self, id: &str, req: &Value, timeout: Duration) -> Result<Value, VmError> {
        match tokio::time::timeout(timeout, self.call_inner(id, req)).await {
            Ok(r) => r,
            Err(_) => Err(VmError::Timeout(timeout)),
        }
    }

    async fn call_inner(&self, id: &str, req: &Value) -> Result<Value, VmError> {
        let sock = self.vm_dir(id).join("api.sock");
        let mut s = UnixStream::connect(&sock).await.map_err(|e| VmError::Gone(e.to_string()))?;
        let mut line = req.to_string();
        line.push('\n');
        s.write_all(line.as_bytes()).await.map_err(|e| VmError::Gone(e.to_string()))?;
        let mut answer = String::new();
        BufReader::new(s).take(MAX_LINE).read_line(&mut answer).await.map_err(|e| VmError::Gone(e.to_string()))?;
        if answer.is_empty() {
            return Err(VmError::Gone("closed the connection without answering".into()));
        }
        let v: Value = serde_json::from_str(&answer).map_err(|e| VmError::Refused(format!("malformed answer: {e}")))?;
        if v["ok"].as_bool() == Some(true) {
            Ok(v["data"].clone())
        } else {
            Err(VmError::Refused(v["error"].as_str().unwrap_or("the VMM refused the request").to_string()))
        }
    }

    /// The pid and state (`running`, `paused`) of VM `id`, if it answers.
    pub async fn status(&self, id: &str) -> Option<(u32, RunState)> {
        let v = self.call(id, Status {}, Duration::from_secs(2)).await.ok()?;
        Some((v.pid, v.state))
    }

    /// Tops the warm pool up to `size` members of `mem_mib` MiB and `vcpus` vCPUs (`forkvm
    /// pool start`; members replace themselves once used).
    pub async fn fill_pool(&self, size: usize, mem_mib: u64, vcpus: u8) -> Result<(), String> {
        // Only live members count: a crashed member leaves its socket behind.
        let have = std::fs::read_dir(self.run_dir.join(".pool"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| vmm::pool::parse_member_socket(&e.file_name().to_string_lossy()))
                    .filter(|&(m, v, pid)| m == mem_mib && v == vcpus && vmm::pool::member_alive(pid))
                    .count()
            })
            .unwrap_or(0);
        if have >= size {
            return Ok(());
        }
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(["pool", "start", "--size", &(size - have).to_string(), "--mem", &format!("{mem_mib}M")])
            .args(["--vcpus", &vcpus.to_string()])
            .env("FORKVM_RUN_DIR", &self.run_dir)
            .env("FORKVM_STORE", &self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let st = tokio::time::timeout(Duration::from_secs(60), cmd.status())
            .await
            .map_err(|_| "forkvm pool start did not finish in 60 s".to_string())?
            .map_err(|e| format!("cannot run forkvm pool start: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("forkvm pool start failed ({st})"))
        }
    }

    /// Stops the warm pool's members (no sandbox runs in them) and waits, at most 10 s, until
    /// they are gone: the daemon's exit. Only processes that are pool members are signalled (a
    /// stale socket's pid may belong to another process by now). Returns how many it stopped.
    /// The logs of members it stopped go; those of members that had crashed stay.
    pub async fn stop_pool(&self) -> usize {
        let Ok(rd) = std::fs::read_dir(self.run_dir.join(".pool")) else { return 0 };
        let mut pids = Vec::new();
        for e in rd.flatten() {
            let member = vmm::pool::parse_member_socket(&e.file_name().to_string_lossy());
            let Some((_, _, pid)) = member.filter(|&(_, _, p)| p > 0) else { continue };
            if vmm::pool::member_alive(pid) {
                // SAFETY: kill with a plain pid and signal number.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                pids.push(pid as u32);
            }
            let _ = std::fs::remove_file(e.path());
        }
        for &pid in &pids {
            self.children.wait_gone(pid, Duration::from_secs(10)).await;
            if !crate::reap::running(pid) {
                // Stopped cleanly: its log says nothing anyone needs (a crashed member's stays).
                let _ = std::fs::remove_file(self.run_dir.join(".pool").join(format!("member-{pid}.log")));
            }
        }
        pids.len()
    }

    /// Restores the snapshot in `dir` as VM `id` in a warm pool member of its size (topping the
    /// pool up first); returns the VMM's pid once it answers, or None when the pool cannot (the
    /// caller then starts a VMM of its own).
    pub async fn restore_from_pool(&self, id: &str, dir: &Path, size: usize, mem_mib: u64, vcpus: u8) -> Option<u32> {
        if let Err(e) = self.fill_pool(size, mem_mib, vcpus).await {
            tracing::warn!("warm pool of {mem_mib} MiB: {e}");
        }
        let socks: Vec<PathBuf> = std::fs::read_dir(self.run_dir.join(".pool"))
            .ok()?
            .flatten()
            .filter(|e| {
                vmm::pool::parse_member_socket(&e.file_name().to_string_lossy())
                    .is_some_and(|(m, v, _)| m == mem_mib && v == vcpus)
            })
            .map(|e| e.path())
            .collect();
        let conn = socks.iter().find_map(|p| std::os::unix::net::UnixStream::connect(p).ok())?;
        let (dir, name) = (dir.to_path_buf(), id.to_string());
        let r = tokio::task::spawn_blocking(move || {
            vmm::pool::restore_into(conn, &dir, &name, Duration::from_secs(30)).map_err(|e| e.to_string())
        })
        .await;
        let pid = match r {
            Ok(Ok(Some(pid))) => u32::try_from(pid).ok()?,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                tracing::warn!("pool restore of {id}: {e}; starting a VMM instead");
                self.remove_dir(id);
                return None;
            }
            Err(e) => {
                tracing::warn!("pool restore of {id}: {e}");
                return None;
            }
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            if let Some((p, _)) = self.status(id).await {
                if p == pid {
                    return Some(pid);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tracing::warn!("the pool VMM restoring {id} (pid {pid}) never answered");
        None
    }

    /// Starts `forkvm <args> --background` serving VM `id`; returns its pid once it answers.
    pub async fn spawn(&self, id: &str, mut args: Vec<OsString>) -> Result<u32, String> {
        args.push("--background".into());
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.args(&args)
            .env("FORKVM_RUN_DIR", &self.run_dir)
            .env("FORKVM_STORE", &self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start the VMM process {}: {e}", self.exe.display()))?;
        let pid = child.id().unwrap_or(0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            tokio::select! {
                status = child.wait() => {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = (&mut e).take(64 << 10).read_to_string(&mut err).await;
                    }
                    let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
                    let last = last.strip_prefix("forkvm: error: ").unwrap_or(last);
                    return Err(format!("the VMM exited ({}) before serving: {last}",
                        status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())));
                }
                _ = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
            if let Some((p, _)) = self.status(id).await {
                if p == pid {
                    // Nobody reads its stderr from now on: close our end (as dropping the child
                    // did), so a VMM that writes there gets EPIPE instead of blocking on a full pipe.
                    drop(child.stderr.take());
                    self.children.keep(child);
                    return Ok(pid);
                }
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(format!("VM {id} did not start serving its API within 60 s"));
            }
        }
    }

    /// Whether process `pid` exists and has not exited (a zombie has).
    pub fn alive(pid: u32) -> bool {
        crate::reap::running(pid)
    }
}

/// Arguments that boot the test guest, or `image`, as VM `id` (with `net`: a virtio-net device in
/// a private network namespace).
pub fn boot_args(
    id: &str,
    memory_mib: u64,
    vcpus: u8,
    net: bool,
    image: Option<&crate::app::KernelImage>,
) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["run".into()];
    match image {
        None => v.extend(["--guest".into(), "test".into()]),
        Some(i) => {
            v.extend(["--kernel".into(), i.kernel.clone().into()]);
            if let Some(initrd) = &i.initrd {
                v.extend(["--initrd".into(), initrd.clone().into()]);
            }
            if let Some(c) = &i.cmdline {
                v.extend(["--cmdline".into(), c.into()]);
            }
            if let Some(l) = &i.ready_line {
                v.extend(["--ready-line".into(), l.into()]);
            }
            if let Some(d) = &i.disk {
                let mut spec = OsString::from(&d.path);
                spec.push(if d.read_only { ",ro" } else { ",rw" });
                v.extend(["--disk".into(), spec]);
            }
        }
    }
    v.extend(
        ["--mem", &format!("{memory_mib}M"), "--vcpus", &vcpus.to_string(), "--name", id]
            .into_iter()
            .map(OsString::from),
    );
    if net {
        v.push("--net".into());
    }
    v
}

/// Arguments that restore the snapshot in `dir` copy-on-write as VM `id`.
///
/// Templates are written by this daemon's VMMs into its private state dir (0700) and never
/// change, so their restores take the explicit `--no-verify` fast path: the memory image stays a
/// shared copy-on-write mapping of one page cache for every sandbox made from the template (a
/// checked restore would fill each sandbox's private memory with the whole image).
pub fn restore_args(id: &str, dir: &Path) -> Vec<OsString> {
    vec!["restore".into(), dir.into(), "--cow".into(), "--no-verify".into(), "--name".into(), id.into()]
}

/// Arguments that wake hibernated VM `id` from `store`.
pub fn wake_args(id: &str, store: &Path) -> Vec<OsString> {
    vec!["wake".into(), id.into(), "--store".into(), store.into()]
}
