//! `forkvm port-forward VM GUESTPORT [HOST:PORT]`: a host TCP listener forwarding into the VM's
//! private network namespace (see vmm::devices::virtio::net::netns). The VMM names its
//! namespace in `<vm dir>/netns`; this process joins it (per connection, on a thread) to reach
//! the guest, so clones with equal guest addresses are each reachable at their own host port.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use forkvm_api::vm::VmPaths;
use vmm::devices::virtio::net::{forward, netns};

use crate::cli::PortForwardArgs;

/// The file in a VM's directory naming its network namespace.
pub const NETNS_FILE: &str = "netns";

pub fn port_forward(a: &PortForwardArgs) -> Result<i32, String> {
    let paths = VmPaths::for_name(&a.name)?;
    if !paths.dir.is_dir() {
        return Err(format!("no VM named {:?} (see `forkvm ls`)", a.name));
    }
    let ns_file = paths.dir.join(NETNS_FILE);
    let ns_path = std::fs::read_to_string(&ns_file).map_err(|e| {
        format!("VM {} has no network namespace ({}: {e}); was it started with --net?", a.name, ns_file.display())
    })?;
    let ns_path = ns_path.trim();
    let ns = std::fs::File::open(ns_path)
        .map_err(|e| format!("cannot open the network namespace of VM {} ({ns_path}: {e}); is it running?", a.name))?;
    let guest_ip: Ipv4Addr = a.guest_ip.unwrap_or(netns::GUEST_IP);
    let listener = TcpListener::bind(&a.host).map_err(|e| format!("cannot listen on {}: {e}", a.host))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let target = SocketAddr::from((guest_ip, a.guest_port));
    println!("forwarding {local} -> VM {} {target}", a.name);
    let _ = std::io::stdout().flush();
    forward::serve(listener, ns, target).map_err(|e| format!("port-forward: {e}"))?;
    Ok(0)
}
