//! The TCP page protocol end to end on loopback: a [`NetServer`] serving a source, a
//! [`NetSource`] feeding a local [`PageServer`] (real userfaultfd), and fake peers that lie,
//! stall, truncate or corrupt. No KVM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::anon::AnonMap;
use crate::net_auth::{Secret, SessionKey};
use crate::net_client::spawn_push_placer;
use crate::net_wire::{self as wire, Msg, KIND_DATA, PAGE};
use crate::tests::pattern;
use crate::*;

fn secret() -> Secret {
    Secret::from_bytes(b"0123456789abcdef-test-secret").unwrap()
}

fn mem_source(img: &Arc<Vec<u8>>) -> Arc<dyn PageSource> {
    // SAFETY: the test keeps `img` alive and unchanged while the server runs (it holds a clone).
    let s = unsafe { MemSource::new(img.as_ptr(), img.len() as u64) };
    Arc::new(Held(s, img.clone()))
}

/// A MemSource that keeps its buffer alive.
#[derive(Debug)]
struct Held(MemSource, #[allow(dead_code)] Arc<Vec<u8>>);
impl PageSource for Held {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.fill(offset, buf)
    }
}

fn serve(img: &Arc<Vec<u8>>, cfg: NetServerConfig) -> (NetServer, Receiver<NetEvent>) {
    NetServer::bind("127.0.0.1:0", mem_source(img), cfg).unwrap()
}

fn client_cfg() -> NetClientConfig {
    NetClientConfig { request_timeout: Duration::from_secs(5), ..Default::default() }
}

/// A page server for a fresh mapping fed by `src`; the failure hook's messages are collected.
fn local(src: Arc<NetSource>, len: usize, batch: usize) -> (Arc<AnonMap>, PageServer, Arc<Mutex<Vec<String>>>) {
    let map = Arc::new(AnonMap::new(len).unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let cfg = ServerConfig {
        batch,
        on_failure: Some(FailureHook(Arc::new(move |w: &str| s2.lock().unwrap().push(w.to_string())))),
        ..Default::default()
    };
    let srv = PageServer::register(vec![map.region(0)], src, cfg).unwrap();
    (map, srv, seen)
}

/// Reads 16 bytes at `offset` through the kernel (write(2) to a pipe), on a thread, bounded:
/// returns the bytes, or the errno (EFAULT for a poisoned page).
fn kernel_read(map: &Arc<AnonMap>, offset: usize) -> std::result::Result<Vec<u8>, i32> {
    let (tx, rx) = channel();
    let mm = map.clone();
    std::thread::spawn(move || {
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let at = mm.ptr.wrapping_add(offset);
        // SAFETY: `at` is inside our mapping; write(2) reads 16 bytes of it.
        let n = unsafe { libc::write(fds[1], at.cast(), 16) };
        let err = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut b = [0u8; 16];
        if n == 16 {
            // SAFETY: reads 16 bytes into a local array from our pipe.
            unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 16) };
        }
        for fd in fds {
            // SAFETY: closing an fd we just made.
            unsafe { libc::close(fd) };
        }
        let _ = tx.send(if n == 16 { Ok(b.to_vec()) } else { Err(err) });
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("a read of guest memory hangs")
}

fn all_bytes_match(map: &Arc<AnonMap>, img: &[u8]) {
    let (m, e) = (map.clone(), img.to_vec());
    std::thread::spawn(move || {
        for (i, page) in e.chunks(PAGE).enumerate() {
            assert!(&m.slice()[i * PAGE..][..PAGE] == page, "page {i} differs");
        }
    })
    .join()
    .unwrap();
}

#[test]
fn remote_pages_serve_every_byte() {
    let img = Arc::new(pattern(512));
    let (srv, ev) = serve(&img, NetServerConfig::new(secret()));
    let addr = srv.local_addr().to_string();
    let src = Arc::new(NetSource::connect(&addr, &secret(), &client_cfg()).unwrap());
    assert_eq!((src.len(), src.version(), src.push_bytes()), (img.len() as u64, 1, 0));
    let (map, ps, seen) = local(src.clone(), img.len(), 64 << 10);
    all_bytes_match(&map, &img);
    let st = ps.stop();
    assert_eq!(st.pages_copied + st.pages_zeroed, 512, "{st:?}");
    assert_eq!(src.pages_received().0, 512);
    assert!(seen.lock().unwrap().is_empty() && src.broken().is_none());
    assert!(matches!(ev.recv().unwrap(), NetEvent::Served { version: 1, push: false, .. }));
    drop(src);
    let NetEvent::Ended { pages, why, .. } = ev.recv_timeout(Duration::from_secs(10)).unwrap() else { panic!() };
    assert_eq!(pages, 512, "{why}");
}

#[test]
fn the_working_set_is_streamed_and_placed_before_it_is_touched() {
    let img = Arc::new(pattern(1024));
    let ws = WorkingSet {
        page_size: 4096,
        ranges: vec![(100 * 4096, 40 * 4096), (8 * 4096, 4096), (600 * 4096, 300 * 4096)],
    };
    let cfg = NetServerConfig { push: Some(ws.clone()), ..NetServerConfig::new(secret()) };
    let (srv, _ev) = serve(&img, cfg);
    let src = Arc::new(NetSource::connect(&srv.local_addr().to_string(), &secret(), &client_cfg()).unwrap());
    assert_eq!(src.push_bytes(), ws.bytes());
    let (map, ps, _) = local(src.clone(), img.len(), 4096);
    spawn_push_placer(src.clone(), &ps).unwrap().join().unwrap();
    assert_eq!(ps.resident_pages(), 341, "{:?}", ps.stats());
    let before = ps.stats();
    assert_eq!(before.pages_prefetched, 341);
    assert_eq!(before.faults, 0);
    // Touching the working set costs no fault and no request.
    for &(o, l) in &ws.ranges {
        for p in (o..o + u64::from(l)).step_by(PAGE) {
            assert_eq!(kernel_read(&map, p as usize).unwrap(), img[p as usize..][..16].to_vec());
        }
    }
    assert_eq!(ps.stats().faults, 0);
    assert_eq!(src.pages_received(), (0, 341));
    all_bytes_match(&map, &img);
    ps.stop();
}

#[test]
fn a_wrong_secret_is_refused_on_both_sides() {
    let img = Arc::new(pattern(16));
    let (srv, ev) = serve(&img, NetServerConfig::new(secret()));
    let addr = srv.local_addr().to_string();
    let other = Secret::from_bytes(b"another secret of some length").unwrap();
    // The client notices that the server cannot prove the secret...
    let e = NetSource::connect(&addr, &other, &client_cfg()).unwrap_err();
    assert!(e.to_string().contains("does not know the shared secret"), "{e}");
    assert!(matches!(ev.recv_timeout(Duration::from_secs(10)).unwrap(), NetEvent::Rejected { .. }));
    // ... and the server refuses a client that cannot prove it.
    let mut c = TcpStream::connect(&addr).unwrap();
    wire::write_msg(&mut c, &Msg::Hello { min: 1, max: 1, flags: 0, nonce: [1; 32] }).unwrap();
    let Msg::Challenge { .. } = wire::read_msg(&mut c).unwrap() else { panic!() };
    wire::write_msg(&mut c, &Msg::Auth { proof: [0; 32] }).unwrap();
    let Msg::Error { reason } = wire::read_msg(&mut c).unwrap() else { panic!() };
    assert!(reason.contains("authentication failed"), "{reason}");
    let NetEvent::Rejected { error, .. } = ev.recv_timeout(Duration::from_secs(10)).unwrap() else { panic!() };
    assert!(error.contains("authentication failed"), "{error}");
    assert!(Secret::from_bytes(b"short").unwrap_err().to_string().contains("at least 16"));
}

#[test]
fn an_unsupported_version_is_refused_clearly() {
    let img = Arc::new(pattern(16));
    let (srv, _ev) = serve(&img, NetServerConfig::new(secret()));
    let cfg = NetClientConfig { versions: (7, 9), ..client_cfg() };
    let e = NetSource::connect(&srv.local_addr().to_string(), &secret(), &cfg).unwrap_err();
    assert!(e.to_string().contains("unsupported protocol version: the client speaks 7..=9"), "{e}");
}

#[test]
fn bad_frames_silence_and_bad_requests_end_only_that_connection() {
    let img = Arc::new(pattern(64));
    let cfg = NetServerConfig { handshake_timeout: Duration::from_millis(300), ..NetServerConfig::new(secret()) };
    let (srv, ev) = serve(&img, cfg);
    let addr = srv.local_addr().to_string();
    // An oversized frame header.
    let mut c = TcpStream::connect(&addr).unwrap();
    let mut h = vec![1u8, 0, 0, 0];
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    std::io::Write::write_all(&mut c, &h).unwrap();
    let NetEvent::Rejected { error, .. } = ev.recv_timeout(Duration::from_secs(10)).unwrap() else { panic!() };
    assert!(error.contains("refused (at most"), "{error}");
    // Not a forkvm peer at all.
    let mut c = TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut c, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let NetEvent::Rejected { error, .. } = ev.recv_timeout(Duration::from_secs(10)).unwrap() else { panic!() };
    assert!(error.contains("reading Hello"), "{error}");
    // A peer that says nothing is dropped after the handshake timeout.
    let _silent = TcpStream::connect(&addr).unwrap();
    let NetEvent::Rejected { error, .. } = ev.recv_timeout(Duration::from_secs(10)).unwrap() else { panic!() };
    assert!(error.contains("timeout"), "{error}");
    // A truncated Hello.
    let mut c = TcpStream::connect(&addr).unwrap();
    let f = Msg::Hello { min: 1, max: 1, flags: 0, nonce: [0; 32] }.encode();
    std::io::Write::write_all(&mut c, &f[..20]).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let NetEvent::Rejected { error, .. } = ev.recv_timeout(Duration::from_secs(10)).unwrap() else { panic!() };
    assert!(error.contains("middle of a frame"), "{error}");
    // An authenticated client asking beyond the source loses its connection, with a reason.
    let good = Arc::new(NetSource::connect(&addr, &secret(), &client_cfg()).unwrap());
    let mut buf = vec![0u8; PAGE];
    let e = good.fill(64 * 4096, &mut buf).unwrap_err();
    assert!(e.to_string().contains("inside the remote source"), "{e}");
    // Everyone else is still served.
    let other = NetSource::connect(&addr, &secret(), &client_cfg()).unwrap();
    other.fill(4096, &mut buf).unwrap();
    assert_eq!(buf, img[4096..8192].to_vec());
    // `good` (still open) and `other`; the rejected ones are told only once they stopped counting
    // (a Rejected event came before its session left the count: 3 here once).
    assert_eq!(srv.active(), 2);
}

/// A fake server: accepts one client, does the handshake right, then hands the stream and
/// session key to `then`.
fn fake_server(len: u64, then: impl FnOnce(TcpStream, SessionKey) + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let Msg::Hello { nonce: cn, .. } = wire::read_msg(&mut c).unwrap() else { panic!() };
        let sn = [9u8; 32];
        let proof = secret().server_proof(1, &cn, &sn);
        wire::write_msg(&mut c, &Msg::Challenge { version: 1, nonce: sn, proof }).unwrap();
        let Msg::Auth { .. } = wire::read_msg(&mut c).unwrap() else { panic!() };
        wire::write_msg(&mut c, &Msg::Welcome { len, page_size: 4096, state_len: 0, push_bytes: 0 }).unwrap();
        then(c, secret().session(1, &cn, &sn));
    });
    addr
}

/// What a guest sees when the page source breaks: the access fails (poisoned page, EFAULT for a
/// kernel access) instead of hanging or returning garbage, the failure hook runs first with the
/// reason, and the source stays broken.
fn expect_poisoned(src: &Arc<NetSource>, what: &str) {
    let (map, ps, seen) = local(src.clone(), 16 * PAGE, 4096);
    assert_eq!(kernel_read(&map, 5 * PAGE), Err(libc::EFAULT));
    let hooked = seen.lock().unwrap().join("\n");
    assert!(hooked.contains(what), "hook said: {hooked}");
    assert!(src.broken().unwrap().contains(what), "{:?}", src.broken());
    // The counter is bumped right after the poison ioctl that woke the reader.
    let t0 = Instant::now();
    while ps.stats().pages_poisoned == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::yield_now();
    }
    assert_eq!(ps.stats().pages_poisoned, 1);
    assert_eq!(ps.stats().pages_copied, 0, "nothing was placed");
    // Still broken for later faults: no retry onto a stream in an unknown state.
    assert_eq!(kernel_read(&map, 9 * PAGE), Err(libc::EFAULT));
    ps.stop();
}

#[test]
fn a_page_that_fails_its_checksum_is_never_placed() {
    let addr = fake_server(16 * PAGE as u64, |mut c, key| {
        let Msg::Request { id, offset, len } = wire::read_msg(&mut c).unwrap() else { panic!() };
        assert_eq!(len as usize, PAGE);
        let page = vec![0x42u8; PAGE];
        let mac = key.page(offset, KIND_DATA, &page);
        let mut bad = page.clone();
        bad[100] ^= 1; // one bit flipped on the way
        wire::write_msg(&mut c, &Msg::Pages { id, offset, kinds: vec![KIND_DATA], macs: vec![mac], data: bad })
            .unwrap();
        let _ = wire::read_msg(&mut c);
    });
    let src = Arc::new(NetSource::connect(&addr, &secret(), &client_cfg()).unwrap());
    expect_poisoned(&src, "failed its checksum");
}

#[test]
fn a_page_for_another_offset_is_never_placed() {
    // A valid page replayed at another offset (its MAC binds the offset).
    let addr = fake_server(16 * PAGE as u64, |mut c, key| {
        let Msg::Request { id, offset, .. } = wire::read_msg(&mut c).unwrap() else { panic!() };
        let page = vec![0x42u8; PAGE];
        let mac = key.page(offset + PAGE as u64, KIND_DATA, &page);
        wire::write_msg(&mut c, &Msg::Pages { id, offset, kinds: vec![KIND_DATA], macs: vec![mac], data: page })
            .unwrap();
        let _ = wire::read_msg(&mut c);
    });
    let src = Arc::new(NetSource::connect(&addr, &secret(), &client_cfg()).unwrap());
    expect_poisoned(&src, "failed its checksum");
}

#[test]
fn a_stream_cut_inside_a_frame_poisons_instead_of_hanging() {
    let addr = fake_server(16 * PAGE as u64, |mut c, key| {
        let Msg::Request { id, offset, .. } = wire::read_msg(&mut c).unwrap() else { panic!() };
        let page = vec![0x42u8; PAGE];
        let mac = key.page(offset, KIND_DATA, &page);
        let f = Msg::Pages { id, offset, kinds: vec![KIND_DATA], macs: vec![mac], data: page }.encode();
        std::io::Write::write_all(&mut c, &f[..f.len() / 2]).unwrap();
        // Dropped here: the link is gone mid-page.
    });
    let src = Arc::new(NetSource::connect(&addr, &secret(), &client_cfg()).unwrap());
    expect_poisoned(&src, "middle of a frame");
}

#[test]
fn a_server_that_stops_answering_times_out_and_poisons() {
    let (tx, rx) = channel::<()>();
    let addr = fake_server(16 * PAGE as u64, move |mut c, _| {
        let _ = wire::read_msg(&mut c);
        let _ = rx.recv(); // keeps the connection open, silent, until the test ends
    });
    let cfg = NetClientConfig { request_timeout: Duration::from_millis(300), ..client_cfg() };
    let src = Arc::new(NetSource::connect(&addr, &secret(), &cfg).unwrap());
    let hooked = Arc::new(Mutex::new(None));
    let h2 = hooked.clone();
    src.on_broken(Arc::new(move |w: &str| *h2.lock().unwrap() = Some(w.to_string())));
    expect_poisoned(&src, "no answer for pages 0x5000+0x1000 within 300ms");
    assert!(hooked.lock().unwrap().as_ref().unwrap().contains("no answer"));
    drop(tx);
}

#[test]
fn killing_the_server_mid_transfer_stops_the_client_not_the_others() {
    let img = Arc::new(pattern(256));
    let (srv, _ev) = serve(&img, NetServerConfig::new(secret()));
    let addr = srv.local_addr().to_string();
    let src = Arc::new(NetSource::connect(&addr, &secret(), &client_cfg()).unwrap());
    let (map, ps, seen) = local(src.clone(), img.len(), 4096);
    assert_eq!(kernel_read(&map, 3 * PAGE).unwrap(), img[3 * PAGE..][..16].to_vec());
    let t0 = Instant::now();
    srv.stop();
    // Served pages stay readable; the next one fails instead of hanging or reading zeros.
    assert_eq!(kernel_read(&map, 3 * PAGE).unwrap(), img[3 * PAGE..][..16].to_vec());
    assert_eq!(kernel_read(&map, 200 * PAGE), Err(libc::EFAULT));
    assert!(t0.elapsed() < Duration::from_secs(30));
    let why = seen.lock().unwrap().join("\n");
    assert!(why.contains("connection to the page server") && why.contains("lost"), "{why}");
    ps.stop();
}

#[test]
fn the_state_blob_travels_authenticated() {
    let img = Arc::new(pattern(16));
    let cfg = NetServerConfig { state: Some(b"vcpu and device state".to_vec()), ..NetServerConfig::new(secret()) };
    let (srv, _ev) = serve(&img, cfg);
    let src = NetSource::connect(&srv.local_addr().to_string(), &secret(), &client_cfg()).unwrap();
    assert_eq!(src.state_len(), 21);
    assert_eq!(src.fetch_state().unwrap(), b"vcpu and device state".to_vec());
    // A server without state says so.
    let (srv2, _ev2) = serve(&img, NetServerConfig::new(secret()));
    let src2 = NetSource::connect(&srv2.local_addr().to_string(), &secret(), &client_cfg()).unwrap();
    assert!(src2.fetch_state().unwrap_err().to_string().contains("no VM state"));
}

#[test]
fn the_first_clients_requests_become_the_working_set() {
    let img = Arc::new(pattern(256));
    let d = crate::tests::TempDir::new("netwset");
    std::fs::create_dir_all(&d.0).unwrap();
    let path = d.0.join("wset");
    let cfg = NetServerConfig { record: Some(path.clone()), ..NetServerConfig::new(secret()) };
    let (srv, ev) = serve(&img, cfg);
    let src = Arc::new(NetSource::connect(&srv.local_addr().to_string(), &secret(), &client_cfg()).unwrap());
    let (map, ps, _) = local(src.clone(), img.len(), 4096);
    for p in [7usize, 3, 100] {
        kernel_read(&map, p * PAGE).unwrap();
    }
    ps.stop();
    drop(src);
    while !matches!(ev.recv_timeout(Duration::from_secs(10)).unwrap(), NetEvent::Ended { .. }) {}
    let ws = WorkingSet::load(&path).unwrap();
    assert_eq!(ws.ranges, vec![(7 * 4096, 4096), (3 * 4096, 4096), (100 * 4096, 4096)]);
    // The next client gets it streamed.
    let next = Arc::new(NetSource::connect(&srv.local_addr().to_string(), &secret(), &client_cfg()).unwrap());
    assert_eq!(next.push_bytes(), 3 * 4096);
    let (_map, ps, _) = local(next.clone(), img.len(), 4096);
    spawn_push_placer(next.clone(), &ps).unwrap().join().unwrap();
    assert_eq!(ps.stats().pages_prefetched, 3);
}

#[test]
fn secret_files_must_be_private_regular_files() {
    use std::os::unix::fs::PermissionsExt;
    let d = crate::tests::TempDir::new("secret");
    std::fs::create_dir_all(&d.0).unwrap();
    let f = d.0.join("s");
    std::fs::write(&f, b"0123456789abcdef0123").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(Secret::load(&f).unwrap_err().to_string().contains("chmod 600"));
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let a = Secret::load(&f).unwrap();
    std::os::unix::fs::symlink(&f, d.0.join("link")).unwrap();
    assert!(Secret::load(&d.0.join("link")).is_err(), "a symlink is not followed");
    let b = Secret::from_bytes(b"0123456789abcdef0123").unwrap();
    assert_eq!(a.server_proof(1, &[0; 32], &[1; 32]), b.server_proof(1, &[0; 32], &[1; 32]));
}

/// Found by `forkvm bench xhost`: a broken-link hook that holds the last reference to the
/// source (a woken VM's hook holds its page server's monitor, which holds the source) drops it
/// on the reader thread, whose `NetSource::drop` then joined itself: "failed to join thread:
/// Resource deadlock avoided" panicked the reader.
#[test]
fn the_last_reference_dropped_by_the_broken_hook_does_not_panic() {
    let img = Arc::new(pattern(16));
    let (srv, _ev) = serve(&img, NetServerConfig::new(secret()));
    let src = Arc::new(NetSource::connect(&srv.local_addr().to_string(), &secret(), &client_cfg()).unwrap());
    let held = Mutex::new(Some(src.clone()));
    let (tx, rx) = channel();
    src.on_broken(Arc::new(move |_why: &str| {
        drop(held.lock().unwrap().take()); // the last reference goes here, on the reader thread
        let _ = tx.send(());
    }));
    drop(src);
    srv.stop();
    rx.recv_timeout(Duration::from_secs(10)).expect("the hook ran to its end");
}

/// The link dies in the middle of the working-set push: what arrived whole and verified is
/// placed and correct, the frame cut in half is dropped, and a page that never came is poisoned
/// (never zero, never garbage).
#[test]
fn a_push_cut_mid_frame_places_only_verified_pages() {
    let img = Arc::new(pattern(512));
    let im = img.clone();
    let addr = fake_server_push(512 * PAGE as u64, 512 * PAGE as u64, move |mut c, key| {
        for (i, chunk) in [(0u64, 64usize), (64, 64), (128, 64)].into_iter().enumerate() {
            let (off, n) = (chunk.0 * PAGE as u64, chunk.1);
            let data = im[off as usize..off as usize + n * PAGE].to_vec();
            let macs = data.chunks(PAGE).enumerate().map(|(j, p)| key.page(off + (j * PAGE) as u64, KIND_DATA, p));
            let f = Msg::Pages { id: 0, offset: off, kinds: vec![KIND_DATA; n], macs: macs.collect(), data }.encode();
            let cut = if i == 2 { f.len() / 2 } else { f.len() };
            std::io::Write::write_all(&mut c, &f[..cut]).unwrap();
        }
    });
    let src = Arc::new(NetSource::connect(&addr, &secret(), &client_cfg()).unwrap());
    let (map, ps, seen) = local(src.clone(), img.len(), 4096);
    spawn_push_placer(src.clone(), &ps).unwrap().join().unwrap();
    assert_eq!(ps.stats().pages_prefetched, 128, "{:?}", ps.stats());
    for p in [0usize, 63, 64, 127] {
        assert_eq!(kernel_read(&map, p * PAGE).unwrap(), img[p * PAGE..][..16].to_vec(), "page {p}");
    }
    assert_eq!(kernel_read(&map, 130 * PAGE), Err(libc::EFAULT));
    assert!(seen.lock().unwrap().join("\n").contains("middle of a frame"));
    ps.stop();
}

/// Like [`fake_server`], announcing `push_bytes` of working set to a client that asked for it.
fn fake_server_push(len: u64, push_bytes: u64, then: impl FnOnce(TcpStream, SessionKey) + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let Msg::Hello { nonce: cn, .. } = wire::read_msg(&mut c).unwrap() else { panic!() };
        let sn = [8u8; 32];
        let proof = secret().server_proof(1, &cn, &sn);
        wire::write_msg(&mut c, &Msg::Challenge { version: 1, nonce: sn, proof }).unwrap();
        let Msg::Auth { .. } = wire::read_msg(&mut c).unwrap() else { panic!() };
        wire::write_msg(&mut c, &Msg::Welcome { len, page_size: 4096, state_len: 0, push_bytes }).unwrap();
        then(c, secret().session(1, &cn, &sn));
    });
    addr
}
