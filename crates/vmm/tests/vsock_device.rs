//! virtio-vsock device tests without Linux: a fake guest driver (tests/vsock_driver) writes
//! descriptors into guest memory and notifies the device; the host side uses Firecracker's
//! Unix socket convention. Covers the protocol, flow control, persistence and bad guest input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod vsock_driver;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use vmm::devices::virtio::vsock::muxer::MAX_CTRL;
use vmm::devices::virtio::vsock::packet::*;
use vmm::devices::virtio::vsock::Vsock;
use vmm_sys_util::eventfd::EventFd;
use vsock_driver::*;

/// Host connects with `CONNECT port`; the fake guest accepts. Returns the host stream and
/// the (host port, guest port) of the connection.
fn host_connect(d: &mut Driver, sock: &std::path::Path, port: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (h, _) = d.recv_skip_rst();
    assert_eq!((h.op, h.dst_port, h.dst_cid, h.src_cid), (OP_REQUEST, port, CID, HOST_CID));
    let mut resp = guest_hdr(OP_RESPONSE, port, h.src_port, 0);
    resp.src_port = port;
    d.send(&resp, &[]);
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", h.src_port));
    (s, h.src_port)
}

#[test]
fn host_initiated_connection_carries_data_both_ways() {
    let dir = tmp("host-conn");
    let sock = dir.join("vsock.sock");
    let mut d = Driver::new();
    d.dev.listen(&sock).unwrap();
    d.post_rx(8);
    let (mut s, hport) = host_connect(&mut d, &sock, 52);
    s.write_all(b"ping from host").unwrap();
    let (h, data) = d.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, hport, 52));
    assert_eq!(data, b"ping from host");
    d.send(&guest_hdr(OP_RW, 52, hport, 5), b"pong!");
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong!");
    // Host closes: the guest hears SHUTDOWN.
    drop(s);
    let (h, _) = d.recv();
    assert_eq!(h.op, OP_SHUTDOWN);
}

/// Regression: the `OK <port>` line the device writes to the host socket is not guest data, so
/// it must not count in the fwd_cnt the guest sees (Linux then computed negative credit and its
/// writers blocked forever: the guest agent never answered).
#[test]
fn the_ok_line_does_not_count_as_forwarded_guest_data() {
    let dir = tmp("fwd-cnt");
    let sock = dir.join("vsock.sock");
    let mut d = Driver::new();
    d.dev.listen(&sock).unwrap();
    d.post_rx(8);
    let (mut s, hport) = host_connect(&mut d, &sock, 52);
    s.write_all(b"hello").unwrap();
    let (h, _) = d.recv();
    assert_eq!(h.op, OP_RW);
    assert_eq!(h.fwd_cnt, 0, "the guest sent nothing yet");
    d.send(&guest_hdr(OP_RW, 52, hport, 3), b"abc");
    let mut b = [0u8; 3];
    s.read_exact(&mut b).unwrap();
    d.send(&guest_hdr(OP_CREDIT_REQUEST, 52, hport, 0), &[]);
    let (h, _) = d.recv_raw_op(OP_CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt, 3);
}

#[test]
fn guest_initiated_connection_reaches_uds_port_socket() {
    let dir = tmp("guest-conn");
    let sock = dir.join("vsock.sock");
    let listener = UnixListener::bind(dir.join("vsock.sock_1234")).unwrap();
    let mut d = Driver::new();
    d.dev.listen(&sock).unwrap();
    d.post_rx(8);
    d.send(&guest_hdr(OP_REQUEST, 5000, 1234, 0), &[]);
    let (h, _) = d.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 1234, 5000));
    let (mut host, _) = listener.accept().unwrap();
    d.send(&guest_hdr(OP_RW, 5000, 1234, 3), b"abc");
    let mut b = [0u8; 3];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"abc");
    host.write_all(b"xyz").unwrap();
    let (h, data) = d.recv();
    assert_eq!((h.op, data.as_slice()), (OP_RW, &b"xyz"[..]));
    // A port nobody listens on is refused with RST.
    d.send(&guest_hdr(OP_REQUEST, 5001, 999, 0), &[]);
    let (h, _) = d.recv();
    assert_eq!((h.op, h.dst_port), (OP_RST, 5001));
}

#[test]
fn bad_connect_lines_are_closed_and_the_device_keeps_working() {
    let dir = tmp("bad-line");
    let sock = dir.join("vsock.sock");
    let mut d = Driver::new();
    d.dev.listen(&sock).unwrap();
    d.post_rx(4);
    for bad in [&b"HELLO 52\n"[..], b"CONNECT notaport\n", &[b'x'; 100]] {
        let mut s = UnixStream::connect(&sock).unwrap();
        let _ = s.write_all(bad);
        let mut buf = [0u8; 8];
        // The device closes it: read gives EOF (or a reset).
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    }
    let (_s, _) = host_connect(&mut d, &sock, 7);
}

#[test]
fn malformed_guest_packets_are_dropped_without_harm() {
    let dir = tmp("malformed");
    let sock = dir.join("vsock.sock");
    let mut d = Driver::new();
    d.dev.listen(&sock).unwrap();
    d.post_rx(16);
    // Header claims more payload than MAX_PAYLOAD.
    d.send(&guest_hdr(OP_RW, 1, 2, MAX_PAYLOAD + 1), &[0u8; 16]);
    // Header claims 100 bytes, chain carries 10.
    d.send(&guest_hdr(OP_RW, 1, 2, 100), &[0u8; 10]);
    // A chain shorter than the header.
    let a = d.alloc(16);
    d.desc(TXQ, 40, a, 10, 0, 0);
    d.publish(TXQ, 40);
    // A write-only TX descriptor.
    d.desc(TXQ, 41, a, 44, 2, 0);
    d.publish(TXQ, 41);
    // Wrong source CID, unknown type, unknown op.
    let mut h = guest_hdr(OP_REQUEST, 1, 2, 0);
    h.src_cid = 99;
    d.send(&h, &[]);
    let mut h = guest_hdr(OP_REQUEST, 1, 2, 0);
    h.type_ = 2;
    d.send(&h, &[]);
    d.send(&guest_hdr(77, 1, 2, 0), &[]);
    d.notify(TXQ);
    d.wait_tx_done();
    assert!(d.dev.state().muxer.dropped >= 6, "dropped {}", d.dev.state().muxer.dropped);
    // Still serves a good connection.
    let (_s, _) = host_connect(&mut d, &sock, 9);
}

#[test]
fn descriptors_outside_memory_and_loops_do_not_hang_the_device() {
    let dir = tmp("bad-desc");
    let sock = dir.join("vsock.sock");
    let mut d = Driver::new();
    d.dev.listen(&sock).unwrap();
    // TX descriptor pointing past the end of guest memory, and one that wraps the address space.
    d.desc(TXQ, 50, 1 << 40, 64, 0, 0);
    d.publish(TXQ, 50);
    d.desc(TXQ, 51, u64::MAX - 8, 64, 0, 0);
    d.publish(TXQ, 51);
    // A descriptor chaining to itself (a loop), and a ring of two.
    let a = d.alloc(64);
    d.desc(TXQ, 52, a, 8, 1, 52);
    d.publish(TXQ, 52);
    d.desc(TXQ, 53, a, 8, 1, 54);
    d.desc(TXQ, 54, a, 8, 1, 53);
    d.publish(TXQ, 53);
    // A next index beyond the queue.
    d.desc(TXQ, 55, a, 8, 1, 5000);
    d.publish(TXQ, 55);
    d.notify(TXQ);
    d.wait_tx_done();
    // RX buffers outside memory are returned unused, then good ones are used.
    d.desc(RXQ, 60, 1 << 40, RX_BUF, 2, 0);
    d.publish(RXQ, 60);
    d.post_rx(4);
    let (_s, _) = host_connect(&mut d, &sock, 11);
}

#[test]
fn a_guest_flooding_tx_without_reading_rx_stays_bounded() {
    let dir = tmp("flood");
    let sock = dir.join("vsock.sock");
    let mut d = Driver::new();
    d.dev.listen(&sock).unwrap();
    // Each packet is for an unknown connection, so each wants an RST back; no RX buffers exist.
    for round in 0..(MAX_CTRL as u32 / 60 + 4) {
        for i in 0..60 {
            d.send(&guest_hdr(OP_RW, 10_000 + round * 100 + i, 7, 1), b"x");
        }
        d.wait_tx_done();
    }
    let st = d.dev.state();
    assert!(st.muxer.ctrl_len() <= MAX_CTRL, "control queue {} > {MAX_CTRL}", st.muxer.ctrl_len());
    assert_eq!(st.muxer.connection_count(), 0);
}

#[test]
fn a_guest_that_never_reads_rx_gives_host_writers_backpressure() {
    let dir = tmp("backpressure");
    let sock = dir.join("vsock.sock");
    let mut d = Driver::new();
    d.dev.listen(&sock).unwrap();
    d.post_rx(1);
    let (s, _) = host_connect(&mut d, &sock, 52);
    // The guest stops reading (no more RX buffers). The host writes until its socket is full.
    s.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    let mut s = s;
    loop {
        match s.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(written < 64 << 20, "the host wrote {written} bytes without backpressure");
    }
    let st = d.dev.state();
    assert!(st.muxer.buffered_bytes() <= 512 * 1024, "device buffers {} bytes", st.muxer.buffered_bytes());
}

#[test]
fn a_guest_that_overruns_its_credit_is_reset() {
    let dir = tmp("credit");
    let sock = dir.join("vsock.sock");
    let listener = UnixListener::bind(dir.join("vsock.sock_80")).unwrap();
    let mut d = Driver::new();
    d.dev.listen(&sock).unwrap();
    d.post_rx(8);
    d.send(&guest_hdr(OP_REQUEST, 6000, 80, 0), &[]);
    let (h, _) = d.recv();
    assert_eq!(h.op, OP_RESPONSE);
    assert!(h.buf_alloc > 0);
    let (_host, _) = listener.accept().unwrap(); // accepted but never read
    let payload = vec![1u8; MAX_PAYLOAD as usize];
    let mut sent = 0u64;
    let mut reset = false;
    while sent < 8 * u64::from(h.buf_alloc) {
        d.send(&guest_hdr(OP_RW, 6000, 80, MAX_PAYLOAD), &payload);
        d.wait_tx_done();
        sent += u64::from(MAX_PAYLOAD);
        if d.dev.state().muxer.connection_count() == 0 {
            reset = true;
            break;
        }
    }
    assert!(reset, "the device kept a connection whose guest ignored its credit");
    loop {
        let (h, _) = d.recv();
        if h.op == OP_RST {
            break;
        }
    }
}

#[test]
fn state_round_trips_and_a_restore_sends_transport_reset() {
    let dir = tmp("persist");
    let sock = dir.join("vsock.sock");
    let mut d = Driver::new();
    d.dev.listen(&sock).unwrap();
    d.post_rx(4);
    let (_s, _) = host_connect(&mut d, &sock, 52);
    d.dev.pause();
    let saved = d.dev.save(&d.mem);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let restored = Arc::new(Vsock::restore(&saved, d.mem.clone(), irq.try_clone().unwrap()).unwrap());
    restored.pause();
    assert_eq!(restored.save(&d.mem), saved, "save -> restore -> save");
    assert_eq!(restored.state().muxer.connection_count(), 0, "connections do not survive a restore");
    restored.resume();
    // The restored device tells the guest its connections are gone.
    let used_seen = d.used_seen;
    drop(d.dev);
    let mut d2 = Driver::attach(restored, d.mem.clone(), irq);
    d2.used_seen = used_seen;
    let before = d2.used_idx(EVQ);
    d2.post_event();
    d2.wait_until("transport reset event", |d| d.used_idx(EVQ) != before);
    // A corrupt state is refused, not trusted.
    let mut bad = saved.clone();
    bad.cid = 1;
    assert!(Vsock::restore(&bad, d.mem.clone(), EventFd::new(0).unwrap()).is_err());
    let mut bad = saved.clone();
    bad.transport.queues.pop();
    assert!(Vsock::restore(&bad, d.mem.clone(), EventFd::new(0).unwrap()).is_err());
}
