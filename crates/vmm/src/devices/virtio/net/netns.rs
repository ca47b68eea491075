//! One private network namespace per VM (and per clone): it holds the VM's tap, so every
//! clone keeps the guest's address (192.168.241.2 behind gateway 192.168.241.1 on the tap)
//! without two clones ever meeting on the host. The host reaches a clone through the VMM: a
//! socket created inside the namespace (see [`PrivateNet::connect`]), e.g. by
//! `forkvm port-forward`, which listens on the host and forwards each connection.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::tap::{configure, Tap};

/// The tap's name inside every private namespace.
pub const TAP_NAME: &str = "fkvm0";
/// The host side of the tap (the guest's gateway).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 241, 1);
/// The guest's address (configured in the guest; the same in every clone).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 241, 2);
pub const PREFIX: u8 = 24;
/// The tap's MAC in every namespace: a clone's guest keeps its ARP entry for the gateway, so
/// the gateway must look the same behind every clone's new tap.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0xfc, 0, 0, 0, 1];

/// A VM's private network namespace and its tap.
#[derive(Debug)]
pub struct PrivateNet {
    /// `/proc/thread-self/ns/net` of the namespace, held open (keeps it alive).
    pub ns: File,
}

fn on_thread<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(f)?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
}

impl PrivateNet {
    /// A new namespace with tap [`TAP_NAME`] at [`GATEWAY`] and loopback up (needs root).
    /// Made on a short-lived thread: the VMM's own threads stay in the host namespace.
    pub fn create() -> io::Result<(PrivateNet, Tap)> {
        on_thread(|| {
            // SAFETY: unshare only changes this (short-lived) thread's namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("cannot create a network namespace (root needed): {e}")));
            }
            let tap = Tap::open(TAP_NAME)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot open tap {TAP_NAME}: {e}")))?;
            // No IPv6 chatter (router solicitations, MLD) from the host side of the tap.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{TAP_NAME}/disable_ipv6"), "1");
            configure(TAP_NAME, GATEWAY_MAC, GATEWAY, PREFIX)?;
            let ns = File::open("/proc/thread-self/ns/net")?;
            Ok((PrivateNet { ns }, tap))
        })
    }

    /// Connects to `port` of the guest from inside the namespace.
    pub fn connect(&self, port: u16, timeout: Duration) -> io::Result<TcpStream> {
        connect_in(&self.ns, SocketAddr::from((GUEST_IP, port)), timeout)
    }
}

/// Connects to `addr` from inside the network namespace `ns` (any nsfs file: our own, or
/// `/proc/<pid>/fd/<n>` of a VMM).
pub fn connect_in(ns: &File, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let ns = ns.try_clone()?;
    on_thread(move || {
        // SAFETY: setns only changes this (short-lived) thread's network namespace.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        TcpStream::connect_timeout(&addr, timeout)
    })
}
