//! The live-clone rows of `forkvm bench clone` (also alone: `forkvm bench pool`): fork() clone
//! vs live clone into warm pool VMM processes — clone to first answer (p50/p99), the parent's
//! pause per clone, 100 clones of one 2 GiB parent until all answer, and the host memory of 100
//! idle children. Pool members are real processes (`forkvm pool member --stdio`), started and
//! warm before any clone request; the parent runs in this process.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::live_clone::{LiveCloneOptions, LiveParent, Target};
use vmm::{Backing, MicroVm, VmConfig};

use crate::cli::BenchArgs;
use crate::hostmem::mem_available;
use crate::stats::{table, Samples};

const T: Duration = Duration::from_secs(120);
/// Memory the parents hold (written from the host; the PVM guest is too slow to dirty it).
const DIRTY: u64 = 64 << 20;
const MANY: usize = 100;
const MANY_MEM: u64 = 2 << 30;

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A warm pool member with its console on pipes.
struct Member {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    sock: PathBuf,
}

impl Member {
    fn start(mem: u64) -> Result<Member, String> {
        let exe = std::env::current_exe().map_err(s)?;
        let mut child = Command::new(exe)
            .args(["pool", "member", "--stdio", "--no-refill", "--mem", &mem.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start a pool member: {e}"))?;
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        out.read_line(&mut line).map_err(s)?;
        let sock = line.trim_end().strip_prefix("warm ").ok_or(format!("pool member: {line:?}"))?.into();
        Ok(Member { child, stdin, out, sock })
    }

    fn send(&mut self, line: &str) -> Result<(), String> {
        let w = self.stdin.as_mut().ok_or("stdin closed")?;
        w.write_all(format!("{line}\n").as_bytes()).and_then(|()| w.flush()).map_err(s)
    }

    fn wait_line(&mut self, want: &str) -> Result<(), String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.out.read_line(&mut line).map_err(s)? == 0 {
                return Err(format!("the pool clone exited before answering {want:?}"));
            }
            if line.trim_end() == want {
                return Ok(());
            }
        }
    }

    /// The member's `clone-report` line: apply, probe, restore, assemble, resume (ms).
    fn report(&mut self) -> Result<Vec<f64>, String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.out.read_line(&mut line).map_err(s)? == 0 {
                return Err("the pool clone exited before its report".into());
            }
            if let Some(r) = line.trim_end().strip_prefix("clone-report ") {
                return Ok(r.split(' ').filter_map(|v| v.parse().ok()).collect());
            }
        }
    }

    fn stop(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

fn parent(mem: u64, backing: Backing) -> Result<MicroVm, String> {
    let vm = MicroVm::boot(VmConfig { mem_size: mem, backing, ..Default::default() }).map_err(s)?;
    vm.wait_for("forkvm-test-guest ready", T).map_err(s)?;
    if !vm.memory().fill(test_guest::LOW_LIMIT, DIRTY.min(mem - test_guest::LOW_LIMIT), 0x5a) {
        return Err("cannot fill guest memory".into());
    }
    Ok(vm)
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN)
}

fn one(name: &str, unit: &'static str, v: f64) -> Samples {
    let mut r = Samples::new(name, unit);
    r.values.push(v);
    r
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
}

fn no_prefetch() -> LiveCloneOptions {
    LiveCloneOptions { prefetch: false, ..Default::default() }
}

/// Clone to first answer and the parent's pause: fork() vs pool, `runs` times each.
fn latency_rows(mem: u64, runs: usize) -> Result<Vec<Samples>, String> {
    let mut rows = Vec::new();
    {
        let vm = parent(mem, Backing::Anon)?;
        let mut first = Samples::new("fork() clone to first answer", "ms");
        let mut paused = Samples::new("  fork(): parent paused", "ms");
        for _ in 0..runs {
            let t = Instant::now();
            let (mut kids, rep) = vm.fork(1).map_err(s)?;
            kids[0].command("ping", T).map_err(s)?;
            first.push_duration(t.elapsed());
            paused.push_duration(rep.pause + rep.save + rep.fork);
            for k in kids {
                k.stop().map_err(s)?;
            }
        }
        rows.push(one("  fork(): first answer p99", "ms", quantile(&first.values, 0.99)));
        rows.insert(0, first);
        rows.push(paused);
    }
    let vm = parent(mem, Backing::SharedFile)?;
    let live = LiveParent::attach(&vm).map_err(s)?;
    live.arm().map_err(s)?;
    let mut members = (0..runs).map(|_| Member::start(mem)).collect::<Result<Vec<_>, _>>()?;
    let mut first = Samples::new("pool clone to first answer", "ms");
    let mut paused = Samples::new("  pool: parent paused", "ms");
    let mut ready = Samples::new("  pool: clone to child ready", "ms");
    let mut vcpus = Samples::new("    of the pause: parking the vCPUs", "ms");
    let mut save = Samples::new("    of the pause: state capture", "ms");
    let mut wp = Samples::new("    of the pause: write-protect", "ms");
    let mut hs = Samples::new("    of ready: warm VM handshake (before the pause)", "ms");
    let mut serve = Samples::new("    of ready: page server start + ticket sent", "ms");
    let mut wait = Samples::new("    of ready: waiting for the child's ready", "ms");
    let names = [
        "      child: ticket to running",
        "      child: probe of the generation page",
        "      child: state restore (KVM_SET_*)",
        "      child: vCPU threads + watch",
        "      child: resume",
    ];
    let mut child: Vec<Samples> = names.iter().map(|n| Samples::new(n, "ms")).collect();
    let mut answer = Samples::new("  pool: child ready to first answer", "ms");
    for mut m in members.drain(..) {
        let t = Instant::now();
        let conn = UnixStream::connect(&m.sock).map_err(s)?;
        let (kids, rep) = live.clone_into(&vm, vec![Target { conn, name: None }], &no_prefetch()).map_err(s)?;
        let r = m.report()?;
        let ta = Instant::now();
        m.send("ping")?;
        m.wait_line("pong")?;
        first.push_duration(t.elapsed());
        answer.push_duration(ta.elapsed());
        for (row, v) in child.iter_mut().zip(r) {
            row.values.push(v);
        }
        hs.push_duration(rep.handshake);
        serve.push_duration(rep.serve);
        wait.push_duration(rep.wait);
        paused.push_duration(rep.paused);
        ready.push_duration(rep.ready);
        vcpus.push_duration(rep.pause);
        save.push_duration(rep.save);
        wp.push_duration(rep.protect);
        m.stop();
        for k in kids {
            k.wait();
        }
    }
    let p99 = one("  pool: first answer p99", "ms", quantile(&first.values, 0.99));
    rows.extend([first, p99, paused, vcpus, save, wp, ready, hs, serve, wait]);
    rows.extend(child);
    rows.push(answer);
    Ok(rows)
}

/// 100 clones of one 2 GiB parent until all answer, and their host memory.
fn many_rows() -> Result<Vec<Samples>, String> {
    let mut rows = Vec::new();
    {
        let vm = parent(MANY_MEM, Backing::Anon)?;
        let before = mem_available()?;
        let t = Instant::now();
        let (mut kids, rep) = vm.fork(MANY).map_err(s)?;
        for k in &mut kids {
            k.command("ping", T).map_err(s)?;
        }
        let all = t.elapsed();
        let added = before.saturating_sub(mem_available()?);
        rows.push(one(&format!("{MANY} fork() clones until all answer"), "ms", all.as_secs_f64() * 1e3));
        rows.push(one("  fork(): parent paused", "ms", (rep.pause + rep.save + rep.fork).as_secs_f64() * 1e3));
        rows.push(one(&format!("  host memory of {MANY} idle fork() children"), "MiB", mib(added)));
        for k in kids {
            k.stop().map_err(s)?;
        }
    }
    let vm = parent(MANY_MEM, Backing::SharedFile)?;
    let live = LiveParent::attach(&vm).map_err(s)?;
    live.arm().map_err(s)?;
    let m0 = mem_available()?;
    let tw = Instant::now();
    let mut members = (0..MANY).map(|_| Member::start(MANY_MEM)).collect::<Result<Vec<_>, _>>()?;
    let warm_ms = tw.elapsed().as_secs_f64() * 1e3;
    let m1 = mem_available()?;
    let t = Instant::now();
    let targets = members
        .iter()
        .map(|m| UnixStream::connect(&m.sock).map(|conn| Target { conn, name: None }))
        .collect::<Result<Vec<_>, _>>()
        .map_err(s)?;
    let (kids, rep) = live.clone_into(&vm, targets, &no_prefetch()).map_err(s)?;
    for m in &mut members {
        m.send("ping")?;
    }
    for m in &mut members {
        m.wait_line("pong")?;
    }
    let all = t.elapsed();
    let m2 = mem_available()?;
    rows.push(one(&format!("{MANY} pool clones until all answer"), "ms", all.as_secs_f64() * 1e3));
    rows.push(one("  pool: parent paused", "ms", rep.paused.as_secs_f64() * 1e3));
    rows.push(one("    of the pause: write-protect", "ms", rep.protect.as_secs_f64() * 1e3));
    rows.push(one(&format!("  host memory of {MANY} idle pool children"), "MiB", mib(m1.saturating_sub(m2))));
    rows.push(one(&format!("  host memory of the warm pool ({MANY} VMMs)"), "MiB", mib(m0.saturating_sub(m1))));
    rows.push(one(&format!("  starting {MANY} warm VMMs (before any request)"), "ms", warm_ms));
    let st = live.stats();
    rows.push(one("  parent pages preserved (copies held)", "pages", st.pages_held as f64));
    for m in members {
        m.stop();
    }
    for k in kids {
        k.wait();
    }
    Ok(rows)
}

fn raise_fd_limit() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a valid struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        r.rlim_cur = r.rlim_max;
        // SAFETY: setrlimit reads a valid struct we own.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    }
}

/// Prints the live-clone tables.
pub fn bench_pool(args: &BenchArgs) -> Result<i32, String> {
    raise_fd_limit();
    let runs = args.runs.max(2);
    let rows = latency_rows(args.mem, runs)?;
    let title = format!(
        "forkvm bench clone (live clone): test guest {} MiB, {} MiB written from the host, 1 vCPU, {runs} runs; \
         pool children fault pages from the running parent (no prefetch)",
        args.mem >> 20,
        DIRTY >> 20
    );
    print!("{}", table(&title, &rows));
    let rows = many_rows()?;
    let title =
        format!("forkvm bench clone: {MANY} clones of one {} MiB parent ({} MiB written)", MANY_MEM >> 20, DIRTY >> 20);
    print!("{}", table(&title, &rows));
    println!();
    Ok(0)
}
