//! `forkvm store import --firecracker` and `forkvm pagesrv` as a user runs them: a Firecracker
//! memory file (sparse, with zero and repeated pages) imported into a chunk store, then served
//! to stand-in Firecrackers (`pagesrv::fc_client`, Firecracker's handshake byte for byte) by the
//! real binary, from the store and from the raw file. No Firecracker or KVM needed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use pagesrv::fc::PageSizeField;
use pagesrv::fc_client::{ClientOpts, FcClient};

const PAGES: usize = 2048;
const WAIT: Duration = Duration::from_secs(60);

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("forkvm-cli-pagesrv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a sparse memory file (pages 512..640 are a hole) and returns its bytes.
fn memfile(path: &Path, seed: u64, changed_pct: usize) -> Vec<u8> {
    let mut img = pagesrv::bench::synthetic_image(PAGES, seed);
    for p in (0..PAGES).filter(|p| changed_pct > 0 && p % (100 / changed_pct) == 0) {
        img[p * 4096 + 7] ^= 0x5a;
    }
    img[512 * 4096..640 * 4096].fill(0);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(img.len() as u64).unwrap();
    f.write_all_at(&img[..512 * 4096], 0).unwrap();
    f.write_all_at(&img[640 * 4096..], 640 * 4096).unwrap();
    img
}

fn forkvm(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_forkvm")).args(args).output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "forkvm {args:?} failed:\n{so}\n{se}");
    so.into_owned()
}

/// The number before `word` in `text` (e.g. "12 deduplicated").
fn count_before(text: &str, word: &str) -> u64 {
    let i = text.find(word).unwrap_or_else(|| panic!("no {word:?} in {text}"));
    text[..i].split_whitespace().last().unwrap().trim_matches(',').parse().unwrap()
}

struct Server {
    child: Child,
    lines: Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Server {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_forkvm"))
            .arg("pagesrv")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let s = Server { child, lines };
        s.wait_line("forkvm pagesrv: serving");
        s
    }

    fn wait_line(&self, want: &str) -> String {
        loop {
            let l = self.lines.recv_timeout(WAIT).unwrap_or_else(|_| panic!("pagesrv never printed {want:?}"));
            if l.contains(want) {
                return l;
            }
        }
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    fn terminate(&mut self) {
        // SAFETY: kill takes plain integers; the pid is our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "{st:?}");
                return;
            }
            if t0.elapsed() > WAIT {
                let _ = self.child.kill();
                panic!("pagesrv did not exit on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn client(sock: &Path, field: PageSizeField) -> FcClient {
    let half = PAGES / 2 * 4096;
    let opts = ClientOpts { regions: vec![(half, 0), (half, half as u64)], field, blocking: false };
    FcClient::connect(sock, &opts).unwrap()
}

const CHILD_ENV: &str = "FORKVM_TEST_FC_CHILD";

/// A stand-in Firecracker in its own process, as a real one is: connects, checks every page
/// against the memory file, says "verified", and exits when told to (or when stdin closes).
#[test]
#[ignore = "re-exec helper: run by its parent test with --ignored"]
fn fc_vm_child() {
    let spec = std::env::var(CHILD_ENV).expect("fc_vm_child runs only as a child of the pagesrv tests");
    let mut it = spec.splitn(3, '|');
    let (sock, field, mem) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    let field = match field {
        "kib" => PageSizeField::KibOnly,
        "both" => PageSizeField::Both,
        "none" => PageSizeField::Absent,
        _ => PageSizeField::PageSizeOnly,
    };
    let img = std::fs::read(mem).unwrap();
    let c = client(Path::new(sock), field);
    c.verify(&img).unwrap();
    println!("verified");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    std::process::exit(0);
}

/// A VM process: verified all its memory once this returns; exits when dropped.
struct Vm(Child);

impl Vm {
    fn start(sock: &Path, field: &str, mem: &Path) -> Vm {
        let mut c = Command::new(std::env::current_exe().unwrap())
            .args(["fc_vm_child", "--exact", "--ignored", "--test-threads=1", "--nocapture"])
            .env(CHILD_ENV, format!("{}|{field}|{}", sock.display(), mem.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(c.stdout.take().unwrap());
        let mut line = String::new();
        while out.read_line(&mut line).unwrap() > 0 && !line.trim().ends_with("verified") {
            line.clear();
        }
        assert!(line.trim().ends_with("verified"), "the VM process did not verify its memory");
        Vm(c)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[test]
fn import_a_firecracker_snapshot_then_serve_it_from_the_store() {
    let d = Dir::new("store");
    let (mem, sib, store) = (d.0.join("mem"), d.0.join("mem2"), d.0.join("store"));
    let img = memfile(&mem, 1, 0);
    let s = store.to_str().unwrap();
    let out = forkvm(&["store", "import", "--firecracker", mem.to_str().unwrap(), "--store", s]);
    let id = out.lines().next().unwrap().to_string();
    assert!(id.starts_with("fc-") && id.len() == 19, "{out}");
    assert!(count_before(&out, "zero (skipped)") >= 128, "{out}");
    assert!(out.contains("compression") && out.contains("dedup"), "{out}");
    // The same file again: found by its content id, nothing written.
    let again = forkvm(&["store", "import", "--firecracker", mem.to_str().unwrap(), "--store", s]);
    assert!(again.contains("already in"), "{again}");
    assert_eq!(again.lines().next(), Some(id.as_str()), "the first line is the image id, as on the first import");
    // A sibling snapshot (2% of pages changed) shares the rest with the first.
    memfile(&sib, 1, 2);
    let out2 = forkvm(&["store", "import", "--firecracker", sib.to_str().unwrap(), "--store", s]);
    let (dedup, new) = (count_before(&out2, "deduplicated"), count_before(&out2, "new chunks"));
    assert!(dedup > 10 * new, "{out2}");

    let sock = d.0.join("fc.sock");
    let mut srv = Server::start(&["--socket", sock.to_str().unwrap(), "--memory", &id, "--store", s]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Two VM processes at once, an old and a current Firecracker; each released when it exits.
    let a = Vm::start(&sock, "kib", &mem);
    let b = Vm::start(&sock, "both", &mem);
    let started = [srv.wait_line("serving"), srv.wait_line("serving")].join("\n");
    assert!(started.contains("handshake: page_size_kib (") && started.contains("page_size + page_size_kib"));
    drop((a, b));
    assert!(srv.wait_line("released").contains("exited"));
    assert!(srv.wait_line("released").contains("exited"));
    // Garbage is refused; the next VM is still served, with the first VM's working set.
    let g = UnixStream::connect(&sock).unwrap();
    pagesrv::fc_wire::send_with_fds(&g, b"[{]", &[]).unwrap();
    assert!(srv.wait_line("refused").contains("bad mappings JSON"));
    let c = Vm::start(&sock, "none", &mem);
    assert!(srv.wait_line("serving").contains("prefetching the working set"));
    drop(c);
    srv.wait_line("released");
    drop(img);
    srv.terminate();
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn serve_a_raw_firecracker_memory_file() {
    let d = Dir::new("raw");
    let mem = d.0.join("mem");
    let img = memfile(&mem, 2, 0);
    let sock = d.0.join("fc.sock");
    let mut srv = Server::start(&["--socket", sock.to_str().unwrap(), "--memory", mem.to_str().unwrap(), "--no-wset"]);
    let c = Vm::start(&sock, "page_size", &mem);
    srv.wait_line("serving 2 regions, 8 MiB");
    drop(c);
    let l = srv.wait_line("released");
    assert!(l.contains("exited") && l.contains(&format!("{PAGES} pages copied")), "{l}");
    assert_eq!(img.len(), PAGES * 4096);
    srv.terminate();
}

#[test]
fn pagesrv_refuses_what_it_cannot_serve() {
    let d = Dir::new("bad");
    let out = Command::new(env!("CARGO_BIN_EXE_forkvm"))
        .args(["pagesrv", "--socket", d.0.join("s").to_str().unwrap(), "--memory", "fc-nope"])
        .args(["--store", d.0.join("nostore").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a memory file"), "{out:?}");
    std::fs::write(d.0.join("odd"), [1u8; 5000]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_forkvm"))
        .args(["store", "import", "--firecracker", d.0.join("odd").to_str().unwrap()])
        .args(["--store", d.0.join("st").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 4 KiB"), "{out:?}");
}
