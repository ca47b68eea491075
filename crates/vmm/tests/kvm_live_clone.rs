//! KVM tier: live clones of a running shared-memory parent into warm VMs, served by page
//! (userfaultfd write-protect on the parent, missing-page serving in the children).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use vmm::live_clone::{LiveChild, LiveCloneOptions, LiveParent, Target};
use vmm::pool::{CloneLink, WarmVm};
use vmm::{Backing, ExitReason, MicroVm, VmConfig};

const T: Duration = Duration::from_secs(60);
/// Host-written region: 256 pages at 16 MiB.
const HOST: u64 = 0x100_0000;
const HOST_PAGES: u64 = 256;
/// Guest-written region.
const GUEST: u64 = 0x40_0000;

fn boot(mem: u64) -> MicroVm {
    let cfg = VmConfig { mem_size: mem, backing: Backing::SharedFile, ..Default::default() };
    let vm =
        MicroVm::boot(cfg).unwrap_or_else(|e| panic!("cannot boot the test guest: {e} (a usable /dev/kvm is needed)"));
    vm.wait_for("forkvm-test-guest ready", T).expect("guest ready line");
    vm
}

fn rng(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn random_page(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..4096 / 8).flat_map(|_| rng(&mut x).to_le_bytes()).collect()
}

fn sum_line(bytes: &[u8]) -> String {
    format!("sum {:016x}", test_guest::sum_bytes(bytes))
}

/// Warm VMs served in threads of this process (a pool member process does the same); each
/// returns its clone once the parent's ticket came.
type Pending = std::thread::JoinHandle<Result<(MicroVm, CloneLink), String>>;

fn warm(n: usize, mem: u64, names: &str) -> (Vec<Target>, Vec<Pending>) {
    let mut targets = Vec::new();
    let mut pending = Vec::new();
    for i in 0..n {
        let w = WarmVm::new(mem, 1).expect("warm VM");
        let (theirs, ours) = UnixStream::pair().unwrap();
        pending.push(std::thread::spawn(move || {
            w.accept(theirs, None).map(|(vm, link, _, _)| (vm, link)).map_err(|e| e.to_string())
        }));
        targets.push(Target { conn: ours, name: Some(format!("{names}{i}")) });
    }
    (targets, pending)
}

fn join(p: Vec<Pending>) -> Vec<(MicroVm, CloneLink)> {
    p.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
}

/// Writes random pages of the host region from a thread until stopped; `hold` parks it (and it
/// says so in `parked`), so a test can fix what the memory holds at the clone instant.
struct Writer {
    stop: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
    parked: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    h: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(vm: &MicroVm) -> Writer {
        let mem = vm.memory().clone();
        let (stop, hold, parked, writes) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, h, p, w) = (stop.clone(), hold.clone(), parked.clone(), writes.clone());
        let t = std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !s.load(SeqCst) {
                if h.load(SeqCst) {
                    p.store(true, SeqCst);
                    std::thread::yield_now();
                    continue;
                }
                p.store(false, SeqCst);
                let page = rng(&mut x) % HOST_PAGES;
                assert!(mem.write(HOST + page * 4096, &random_page(rng(&mut x))));
                w.fetch_add(1, SeqCst);
            }
        });
        Writer { stop, hold, parked, writes, h: Some(t) }
    }
    fn park(&self) {
        self.hold.store(true, SeqCst);
        while !self.parked.load(SeqCst) {
            std::thread::yield_now();
        }
    }
    fn wait_writes(&self, n: u64) {
        let target = self.writes.load(SeqCst) + n;
        while self.writes.load(SeqCst) < target {
            std::thread::yield_now();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(h) = self.h.take() {
            h.join().unwrap();
        }
    }
}

fn host_region(vm: &MicroVm) -> Vec<u8> {
    let mut b = vec![0u8; (HOST_PAGES * 4096) as usize];
    assert!(vm.memory().read(HOST, &mut b));
    b
}

/// Clones with the writer parked across the clone instant; it resumes as soon as the parent's
/// memory is write-protected... and keeps writing while the children restore and run.
fn clone_at_instant(
    live: &LiveParent,
    vm: &MicroVm,
    w: &Writer,
    n: usize,
    names: &str,
    opts: &LiveCloneOptions,
) -> (Vec<u8>, Vec<LiveChild>, Vec<(MicroVm, CloneLink)>) {
    let (targets, pending) = warm(n, vm.memory().size(), names);
    w.park();
    let reference = host_region(vm);
    let hold = w.hold.clone();
    let mut opts = opts.clone();
    opts.on_captured = Some(Arc::new(move || hold.store(false, SeqCst)));
    let (kids, rep) = live.clone_into(vm, targets, &opts).unwrap();
    eprintln!("live clone x{n}: {rep:?}");
    (reference, kids, join(pending))
}

#[test]
fn live_clone_child_sees_the_clone_instant_while_the_parent_writes() {
    let vm = boot(64 << 20);
    assert_eq!(vm.command(&format!("touch {GUEST:#x} 16 0x11"), T).unwrap(), "touched 16");
    for p in 0..HOST_PAGES {
        assert!(vm.memory().write(HOST + p * 4096, &random_page(p + 1)));
    }
    let live = LiveParent::attach(&vm).unwrap();
    let w = Writer::start(&vm);
    w.wait_writes(50);
    let opts = LiveCloneOptions { prefetch: false, ..Default::default() };
    let (ref1, kids1, clones1) = clone_at_instant(&live, &vm, &w, 2, "a", &opts);
    // The parent writes on, from the host and from the guest, while the children read.
    w.wait_writes(300);
    assert_eq!(vm.command(&format!("touch {GUEST:#x} 16 0x22"), T).unwrap(), "touched 16");
    let sum11 = sum_line(&[0x11; 16 * 4096]);
    for (c, _) in &clones1 {
        assert_eq!(c.command("ping", T).unwrap(), "pong");
        assert_eq!(c.command("gen", T).unwrap(), "gen 2");
        assert_eq!(c.command(&format!("sum {HOST:#x} {HOST_PAGES}"), T).unwrap(), sum_line(&ref1));
        assert_eq!(c.command(&format!("sum {GUEST:#x} 16"), T).unwrap(), sum11);
    }
    // A second clone while the first generation's children still depend on the parent.
    let (ref2, kids2, clones2) = clone_at_instant(&live, &vm, &w, 1, "b", &opts);
    w.wait_writes(300);
    assert_ne!(ref1, ref2, "the parent wrote between the clones");
    let sum22 = sum_line(&[0x22; 16 * 4096]);
    let c2 = &clones2[0].0;
    assert_eq!(c2.command(&format!("sum {HOST:#x} {HOST_PAGES}"), T).unwrap(), sum_line(&ref2));
    assert_eq!(c2.command(&format!("sum {GUEST:#x} 16"), T).unwrap(), sum22);
    // Clones write privately; the parent and the other clones never see it.
    assert_eq!(clones1[0].0.command(&format!("touch {GUEST:#x} 16 0x33"), T).unwrap(), "touched 16");
    assert_eq!(clones1[1].0.command(&format!("sum {GUEST:#x} 16"), T).unwrap(), sum11);
    assert_eq!(vm.command(&format!("sum {GUEST:#x} 16"), T).unwrap(), sum22);
    let mut randoms: Vec<String> = clones1.iter().map(|(c, _)| c.command("random", T).unwrap()).collect();
    randoms.push(vm.command("random", T).unwrap());
    randoms.sort();
    randoms.dedup();
    assert_eq!(randoms.len(), 3, "clones must not share the parent's random stream");
    let st = live.stats();
    assert_eq!(st.active_generations, 2, "{st:?}");
    assert!(st.wp_faults > 0 && st.pages_held > 0, "{st:?}");
    drop(w);
    // Children gone: their sessions end, the generations retire, protection is dropped.
    for (k, (mut c, link)) in kids1.into_iter().chain(kids2).zip(clones1.into_iter().chain(clones2)) {
        c.stop();
        drop(c);
        drop(link);
        assert_eq!(k.wait(), "the child exited");
    }
    let st = live.stats();
    assert_eq!((st.active_generations, st.pages_held, st.protected), (0, 0, false), "{st:?}");
    assert_eq!(vm.command("ping", T).unwrap(), "pong");
}

/// Armed write protection (what pool forks use): protection stays on between clones and a
/// clone's pause re-protects only what the parent wrote since; a clone made after earlier ones
/// retired still sees exactly its clone instant, host and guest writes alike.
#[test]
fn armed_live_clones_see_their_instant_after_earlier_clones_retired() {
    let vm = boot(64 << 20);
    for p in 0..HOST_PAGES {
        assert!(vm.memory().write(HOST + p * 4096, &random_page(p + 7)));
    }
    let live = LiveParent::attach(&vm).unwrap();
    live.arm().unwrap();
    let w = Writer::start(&vm);
    let opts = LiveCloneOptions { prefetch: false, ..Default::default() };
    for (round, byte) in [(1u8, 0x41u8), (2, 0x42)] {
        // Writes between clones, from the host and from the guest.
        w.wait_writes(200);
        assert_eq!(vm.command(&format!("touch {GUEST:#x} 16 {byte:#x}"), T).unwrap(), "touched 16");
        let (reference, kids, clones) = clone_at_instant(&live, &vm, &w, 1, &format!("armed{round}"), &opts);
        w.wait_writes(200);
        assert_eq!(vm.command(&format!("touch {GUEST:#x} 16 0x99"), T).unwrap(), "touched 16");
        let c = &clones[0].0;
        assert_eq!(c.command(&format!("sum {HOST:#x} {HOST_PAGES}"), T).unwrap(), sum_line(&reference));
        assert_eq!(c.command(&format!("sum {GUEST:#x} 16"), T).unwrap(), sum_line(&[byte; 16 * 4096]));
        for (k, (mut c, link)) in kids.into_iter().zip(clones) {
            c.stop();
            drop(c);
            drop(link);
            assert_eq!(k.wait(), "the child exited");
        }
        let st = live.stats();
        assert_eq!((st.active_generations, st.protected), (0, true), "armed: still protected {st:?}");
    }
    drop(w);
    assert_eq!(vm.command("ping", T).unwrap(), "pong");
}

#[test]
fn live_clone_page_server_dying_stops_the_child_with_an_error() {
    let vm = boot(64 << 20);
    for p in 0..HOST_PAGES {
        assert!(vm.memory().write(HOST + p * 4096, &random_page(p + 7)));
    }
    let live = LiveParent::attach(&vm).unwrap();
    let (targets, pending) = warm(1, 64 << 20, "d");
    let opts = LiveCloneOptions { prefetch: false, ..Default::default() };
    let (mut kids, _) = live.clone_into(&vm, targets, &opts).unwrap();
    let (c, link) = join(pending).pop().unwrap();
    assert_eq!(c.command("ping", T).unwrap(), "pong");
    // The page server goes away while the child still needs pages from it.
    let why = kids.pop().unwrap().disconnect();
    assert!(why.contains("exited") || why.contains("ended"), "{why}");
    c.send_line(&format!("sum {HOST:#x} {HOST_PAGES}")).unwrap();
    match c.wait_exit(Some(T)) {
        Some(ExitReason::Error(e)) => assert!(e.contains("page server"), "{e}"),
        other => panic!("the child must stop with an error, not {other:?}"),
    }
    assert!(!link.independent());
    // The parent is unharmed and no longer write-protected.
    assert_eq!(vm.command("ping", T).unwrap(), "pong");
    assert_eq!(vm.command(&format!("touch {GUEST:#x} 4 0x44"), T).unwrap(), "touched 4");
    let st = live.stats();
    assert_eq!((st.active_generations, st.protected), (0, false), "{st:?}");
}

/// 100 warm VMs and their page servers in one process need ~1500 descriptors.
fn raise_fd_limit() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a valid struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 && r.rlim_cur < 4096 {
        r.rlim_cur = r.rlim_max.min(8192);
        // SAFETY: setrlimit reads a valid struct we own.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    }
}

#[test]
fn live_clone_a_parent_into_100_children_at_once() {
    raise_fd_limit();
    let mem = 16 << 20;
    let vm = boot(mem);
    for p in 0..64 {
        assert!(vm.memory().write(HOST - 64 * 4096 + p * 4096, &random_page(p + 3)));
    }
    let mut want = vec![0u8; 64 * 4096];
    assert!(vm.memory().read(HOST - 64 * 4096, &mut want));
    let live = LiveParent::attach(&vm).unwrap();
    let (targets, pending) = warm(100, mem, "h");
    // With prefetch: every child ends up with all of the parent's data and cuts loose.
    let (kids, rep) = live.clone_into(&vm, targets, &LiveCloneOptions::default()).unwrap();
    eprintln!("100 live clones: {rep:?}");
    let clones = join(pending);
    assert_eq!(vm.command("touch 0x400000 4 0x55", T).unwrap(), "touched 4");
    for (c, _) in &clones {
        assert_eq!(c.command("ping", T).unwrap(), "pong");
        assert_eq!(c.command(&format!("sum {:#x} 64", HOST - 64 * 4096), T).unwrap(), sum_line(&want));
    }
    for k in kids {
        assert_eq!(k.wait(), "filled");
    }
    for (c, link) in &clones {
        assert!(link.wait_independent(T), "a filled clone drops its userfaultfd");
        assert_eq!(c.command("gen", T).unwrap(), "gen 2");
    }
    let st = live.stats();
    assert_eq!((st.active_generations, st.protected), (0, false), "{st:?}");
}
