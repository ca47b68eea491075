//! A TCP connection to a sandbox's guest, made inside the sandbox's network namespace: the VMM
//! names it in `<vm dir>/netns` (a `/proc/<vmm pid>/fd/<n>` path), and
//! `vmm::devices::virtio::net::netns::connect_in` joins it on a short-lived thread, exactly as
//! `forkvm port-forward` does.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use vmm::devices::virtio::net::netns::connect_in;

fn open_ns(vm_dir: &Path) -> io::Result<std::fs::File> {
    let file = forkvm_api::vm::VmPaths::in_dir(vm_dir).netns();
    let path = std::fs::read_to_string(&file).map_err(|e| {
        io::Error::new(e.kind(), format!("the sandbox has no network (create it with \"net\": true): {e}"))
    })?;
    std::fs::File::open(path.trim())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open its network namespace {}: {e}", path.trim())))
}

/// Connects to `target` in the namespace of the VM in `vm_dir`. A refused connection is retried
/// until `timeout` (a server that is coming back up after a wake, or restarting).
pub async fn connect(vm_dir: &Path, target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let vm_dir = vm_dir.to_path_buf();
    let std_sock = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + timeout;
        loop {
            let ns = open_ns(&vm_dir)?;
            let left = deadline.saturating_duration_since(Instant::now());
            match connect_in(&ns, target, left.max(Duration::from_millis(1))) {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))
                }
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .map_err(|e| io::Error::other(format!("connect task: {e}")))??;
    std_sock.set_nonblocking(true)?;
    TcpStream::from_std(std_sock)
}
