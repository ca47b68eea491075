//! A TCP listener inside a VM's private network namespace (the one its VMM names in
//! `<vm dir>/netns`), on the tap's address 192.168.241.1: the test guest has no TCP stack, so
//! tests stand a server there in place of a guest's.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Binds 192.168.241.1:`port` inside the namespace named in `<vm_dir>/netns`.
pub fn listen_in_vm_ns(vm_dir: &Path, port: u16) -> TcpListener {
    let ns_path = std::fs::read_to_string(vm_dir.join("netns")).unwrap();
    let ns = std::fs::File::open(ns_path.trim()).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns changes only this (short-lived) thread's network namespace.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        TcpListener::bind(("192.168.241.1", port)).unwrap()
    })
    .join()
    .unwrap()
}
