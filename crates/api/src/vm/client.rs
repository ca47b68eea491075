//! The client of the per-VM socket: connect (bounded), send one request, read one bounded
//! answer line within a deadline.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::limits::MAX_RESPONSE_BYTES;
use super::request::{Op, Request, Stop};
use super::response::{Reply, StopResponse};
use super::VmPaths;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    InvalidName(String),
    #[error("no running VM named {name:?} (see `forkvm ls`)")]
    NotRunning { name: String },
    #[error("cannot connect to {}: {source}", path.display())]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("VM {name:?}: cannot send the request: {source}")]
    Send { name: String, source: std::io::Error },
    #[error("VM {name:?}: no answer within {timeout:?}")]
    Timeout { name: String, timeout: Duration },
    #[error("VM {name:?}: reading the answer: {source}")]
    Read { name: String, source: std::io::Error },
    #[error("VM {name:?} closed the connection without answering (did it exit?)")]
    Closed { name: String },
    #[error("VM {name:?} sent an answer longer than {MAX_RESPONSE_BYTES} bytes")]
    TooLong { name: String },
    #[error("VM {name:?} sent a malformed answer: {detail}")]
    Malformed { name: String, detail: String },
    /// The VM answered with an error: its message, as is.
    #[error("{0}")]
    Refused(String),
    #[error("VM {name:?} answered stop but its VMM process did not exit within {timeout:?}")]
    NotGone { name: String, timeout: Duration },
}

/// A client of one VM's socket. Every call is one connection.
#[derive(Debug, Clone)]
pub struct Client {
    name: String,
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// Default deadline of a call.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// The client of VM `name` in the run directory.
    pub fn for_name(name: &str) -> Result<Self, ClientError> {
        let paths = VmPaths::for_name(name).map_err(ClientError::InvalidName)?;
        Ok(Self::at(&paths.dir, name))
    }

    /// The client of the VM whose directory is `dir`.
    pub fn at(dir: &Path, name: &str) -> Self {
        Client { name: name.to_string(), socket: VmPaths::in_dir(dir).socket(), timeout: Self::DEFAULT_TIMEOUT }
    }

    /// Sets the deadline of each call (connect, send and answer together).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `op` and returns its typed answer; the VM's error comes back as
    /// [`ClientError::Refused`].
    pub fn call<O: Op>(&self, op: O) -> Result<O::Response, ClientError> {
        let (resp, _) = self.call_raw(&op.into())?;
        Ok(resp)
    }

    /// Stops the VM and returns once its VMM process has exited (the VMM holds the connection
    /// open until it exits).
    pub fn stop(&self) -> Result<StopResponse, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let (resp, mut stream) = self.call_raw::<StopResponse>(&Stop {}.into())?;
        let mut buf = [0u8; 256];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::NotGone { name: self.name.clone(), timeout: self.timeout });
            }
            let _ = stream.set_read_timeout(Some(left));
            match stream.read(&mut buf) {
                Ok(0) => return Ok(resp),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                // A reset connection is a closed one: the process is gone.
                Err(_) => return Ok(resp),
            }
        }
    }

    fn call_raw<T: DeserializeOwned>(&self, req: &Request) -> Result<(T, UnixStream), ClientError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = connect(&self.socket, self.timeout).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning { name: self.name.clone() }
            }
            _ => ClientError::Connect { path: self.socket.clone(), source: e },
        })?;
        let mut line = serde_json::to_vec(req)
            .map_err(|e| ClientError::Send { name: self.name.clone(), source: std::io::Error::other(e) })?;
        line.push(b'\n');
        let _ = stream.set_write_timeout(Some(self.timeout));
        stream.write_all(&line).map_err(|e| ClientError::Send { name: self.name.clone(), source: e })?;
        let answer = self.read_line(&mut stream, deadline)?;
        let reply: Reply<T> = serde_json::from_slice(&answer)
            .map_err(|e| ClientError::Malformed { name: self.name.clone(), detail: e.to_string() })?;
        let data = reply.into_result().map_err(ClientError::Refused)?;
        Ok((data, stream))
    }

    /// One answer line, at most [`MAX_RESPONSE_BYTES`], by `deadline`.
    fn read_line(&self, stream: &mut UnixStream, deadline: Instant) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout { name: self.name.clone(), timeout: self.timeout });
            }
            let _ = stream.set_read_timeout(Some(left));
            let n = match stream.read(&mut buf) {
                Ok(0) if out.is_empty() => return Err(ClientError::Closed { name: self.name.clone() }),
                Ok(0) => return Ok(out),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(e) => return Err(ClientError::Read { name: self.name.clone(), source: e }),
            };
            let chunk = &buf[..n];
            if let Some(i) = chunk.iter().position(|&b| b == b'\n') {
                out.extend_from_slice(&chunk[..i]);
                return Ok(out);
            }
            out.extend_from_slice(chunk);
            if out.len() > MAX_RESPONSE_BYTES {
                return Err(ClientError::TooLong { name: self.name.clone() });
            }
        }
    }
}

/// Connects to a Unix stream socket, waiting at most `timeout` (a listener whose backlog is full
/// would otherwise block `connect` forever).
fn connect(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "socket path too long"));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket(2) just returned this fd and nobody else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let stream = UnixStream::from(owned);
    // connect(2) on a Unix socket waits for backlog room up to the send timeout.
    stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    loop {
        // SAFETY: addr is a valid sockaddr_un of `len` bytes; fd is our socket.
        let rc = unsafe { libc::connect(fd, (&raw const addr).cast(), len) };
        if rc == 0 {
            return Ok(stream);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the VM is busy")),
            _ => return Err(e),
        }
    }
}
