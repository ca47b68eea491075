//! A tap device (userspace, no vhost) with the virtio-net header passed through
//! (IFF_VNET_HDR, 12-byte header): guest frames go to the tap as they are, and back.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// virtio_net_hdr_v1 (VERSION_1 drivers always use it).
pub const VNET_HDR_LEN: usize = 12;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

fn ifreq(name: &str) -> io::Result<IfReq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    let mut r = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(r)
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    pub name: String,
}

fn check(rc: i32) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Opens (creating if needed) tap `name` in the calling thread's network namespace.
    pub fn open(name: &str) -> io::Result<Tap> {
        let mut req = ifreq(name)?;
        req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: a plain open of a NUL-terminated path.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        check(fd)?;
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: TUNSETIFF reads and writes one ifreq we own.
        check(unsafe { libc::ioctl(fd, TUNSETIFF as _, &mut req) })?;
        let hdr: i32 = VNET_HDR_LEN as i32;
        // SAFETY: TUNSETVNETHDRSZ reads one int we own.
        check(unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ as _, &hdr) })?;
        // SAFETY: TUNSETOFFLOAD takes an integer argument: no offloads.
        check(unsafe { libc::ioctl(fd, TUNSETOFFLOAD as _, 0 as libc::c_ulong) })?;
        Ok(Tap { file, name: name.to_string() })
    }

    /// In a fork child: closes our copy of the parent's tap (the parent keeps its own).
    pub fn close_in_child(&mut self) {
        if let Ok(null) = File::open("/dev/null") {
            self.file = null;
        }
    }

    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Reads one frame (with its vnet header); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (with its vnet header).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: frame is valid for frame.len() bytes.
        let n = unsafe { libc::write(self.fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Gives interface `name` (in the calling thread's namespace) MAC `mac`, address
/// `addr`/`prefix` and brings it up (and `lo`), with ioctls on an AF_INET socket.
pub fn configure(name: &str, mac: [u8; 6], addr: std::net::Ipv4Addr, prefix: u8) -> io::Result<()> {
    // SAFETY: a plain socket call.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(s)?;
    // SAFETY: s is ours; closed when the File drops.
    let sock = unsafe { File::from_raw_fd(s) };
    let set_addr = |req: libc::c_ulong, a: std::net::Ipv4Addr| -> io::Result<()> {
        // SAFETY: an all-zero ifreq is valid.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, b) in r.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *b as libc::c_char;
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: sockaddr_in fits in the ifreq's sockaddr union member.
        unsafe { std::ptr::write((&raw mut r.ifr_ifru).cast::<libc::sockaddr_in>(), sin) };
        // SAFETY: the request reads one ifreq we own.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), req as _, &r) })
    };
    let up = |ifname: &str| -> io::Result<()> {
        // SAFETY: an all-zero ifreq is valid.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, b) in r.ifr_name.iter_mut().zip(ifname.as_bytes()) {
            *d = *b as libc::c_char;
        }
        r.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        // SAFETY: SIOCSIFFLAGS reads one ifreq we own.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &r) })
    };
    {
        // SAFETY: an all-zero ifreq is valid.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, b) in r.ifr_name.iter_mut().zip(name.as_bytes()) {
            *d = *b as libc::c_char;
        }
        // SAFETY: an all-zero sockaddr is valid.
        let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
        sa.sa_family = libc::ARPHRD_ETHER;
        for (d, b) in sa.sa_data.iter_mut().zip(mac) {
            *d = b as libc::c_char;
        }
        r.ifr_ifru.ifru_hwaddr = sa;
        // SAFETY: SIOCSIFHWADDR reads one ifreq we own.
        check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFHWADDR as _, &r) })?;
    }
    set_addr(libc::SIOCSIFADDR, addr)?;
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
    set_addr(libc::SIOCSIFNETMASK, std::net::Ipv4Addr::from(mask))?;
    up(name)?;
    up("lo")
}
