//! virtio-net device tests without Linux: a fake guest driver (tests/virtio_driver) drives the
//! device; its tap lives in a private network namespace (needs root), where the test plays the
//! host's side with packet and UDP sockets. Covers both directions, a guest that stops reading
//! RX (no blocking, no buffering in the VMM), malformed and oversized frames, persistence.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod virtio_driver;

use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use virtio_driver::*;
use vmm::devices::mmio::MmioDevice;
use vmm::devices::virtio::net::device::{mac_from, F_MAC, MAX_FRAME};
use vmm::devices::virtio::net::netns::{PrivateNet, GATEWAY, GATEWAY_MAC, GUEST_IP, TAP_NAME};
use vmm::devices::virtio::net::Net;
use vmm::vstate::memory::{Backing, GuestMem};
use vmm_sys_util::eventfd::EventFd;

const RXQ: usize = 0;
const TXQ: usize = 1;
const HDR: usize = 12;

struct NetDrv {
    d: Driver,
    dev: Arc<Net>,
    ns: Arc<std::fs::File>,
    mac: [u8; 6],
}

fn setup() -> NetDrv {
    let (ns, tap) = PrivateNet::create().unwrap_or_else(|e| panic!("{e} (run the tests as root)"));
    let nsfile = Arc::new(ns.ns.try_clone().unwrap());
    let mem = Arc::new(GuestMem::new(16 << 20, Backing::Anon, false).unwrap());
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mac = mac_from(b"test-vm/1");
    let dev = Arc::new(Net::new(tap, Some(ns), mac, mem.clone(), irq.try_clone().unwrap()).unwrap());
    let mut d = Driver::attach(dev.clone() as Arc<dyn MmioDevice>, mem, irq, 2, 0);
    d.init(1, F_MAC);
    let mut m = [0u8; 6];
    d.config(0, &mut m);
    assert_eq!(m, mac);
    NetDrv { d, dev, ns: nsfile, mac }
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &Arc<std::fs::File>, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.clone();
    std::thread::spawn(move || {
        // SAFETY: setns changes only this thread's network namespace.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        f()
    })
    .join()
    .unwrap()
}

/// A raw packet socket on the tap's host side (frames sent on it reach the guest).
fn packet_socket(ns: &Arc<std::fs::File>) -> OwnedFd {
    in_ns(ns, || {
        // SAFETY: plain socket call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from((libc::ETH_P_ALL as u16).to_be())) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: fd is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(TAP_NAME).unwrap();
        // SAFETY: valid C string.
        let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: all-zero sockaddr_ll is valid.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sa.sll_ifindex = idx as i32;
        // SAFETY: sa is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32)
        };
        assert_eq!(rc, 0);
        fd
    })
}

fn inject(sock: &OwnedFd, frame: &[u8]) -> bool {
    // SAFETY: frame is valid for its length.
    unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT) >= 0 }
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload_len: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend((0..payload_len).map(|i| i as u8));
    f
}

/// An IPv4/UDP frame from the guest to the gateway (UDP checksum 0 = none).
fn udp_frame(src_mac: [u8; 6], dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    let total = (20 + 8 + payload.len()) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&GUEST_IP.octets());
    ip.extend_from_slice(&GATEWAY.octets());
    let mut sum: u32 = ip.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let mut udp = Vec::new();
    udp.extend_from_slice(&4000u16.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut f = eth(GATEWAY_MAC, src_mac, 0x0800, 0);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&udp);
    f
}

impl NetDrv {
    fn send(&mut self, frame: &[u8]) {
        let mut bytes = vec![0u8; HDR];
        bytes.extend_from_slice(frame);
        let a = self.d.alloc(bytes.len() as u64);
        assert!(self.d.mem.write(a, &bytes));
        self.d.chain(TXQ, &[(a, bytes.len() as u32, false)]);
        self.d.notify(TXQ);
    }

    fn post_rx(&mut self, n: usize, len: u32) -> Vec<u64> {
        let mut addrs = Vec::new();
        for _ in 0..n {
            let a = self.d.alloc(u64::from(len));
            self.d.chain(RXQ, &[(a, len, true)]);
            addrs.push(a);
        }
        self.d.notify(RXQ);
        addrs
    }

    /// The next received frame (without the vnet header).
    fn recv(&mut self) -> Vec<u8> {
        let (id, len) = self.d.next_used(RXQ);
        let mut desc = [0u8; 16];
        assert!(self.d.mem.read(self.d.qbase(RXQ) + 16 * u64::from(id), &mut desc));
        let addr = u64::from_le_bytes(desc[0..8].try_into().unwrap());
        let mut buf = vec![0u8; len as usize];
        assert!(self.d.mem.read(addr, &mut buf));
        assert!(buf.len() >= HDR, "used length {len}");
        buf[HDR..].to_vec()
    }

    fn wait_tx(&self) {
        let want = self.d.avail_idx[TXQ];
        self.d.wait_until("TX consumed", |d| d.used_idx(TXQ) == want);
    }
}

#[test]
fn frames_flow_between_the_guest_and_its_tap_both_ways() {
    let mut n = setup();
    let ns = n.ns.clone();
    let sock = in_ns(&ns, || UdpSocket::bind((GATEWAY, 7777)).unwrap());
    sock.set_read_timeout(Some(WAIT)).unwrap();
    n.send(&udp_frame(n.mac, 7777, b"hello from the guest"));
    let mut buf = [0u8; 64];
    let (len, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..len], b"hello from the guest");
    assert_eq!(from.ip(), GUEST_IP);
    // Host -> guest: a frame injected on the tap's host side arrives in an RX buffer.
    n.post_rx(4, 2048);
    let pkt = packet_socket(&ns);
    let frame = eth(n.mac, [0x02, 0, 0, 0, 0, 1], 0x88b5, 100);
    assert!(inject(&pkt, &frame));
    let got = loop {
        let f = n.recv();
        if f[12..14] == [0x88, 0xb5] {
            break f;
        }
    };
    assert_eq!(got, frame);
    assert!(n.dev.stats().rx_frames >= 1 && n.dev.stats().tx_frames == 1);
}

#[test]
fn a_guest_that_stops_reading_rx_neither_blocks_the_device_nor_makes_it_buffer() {
    let mut n = setup();
    let ns = n.ns.clone();
    let pkt = packet_socket(&ns);
    // No RX buffers: thousands of frames stay in (and overflow) the kernel's bounded tap queue.
    let frame = eth(n.mac, [0x02, 0, 0, 0, 0, 1], 0x88b5, 200);
    for _ in 0..5000 {
        inject(&pkt, &frame);
    }
    // TX still works meanwhile.
    let sock = in_ns(&ns, || UdpSocket::bind((GATEWAY, 7778)).unwrap());
    sock.set_read_timeout(Some(WAIT)).unwrap();
    n.send(&udp_frame(n.mac, 7778, b"still alive"));
    let mut buf = [0u8; 64];
    assert_eq!(sock.recv(&mut buf).unwrap(), 11);
    assert_eq!(n.dev.stats().rx_frames, 0, "nothing is taken from the tap without a guest buffer");
    // Four buffers: exactly four frames come in; the device holds none of the rest.
    n.post_rx(4, 2048);
    for _ in 0..4 {
        n.recv();
    }
    assert_eq!(n.dev.stats().rx_frames, 4);
    assert_eq!(n.d.pending_used(RXQ), 0);
}

#[test]
fn malformed_and_oversized_frames_are_dropped_and_the_device_keeps_working() {
    let mut n = setup();
    let ns = n.ns.clone();
    // TX: write-only descriptor, outside RAM, bigger than any frame, header only.
    let a = n.d.alloc(4096);
    n.d.chain(TXQ, &[(a, 100, true)]);
    n.d.chain(TXQ, &[(1 << 40, 100, false)]);
    let big = n.d.alloc(MAX_FRAME as u64 + 4096);
    n.d.chain(TXQ, &[(big, MAX_FRAME as u32 + 1, false)]);
    n.d.chain(TXQ, &[(a, HDR as u32, false)]);
    n.d.notify(TXQ);
    n.wait_tx();
    assert_eq!(n.dev.stats().tx_dropped, 4);
    // RX: a frame larger than the guest's buffer is dropped, the buffer kept for the next one.
    let pkt = packet_socket(&ns);
    n.post_rx(1, 128);
    assert!(inject(&pkt, &eth(n.mac, [2, 0, 0, 0, 0, 1], 0x88b5, 1000)));
    loop {
        n.d.wait_until("the oversized frame dropped", |d| n.dev.stats().rx_dropped == 1 || d.pending_used(RXQ) > 0);
        if n.dev.stats().rx_dropped == 1 {
            break;
        }
        // Something else (host chatter) took the buffer first: give another one.
        n.recv();
        n.post_rx(1, 128);
    }
    let small = eth(n.mac, [2, 0, 0, 0, 0, 1], 0x88b5, 50);
    assert!(inject(&pkt, &small));
    loop {
        let f = n.recv();
        if f[12..14] == [0x88, 0xb5] {
            assert_eq!(f, small);
            break;
        }
        n.post_rx(1, 128);
    }
    // An RX chain outside guest RAM is returned empty.
    n.d.chain(RXQ, &[(1 << 40, 2048, true)]);
    n.d.notify(RXQ);
    assert_eq!(n.d.next_used(RXQ).1, 0);
    let sock = in_ns(&ns, || UdpSocket::bind((GATEWAY, 7779)).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    n.send(&udp_frame(n.mac, 7779, b"ok"));
    let mut buf = [0u8; 8];
    assert_eq!(sock.recv(&mut buf).unwrap(), 2);
}

#[test]
fn save_restore_save_round_trips_and_a_clone_gets_its_own_mac_and_namespace() {
    let n = setup();
    n.dev.pause();
    let st = n.dev.save(&n.d.mem);
    let (ns2, tap2) = PrivateNet::create().unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let same = Net::restore(&st, tap2, Some(ns2), st.mac, n.d.mem.clone(), irq).unwrap();
    same.pause();
    assert_eq!(same.save(&n.d.mem), st);
    drop(same);
    let (ns3, tap3) = PrivateNet::create().unwrap();
    let ns3file = Arc::new(ns3.ns.try_clone().unwrap());
    let other_ns = ns3.ns.metadata().unwrap();
    assert_ne!(
        std::os::unix::fs::MetadataExt::ino(&other_ns),
        std::os::unix::fs::MetadataExt::ino(&n.ns.metadata().unwrap()),
        "each clone has a namespace of its own"
    );
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let clone = Arc::new(Net::restore(&st, tap3, Some(ns3), mac_from(b"test-vm/2"), n.d.mem.clone(), irq).unwrap());
    assert_ne!(clone.mac(), n.mac);
    assert_eq!(clone.mac()[0] & 3, 2, "locally administered unicast");
    let mut m = [0u8; 6];
    clone.read(0x100, &mut m);
    assert_eq!(m, clone.mac());
    // The clone's guest still addresses the gateway by the MAC it learnt before the clone:
    // its new tap, in its own namespace, has that MAC and takes the frame.
    let sock = in_ns(&ns3file, || UdpSocket::bind((GATEWAY, 7780)).unwrap());
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut c = NetDrv { d: n.d.rebind(clone.clone(), n.d.mem.clone()), dev: clone, ns: ns3file, mac: n.mac };
    c.send(&udp_frame(n.mac, 7780, b"from the clone"));
    let mut buf = [0u8; 32];
    assert_eq!(sock.recv(&mut buf).unwrap(), 14);
}

#[test]
fn port_forward_reaches_each_clone_at_its_own_host_port_despite_equal_guest_addresses() {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use vmm::devices::virtio::net::forward;
    let mut ports = Vec::new();
    let mut keep = Vec::new();
    for id in 0..2 {
        // Two "clones": same address inside, each in its own namespace, each answering its id.
        let (ns, tap) = PrivateNet::create().unwrap();
        let nsf = Arc::new(ns.ns.try_clone().unwrap());
        let server = in_ns(&nsf, || TcpListener::bind((GATEWAY, 8080)).unwrap());
        std::thread::spawn(move || {
            for c in server.incoming() {
                let mut c = c.unwrap();
                let mut line = String::new();
                BufReader::new(c.try_clone().unwrap()).read_line(&mut line).unwrap();
                c.write_all(format!("clone {id} got {line}").as_bytes()).unwrap();
            }
        });
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        ports.push(l.local_addr().unwrap());
        let nsfile = ns.ns.try_clone().unwrap();
        std::thread::spawn(move || forward::serve(l, nsfile, (GATEWAY, 8080).into()));
        keep.push((ns, tap));
    }
    for (id, addr) in ports.iter().enumerate() {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        c.write_all(b"ping\n").unwrap();
        let mut answer = String::new();
        BufReader::new(c).read_line(&mut answer).unwrap();
        assert_eq!(answer, format!("clone {id} got ping\n"));
    }
}
