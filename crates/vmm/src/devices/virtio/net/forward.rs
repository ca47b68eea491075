//! Port forwarding into a VM's private network namespace: a host TCP listener whose every
//! connection is joined to a connection made from inside the namespace (to the guest's port).
//! Used by `forkvm port-forward` (and previews).

use std::fs::File;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use super::netns::connect_in;

/// How long a connection into the guest may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Copies bytes both ways until either side closes; each direction on its own thread.
pub fn splice(a: TcpStream, b: TcpStream) -> io::Result<()> {
    let (mut a2, mut b2) = (a.try_clone()?, b.try_clone()?);
    let t = std::thread::Builder::new().name("fwd".into()).spawn(move || {
        let _ = io::copy(&mut a2, &mut b2);
        let _ = b2.shutdown(Shutdown::Write);
    })?;
    let (mut a, mut b) = (a, b);
    let _ = io::copy(&mut b, &mut a);
    let _ = a.shutdown(Shutdown::Write);
    let _ = t.join();
    Ok(())
}

/// Serves `listener` until it fails: each accepted connection is forwarded to `target` as
/// seen from inside namespace `ns` (on a thread of its own). Connections that cannot reach
/// the guest are closed at once.
pub fn serve(listener: TcpListener, ns: File, target: SocketAddr) -> io::Result<()> {
    let ns = Arc::new(ns);
    loop {
        let (client, _) = listener.accept()?;
        let ns = ns.clone();
        std::thread::Builder::new().name("fwd-conn".into()).spawn(move || {
            match connect_in(&ns, target, CONNECT_TIMEOUT) {
                Ok(guest) => {
                    let _ = splice(client, guest);
                }
                // Said where the user looks (the default log level is warn): the guest's port
                // is closed, or its network is not up.
                Err(e) => tracing::warn!("port-forward: cannot reach {target} in the VM's namespace: {e}"),
            }
        })?;
    }
}
