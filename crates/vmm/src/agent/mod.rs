//! The host side of the guest agent: how to reach it (through the VM's vsock socket with
//! Firecracker's `CONNECT <port>` convention, or a plain Unix socket in tests) and the clone-hook
//! gate every restored, forked or woken VM carries.

mod clone_hook;
mod gate;

use std::path::PathBuf;
use std::time::Duration;

pub use agent_proto::{Client, ClientError, ExecRequest, ExitInfo, HookDone, Stream, AGENT_PORT};
pub(crate) use clone_hook::run_begun;
pub use clone_hook::{run_clone_hook, CloneHookOptions};
pub use gate::{AgentGate, HookState};

/// Where a VM's agent listens, as seen from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// The VM's vsock host socket (`<vm dir>/vsock.sock`) and the guest port.
    Vsock { uds: PathBuf, port: u32 },
    /// An agent listening on a Unix socket (host tests).
    Unix(PathBuf),
}

impl AgentAddr {
    /// The agent on its default port behind a VM's vsock socket.
    pub fn vsock(uds: impl Into<PathBuf>) -> Self {
        AgentAddr::Vsock { uds: uds.into(), port: AGENT_PORT }
    }

    /// Connects and says hello; `timeout` bounds the connect and each answer.
    pub fn connect(&self, timeout: Duration) -> Result<Client, ClientError> {
        match self {
            AgentAddr::Vsock { uds, port } => Client::connect_vsock(uds, *port, timeout),
            AgentAddr::Unix(p) => Client::connect_unix(p, timeout),
        }
    }

    /// The socket file this address goes through.
    pub fn socket(&self) -> &std::path::Path {
        match self {
            AgentAddr::Vsock { uds, .. } => uds,
            AgentAddr::Unix(p) => p,
        }
    }
}
