//! The Firecracker listener against a stand-in Firecracker ([`crate::fc_client`]): every
//! handshake format, blocking uffds, balloon removes, bad handshakes, several VMs at once, peer
//! exit, poisoned pages and working sets. Real userfaultfd, no KVM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use crate::fc::{self, GuestRegionUffdMapping, PageSizeField};
use crate::fc_client::{ClientOpts, FcClient};
use crate::listener::{Event, Listener, ListenerConfig};
use crate::tests::{corrupt_store, pattern, store_with, TempDir};
use crate::uffd::{features, Uffd};
use crate::{ChunkSource, FileSource, PageSource};

const WAIT: Duration = Duration::from_secs(30);
const PAGES: usize = 256;

fn next(rx: &Receiver<Event>) -> Event {
    rx.recv_timeout(WAIT).expect("no listener event within 30 s")
}

fn ended(rx: &Receiver<Event>) -> (String, crate::StatsSnapshot, Option<String>) {
    match next(rx) {
        Event::Ended { why, stats, error, .. } => (why, stats, error),
        e => panic!("expected Ended, got {e:?}"),
    }
}

fn rejected(rx: &Receiver<Event>) -> String {
    match next(rx) {
        Event::Rejected { error, .. } => error,
        e => panic!("expected Rejected, got {e:?}"),
    }
}

/// A memory file with the test pattern, its bytes and a file source for it.
fn memfile(d: &TempDir, pages: usize) -> (PathBuf, Arc<Vec<u8>>, Arc<dyn PageSource>) {
    std::fs::create_dir_all(&d.0).unwrap();
    let img = pattern(pages);
    let path = d.0.join("mem");
    std::fs::write(&path, &img).unwrap();
    let src = Arc::new(FileSource::whole(std::fs::File::open(&path).unwrap()).unwrap());
    (path, Arc::new(img), src)
}

/// Two regions, like Firecracker's RAM below and above the MMIO gap.
fn two_regions(field: PageSizeField) -> ClientOpts {
    let half = PAGES / 2 * 4096;
    ClientOpts { regions: vec![(half, 0), (half, half as u64)], field, blocking: false }
}

fn listen(d: &TempDir, src: Arc<dyn PageSource>, cfg: ListenerConfig) -> (Listener, Receiver<Event>, PathBuf) {
    let sock = d.0.join("uffd.sock");
    let (l, rx) = Listener::bind(&sock, src, cfg).unwrap();
    (l, rx, sock)
}

#[test]
fn every_firecracker_format_is_served_from_file_and_store() {
    let d = TempDir::new("fcfmt");
    let (_, img, file_src) = memfile(&d, PAGES);
    let (store, m) = store_with(&img, &d);
    let store_src: Arc<dyn PageSource> = Arc::new(ChunkSource::new(store, m));
    for (kind, src) in [("file", file_src), ("store", store_src)] {
        let (l, rx, sock) = listen(&d, src, ListenerConfig::default());
        for field in [PageSizeField::Absent, PageSizeField::KibOnly, PageSizeField::Both, PageSizeField::PageSizeOnly] {
            let c = FcClient::connect(&sock, &two_regions(field)).unwrap();
            match next(&rx) {
                Event::Started { field: f, regions, bytes, .. } => {
                    assert_eq!((f, regions, bytes), (field, 2, (PAGES * 4096) as u64), "{kind}")
                }
                e => panic!("{kind} {field:?}: {e:?}"),
            }
            assert_eq!(c.verify(&img), Ok(()), "{kind} {field:?}");
            drop(c);
            let (why, st, err) = ended(&rx);
            assert!(why.contains("closed the socket"), "{why}");
            assert_eq!((st.pages_copied + st.pages_zeroed, err), (PAGES as u64, None), "{kind} {field:?}");
        }
        l.stop();
    }
}

#[test]
fn blocking_uffd_and_balloon_remove() {
    let d = TempDir::new("fcblk");
    let (_, img, src) = memfile(&d, PAGES);
    let (_l, rx, sock) = listen(&d, src, ListenerConfig::default());
    let opts = ClientOpts { blocking: true, ..two_regions(PageSizeField::KibOnly) };
    let c = FcClient::connect(&sock, &opts).unwrap();
    assert!(matches!(next(&rx), Event::Started { .. }));
    assert_eq!(c.verify(&img), Ok(()));
    // The balloon gives pages 8..40 of region 0 back: they read as zero afterwards.
    c.remove(0, 8 * 4096, 32 * 4096).unwrap();
    let mut expect = (*img).clone();
    expect[8 * 4096..40 * 4096].fill(0);
    assert_eq!(c.verify(&expect), Ok(()));
    drop(c);
    let (_, st, _) = ended(&rx);
    assert!(st.removes >= 1, "{st:?}");
}

/// Sends `body` with `fds` and returns the listener's verdict.
fn bad(sock: &Path, rx: &Receiver<Event>, body: &[u8], nfds: usize) -> String {
    let s = UnixStream::connect(sock).unwrap();
    let uffds: Vec<Uffd> = (0..nfds).map(|_| Uffd::new(features::EVENT_REMOVE, 0).unwrap()).collect();
    let fds: Vec<_> = uffds.iter().map(|u| u.as_fd()).collect();
    let _ = crate::fc_wire::send_with_fds(&s, body, &fds);
    let e = rejected(rx);
    drop(s);
    e
}

fn region(base: u64, size: u64, offset: u64) -> GuestRegionUffdMapping {
    GuestRegionUffdMapping { base_host_virt_addr: base, size, offset, page_size: 4096 }
}

#[test]
fn bad_handshakes_are_refused_and_others_still_served() {
    let d = TempDir::new("fcbad");
    let (_, img, src) = memfile(&d, PAGES);
    let cfg = ListenerConfig { handshake_timeout: Duration::from_millis(300), ..Default::default() };
    let (l, rx, sock) = listen(&d, src, cfg);
    let len = (PAGES * 4096) as u64;
    let body = |m: &[GuestRegionUffdMapping]| fc::body(m, PageSizeField::Both);
    let a = 0x7f00_0000_0000u64;
    let cases: Vec<(&str, Vec<u8>, usize, &str)> = vec![
        ("garbage", b"{not json".to_vec(), 1, "bad mappings JSON"),
        ("no fd", body(&[region(a, len, 0)]), 0, "exactly one uffd, got 0"),
        ("two fds", body(&[region(a, len, 0)]), 2, "exactly one uffd, got 2"),
        ("overlap", body(&[region(a, 8192, 0), region(a + 4096, 8192, 0)]), 1, "overlap"),
        ("size", body(&[region(a, 6000, 0)]), 1, "not a multiple of the page size"),
        ("past the file", body(&[region(a, 8192, len - 4096)]), 1, "past the end"),
        ("offset overflow", body(&[region(a, 8192, u64::MAX - 4095)]), 1, "past the end"),
        ("empty", b"[]".to_vec(), 1, "no regions"),
        ("huge", vec![b' '; fc::MAX_JSON + 10], 1, "larger than"),
        (
            "disagree",
            br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]"#.to_vec(),
            1,
            "disagree",
        ),
        (
            "page size",
            br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":1000}]"#.to_vec(),
            1,
            "not a power of two",
        ),
    ];
    for (name, b, nfds, want) in &cases {
        let e = bad(&sock, &rx, b, *nfds);
        assert!(e.contains(want), "{name}: {e}");
    }
    // Not a userfaultfd: a pipe.
    let s = UnixStream::connect(&sock).unwrap();
    let mut p = [0i32; 2];
    // SAFETY: p has room for two fds.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: pipe just gave us this fd; it is owned once.
    let r = unsafe { OwnedFd::from_raw_fd(p[0]) };
    // SAFETY: as above.
    let _w = unsafe { OwnedFd::from_raw_fd(p[1]) };
    crate::fc_wire::send_with_fds(&s, &body(&[region(a, len, 0)]), &[r.as_fd()]).unwrap();
    assert!(rejected(&rx).contains("not a userfaultfd"));
    // Silence, then hang up.
    let s = UnixStream::connect(&sock).unwrap();
    assert!(rejected(&rx).contains("timed out"));
    drop(s);
    let s = UnixStream::connect(&sock).unwrap();
    drop(s);
    let e = rejected(&rx);
    assert!(e.contains("without a message") || e.contains("timed out"), "{e}");
    // The listener still serves a good VM.
    let c = FcClient::connect(&sock, &two_regions(PageSizeField::Both)).unwrap();
    assert!(matches!(next(&rx), Event::Started { .. }));
    assert_eq!(c.verify(&img), Ok(()));
    drop(c);
    ended(&rx);
    assert_eq!(l.active(), 0);
}

#[test]
fn several_vms_at_once() {
    let d = TempDir::new("fcmany");
    let (_, img, src) = memfile(&d, PAGES);
    let (l, rx, sock) = listen(&d, src, ListenerConfig::default());
    let clients: Vec<FcClient> =
        (0..4).map(|_| FcClient::connect(&sock, &two_regions(PageSizeField::Both)).unwrap()).collect();
    for _ in 0..4 {
        assert!(matches!(next(&rx), Event::Started { .. }));
    }
    assert_eq!(l.active(), 4);
    std::thread::scope(|s| {
        for c in &clients {
            let img = img.clone();
            s.spawn(move || assert_eq!(c.verify(&img), Ok(())));
        }
    });
    drop(clients);
    let mut ids: Vec<u64> = (0..4)
        .map(|_| match next(&rx) {
            Event::Ended { id, stats, .. } => {
                assert_eq!(stats.pages_copied + stats.pages_zeroed, PAGES as u64);
                id
            }
            e => panic!("{e:?}"),
        })
        .collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    assert_eq!(l.active(), 0);
}

const CHILD_ENV: &str = "PAGESRV_FC_CHILD";

/// A stand-in Firecracker in its own process (run by the tests below): connects, optionally
/// closes the socket and waits for "go" on stdin, checks every page, and exits.
#[test]
#[ignore = "re-exec helper: run by its parent tests with --ignored"]
fn fc_child() {
    let mode = std::env::var_os(CHILD_ENV).expect("fc_child runs only as a child of the fc tests");
    let sock = PathBuf::from(std::env::var_os("PAGESRV_FC_SOCK").unwrap());
    let img = std::fs::read(std::env::var_os("PAGESRV_FC_MEM").unwrap()).unwrap();
    let mut c = FcClient::connect(&sock, &two_regions(PageSizeField::KibOnly)).unwrap();
    if mode == "close-first" {
        c.close_socket();
        println!("closed");
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).unwrap();
    }
    c.verify(&img).unwrap();
    println!("verified");
    std::process::exit(0);
}

fn child(mode: &str, sock: &Path, mem: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["fc_tests::fc_child", "--exact", "--ignored", "--test-threads=1", "--nocapture"])
        .env(CHILD_ENV, mode)
        .env("PAGESRV_FC_SOCK", sock)
        .env("PAGESRV_FC_MEM", mem)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn wait_line(out: &mut impl BufRead, want: &str) {
    let mut seen = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        if line.trim().ends_with(want) {
            return;
        }
        seen += &line;
        line.clear();
    }
    panic!("child ended before printing {want:?}; it printed:\n{seen}");
}

#[test]
fn peer_exit_releases_its_server() {
    let d = TempDir::new("fcexit");
    let (mem, _, src) = memfile(&d, PAGES);
    let (l, rx, sock) = listen(&d, src, ListenerConfig::default());
    let mut ch = child("plain", &sock, &mem);
    let mut out = std::io::BufReader::new(ch.stdout.take().unwrap());
    wait_line(&mut out, "verified");
    assert!(ch.wait().unwrap().success());
    let mut saw_start = false;
    loop {
        match next(&rx) {
            Event::Started { pid, .. } => {
                assert_eq!(pid, Some(ch.id() as i32));
                saw_start = true;
            }
            Event::Ended { why, stats, .. } => {
                assert!(why.contains("exited") || why.contains("gone") || why.contains("closed"), "{why}");
                assert_eq!(stats.pages_copied + stats.pages_zeroed, PAGES as u64);
                break;
            }
            e => panic!("{e:?}"),
        }
    }
    assert!(saw_start);
    assert_eq!(l.active(), 0);
}

/// Firecracker releases that closed the socket right after the handshake are served until
/// their process exits.
#[test]
fn socket_closed_early_is_served_until_the_process_exits() {
    let d = TempDir::new("fcearly");
    let (mem, _, src) = memfile(&d, PAGES);
    let (l, rx, sock) = listen(&d, src, ListenerConfig::default());
    let mut ch = child("close-first", &sock, &mem);
    let mut out = std::io::BufReader::new(ch.stdout.take().unwrap());
    wait_line(&mut out, "closed");
    assert!(matches!(next(&rx), Event::Started { .. }));
    assert_eq!(l.active(), 1);
    writeln!(ch.stdin.take().unwrap(), "go").unwrap();
    wait_line(&mut out, "verified");
    assert!(ch.wait().unwrap().success());
    let (why, stats, _) = ended(&rx);
    assert!(why.contains("exited") || why.contains("gone"), "{why}");
    assert_eq!(stats.pages_copied + stats.pages_zeroed, PAGES as u64);
}

#[test]
fn corrupt_page_faults_only_the_toucher() {
    let d = TempDir::new("fccorrupt");
    let img = pattern(PAGES);
    let (store, m) = corrupt_store(&img, 5, &d);
    let (_l, rx, sock) = listen(&d, Arc::new(ChunkSource::new(store, m)), ListenerConfig::default());
    let c = FcClient::connect(&sock, &two_regions(PageSizeField::Both)).unwrap();
    assert!(matches!(next(&rx), Event::Started { .. }));
    let e = c.kernel_read(0, 5 * 4096, 64).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
    // Every other page is served correctly, the process is not signalled.
    let mut buf = vec![0u8; 4096];
    for p in (0..PAGES).filter(|&p| p != 5) {
        let (i, at) = if p < PAGES / 2 { (0, p) } else { (1, p - PAGES / 2) };
        c.read(i, at * 4096, &mut buf);
        assert!(buf == img[p * 4096..(p + 1) * 4096], "page {p}");
    }
    drop(c);
    let (_, st, err) = ended(&rx);
    assert_eq!(st.pages_poisoned, 1, "{st:?}");
    assert!(err.unwrap().contains("corrupt"));
}

/// Without UFFDIO_POISON the VM is stopped (its faulting vCPU stays blocked), never signalled
/// and never fed garbage.
#[test]
fn without_poison_the_vm_is_halted_not_signalled() {
    let d = TempDir::new("fchalt");
    let img = pattern(PAGES);
    let (store, m) = corrupt_store(&img, 5, &d);
    let cfg = ListenerConfig { poison: false, ..Default::default() };
    let (l, rx, sock) = listen(&d, Arc::new(ChunkSource::new(store, m)), cfg);
    let c = Arc::new(FcClient::connect(&sock, &two_regions(PageSizeField::Both)).unwrap());
    assert!(matches!(next(&rx), Event::Started { .. }));
    let (c2, (tx, done)) = (c.clone(), std::sync::mpsc::channel());
    std::thread::spawn(move || tx.send(c2.kernel_read(0, 5 * 4096, 64).map(|b| b[0])));
    let (why, _, err) = ended(&rx);
    assert!(why.contains("VM stopped") && why.contains("cannot be poisoned"), "{why}");
    assert!(err.unwrap().contains("corrupt"));
    assert!(done.try_recv().is_err(), "the faulting thread must stay blocked, not be fed a page");
    assert_eq!(l.active(), 0);
    // Only once the VMM itself lets go of its registration does the thread move on.
    c.unregister_all().unwrap();
    assert!(done.recv_timeout(WAIT).unwrap().is_ok());
}

#[test]
fn first_vm_records_the_working_set_later_vms_get_it_prefetched() {
    let d = TempDir::new("fcwset");
    let (_, img, src) = memfile(&d, PAGES);
    let wset = d.0.join("mem.wset");
    let cfg = ListenerConfig { wset: Some(wset.clone()), ..Default::default() };
    let (_l, rx, sock) = listen(&d, src, cfg);
    // First VM: touches 48 pages of region 1 (three 64 KiB blocks), recorded.
    let c = FcClient::connect(&sock, &two_regions(PageSizeField::Both)).unwrap();
    assert!(matches!(next(&rx), Event::Started { prefetch: false, .. }));
    let mut b = [0u8; 1];
    for p in 16..64 {
        c.read(1, p * 4096, &mut b);
    }
    drop(c);
    ended(&rx);
    let ws = crate::WorkingSet::load(&wset).unwrap();
    assert_eq!(ws.bytes(), 48 * 4096, "{ws:?}");
    // Second VM: the working set arrives without it touching anything.
    let c = FcClient::connect(&sock, &two_regions(PageSizeField::Both)).unwrap();
    assert!(matches!(next(&rx), Event::Started { prefetch: true, .. }));
    let t0 = std::time::Instant::now();
    while c.resident(1, 16 * 4096, 48 * 4096).unwrap() < 48 {
        assert!(t0.elapsed() < WAIT, "working set not prefetched");
        std::thread::yield_now();
    }
    assert_eq!(c.resident(0, 0, PAGES / 2 * 4096).unwrap(), 0);
    assert_eq!(c.verify(&img), Ok(()));
    drop(c);
    let (_, st, _) = ended(&rx);
    assert_eq!(st.pages_prefetched, 48, "{st:?}");
}

#[test]
fn bench_fc_runs_small() {
    let out = crate::bench_fc(&crate::FcBenchOpts { size_mib: 16, wset_mib: 4, runs: 1, dir: None });
    assert!(out.contains("REAP prefetch") && out.contains("chunk store") && !out.contains("failed"), "{out}");
}
