//! A small synchronous client over a Unix stream: either straight to an agent's Unix socket (host
//! tests) or through a VMM's vsock socket with Firecracker's `CONNECT <port>` handshake.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::frame::{read_frame, write_frame, Frame, FrameError, MAX_DATA};
use crate::msg::{ExecRequest, HookDone, Msg, ReadFileRequest, WriteFileRequest};
use crate::{SEED_LEN, VERSION};

/// Longest `OK <port>` line accepted from the vsock socket.
const MAX_HANDSHAKE_LINE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {err}")]
    Connect { path: String, err: std::io::Error },
    #[error("the VM's vsock socket refused port {port}: {detail}")]
    NoListener { port: u32, detail: String },
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the agent closed the connection")]
    Closed,
    #[error("agent: {0}")]
    Agent(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("i/o: {0}")]
    Io(std::io::Error),
}

impl ClientError {
    fn from_frame(e: FrameError, waited: Duration) -> Self {
        if e.is_timeout() {
            ClientError::Timeout(waited)
        } else if e.is_disconnect() {
            ClientError::Closed
        } else {
            match e {
                FrameError::Io(e) => ClientError::Io(e),
                e => ClientError::Protocol(e.to_string()),
            }
        }
    }
}

/// How an exec ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub truncated: bool,
}

/// Which stream an output chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug)]
pub struct Client {
    sock: UnixStream,
    /// What the agent called itself in its hello.
    pub agent: String,
}

/// Connects with the connect itself bounded too: on a Unix socket whose listen backlog is full,
/// connect(2) waits for as long as SO_SNDTIMEO allows (std's connect cannot set it first).
fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let failed = |err| ClientError::Connect { path: path.display().to_string(), err };
    let addr = SockAddr::unix(path).map_err(failed)?;
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(failed)?;
    sock.set_write_timeout(Some(timeout)).map_err(failed)?;
    sock.connect(&addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => failed(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("it accepted no connection within {timeout:?} (its listen backlog is full)"),
        )),
        _ => failed(e),
    })?;
    let s = UnixStream::from(std::os::fd::OwnedFd::from(sock));
    s.set_read_timeout(Some(timeout)).map_err(ClientError::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(ClientError::Io)?;
    Ok(s)
}

impl Client {
    /// Connects to an agent listening on a Unix socket.
    pub fn connect_unix(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        Self::handshake(connect(path, timeout)?, timeout)
    }

    /// Connects through a VMM's vsock socket (`CONNECT <port>\n` -> `OK <hostport>\n`).
    pub fn connect_vsock(uds: &Path, port: u32, timeout: Duration) -> Result<Self, ClientError> {
        let mut s = connect(uds, timeout)?;
        s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(ClientError::Io)?;
        // Byte by byte: what follows the line already belongs to the agent.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            match s.read(&mut b) {
                Ok(0) => return Err(ClientError::NoListener { port, detail: "connection closed (no agent?)".into() }),
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) if line.len() < MAX_HANDSHAKE_LINE => line.push(b[0]),
                Ok(_) => return Err(ClientError::Protocol("handshake line too long".into())),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(ClientError::Timeout(timeout))
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(ClientError::NoListener { port, detail: "connection reset (no agent?)".into() })
                }
                Err(e) => return Err(ClientError::Io(e)),
            }
        }
        let line = String::from_utf8_lossy(&line);
        if !line.starts_with("OK ") {
            return Err(ClientError::NoListener { port, detail: format!("answered {line:?}") });
        }
        Self::handshake(s, timeout)
    }

    fn handshake(sock: UnixStream, timeout: Duration) -> Result<Self, ClientError> {
        let mut c = Client { sock, agent: String::new() };
        c.send(&Msg::Hello { version: VERSION, agent: "forkvm".into() }, b"")?;
        match c.recv(timeout)?.msg {
            Msg::Hello { version: VERSION, agent } => c.agent = agent,
            Msg::Hello { version, .. } => return Err(ClientError::Protocol(format!("agent speaks version {version}"))),
            m => return Err(unexpected(&m)),
        }
        Ok(c)
    }

    fn send(&mut self, msg: &Msg, data: &[u8]) -> Result<(), ClientError> {
        write_frame(&mut self.sock, msg, data).map_err(|e| ClientError::from_frame(e, Duration::ZERO))
    }

    fn recv(&mut self, timeout: Duration) -> Result<Frame, ClientError> {
        let t = timeout.max(Duration::from_millis(1));
        self.sock.set_read_timeout(Some(t)).map_err(ClientError::Io)?;
        let f = read_frame(&mut self.sock).map_err(|e| ClientError::from_frame(e, timeout))?;
        match f.msg {
            Msg::Error { message } => Err(ClientError::Agent(message)),
            _ => Ok(f),
        }
    }

    /// One round trip.
    pub fn ping(&mut self, nonce: u64, timeout: Duration) -> Result<(), ClientError> {
        self.send(&Msg::Ping { nonce }, b"")?;
        match self.recv(timeout)?.msg {
            Msg::Pong { nonce: n } if n == nonce => Ok(()),
            m => Err(unexpected(&m)),
        }
    }

    /// Runs a program; output chunks go to `on_output` as they come. `timeout` bounds the whole
    /// exec on the host side (the agent also gets it, and kills the program at its own deadline).
    pub fn exec(
        &mut self,
        mut req: ExecRequest,
        stdin: Option<&[u8]>,
        timeout: Duration,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitInfo, ClientError> {
        let deadline = Instant::now() + timeout;
        req.stdin = stdin.is_some();
        if req.timeout_ms == 0 {
            req.timeout_ms = timeout.as_millis() as u64;
        }
        self.send(&Msg::Exec(req), b"")?;
        if let Some(data) = stdin {
            // Written from a thread so a program that talks before it reads cannot deadlock us.
            let mut w = self.sock.try_clone().map_err(ClientError::Io)?;
            let data = data.to_vec();
            std::thread::spawn(move || {
                let mut chunks = data.chunks(MAX_DATA).peekable();
                if chunks.peek().is_none() {
                    let _ = write_frame(&mut w, &Msg::Stdin { eof: true }, b"");
                }
                while let Some(c) = chunks.next() {
                    if write_frame(&mut w, &Msg::Stdin { eof: chunks.peek().is_none() }, c).is_err() {
                        break;
                    }
                }
            });
        }
        // The agent answers within its own deadline; allow a little more for the transport.
        let grace = Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(Instant::now()) + grace;
            let f = self.recv(left).map_err(|e| match e {
                ClientError::Timeout(_) => ClientError::Timeout(timeout + grace),
                e => e,
            })?;
            match f.msg {
                Msg::Stdout => on_output(Stream::Stdout, &f.data),
                Msg::Stderr => on_output(Stream::Stderr, &f.data),
                Msg::Exit { code, signal, timed_out, truncated } => {
                    return Ok(ExitInfo { code, signal, timed_out, truncated })
                }
                m => return Err(unexpected(&m)),
            }
        }
    }

    /// Reads up to `max_len` bytes of a guest file.
    pub fn read_file(&mut self, path: &str, max_len: u64, timeout: Duration) -> Result<Vec<u8>, ClientError> {
        self.send(&Msg::ReadFile(ReadFileRequest { path: path.into(), offset: 0, max_len }), b"")?;
        let mut out = Vec::new();
        loop {
            let f = self.recv(timeout)?;
            match f.msg {
                Msg::FileData { eof } => {
                    if out.len() as u64 + f.data.len() as u64 > max_len {
                        return Err(ClientError::Protocol(format!("agent sent more than {max_len} bytes")));
                    }
                    out.extend_from_slice(&f.data);
                    if eof {
                        return Ok(out);
                    }
                }
                m => return Err(unexpected(&m)),
            }
        }
    }

    /// Writes a guest file (created or truncated), in chunks.
    pub fn write_file(&mut self, path: &str, mode: u32, data: &[u8], timeout: Duration) -> Result<(), ClientError> {
        let mut chunks: Vec<&[u8]> = data.chunks(MAX_DATA).collect();
        if chunks.is_empty() {
            chunks.push(b"");
        }
        for (i, c) in chunks.into_iter().enumerate() {
            let req = WriteFileRequest { path: path.into(), mode, append: i > 0 };
            self.send(&Msg::WriteFile(req), c)?;
            match self.recv(timeout)?.msg {
                Msg::Written { .. } => {}
                m => return Err(unexpected(&m)),
            }
        }
        Ok(())
    }

    /// Hands the agent a clone's generation, seed and the host's wall clock.
    pub fn clone_hook(
        &mut self,
        generation: u64,
        seed: &[u8; SEED_LEN],
        host_time_ns: i64,
        timeout: Duration,
    ) -> Result<HookDone, ClientError> {
        self.send(&Msg::CloneHook { generation, host_time_ns }, seed)?;
        match self.recv(timeout)?.msg {
            Msg::CloneHookDone(d) => Ok(d),
            m => Err(unexpected(&m)),
        }
    }
}

fn unexpected(m: &Msg) -> ClientError {
    ClientError::Protocol(format!("unexpected {} message", m.name()))
}
