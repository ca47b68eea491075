//! `forkvm bench api`: the daemon's API, end to end, against its goals: create from a template
//! to the first exec answer, the daemon's overhead over the per-VM socket, fork, wake from paused
//! and from hibernated, list with 1000 sandboxes in the database, and host memory of 100 idle
//! sandboxes before and after the idle policy ran.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forkvm_api::vm::{Client as VmClient, Exec};
use serde_json::{json, Value};

use crate::cli::BenchArgs;
use crate::daemon_client::Client;
use crate::stats::{table, Samples};

/// A daemon on a private run dir; stopped (with every VMM) on drop.
struct Bench {
    run: PathBuf,
    /// The preview proxy's address.
    preview: Option<String>,
    child: Child,
    c: Client,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for e in std::fs::read_dir(&self.run).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("sb-") {
                let _ = VmClient::at(&e.path(), &name).stop();
            }
        }
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

impl Bench {
    fn start() -> Result<Bench, String> {
        let run = std::env::temp_dir().join(format!("forkvm-bench-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let token = daemon::create_token(&run.join("forkvmd"), "bench")?;
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(["serve", "--policy-tick-ms", "100", "--preview-listen", "127.0.0.1:0"])
            .args(["--preview-guest-ip", "192.168.241.1"])
            .env("FORKVM_RUN_DIR", &run)
            .env_remove("FORKVM_STATE_DIR")
            .env_remove("FORKVM_STORE")
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the daemon: {e}"))?;
        let mut line = String::new();
        let out = child.stdout.take().ok_or("no daemon stdout")?;
        BufReader::new(out).read_line(&mut line).map_err(|e| e.to_string())?;
        if !line.contains("listening") {
            let _ = child.kill();
            return Err(format!("the daemon did not start: {line}"));
        }
        let c = Client::new(run.join("forkvmd.sock"), Some(token))?;
        let preview = line.split_once("previews on ").and_then(|(_, p)| p.split_whitespace().next()).map(String::from);
        Ok(Bench { run, preview, child, c })
    }

    fn post(&self, path: &str, body: Value) -> Result<crate::daemon_client::Answer, String> {
        self.c.call("POST", path, Some(&body))
    }

    fn create(&self, body: Value) -> Result<String, String> {
        let a = self.post("/v1/sandboxes", body)?;
        a.body["id"].as_str().map(String::from).ok_or_else(|| format!("no id in {}", a.body))
    }

    fn exec(&self, id: &str, line: &str) -> Result<crate::daemon_client::Answer, String> {
        self.post(&format!("/v1/sandboxes/{id}/exec"), json!({"line": line}))
    }

    fn delete(&self, id: &str) -> Result<(), String> {
        self.c.call("DELETE", &format!("/v1/sandboxes/{id}"), None).map(|_| ())
    }

    fn list(&self, query: &str) -> Result<Vec<Value>, String> {
        let v = self.c.call("GET", &format!("/v1/sandboxes?{query}"), None)?.body;
        Ok(v["sandboxes"].as_array().cloned().unwrap_or_default())
    }
}

fn wake_ms(a: &crate::daemon_client::Answer) -> f64 {
    a.wake_ms.as_deref().and_then(|w| w.parse().ok()).unwrap_or(f64::NAN)
}

pub fn bench_api(args: &BenchArgs) -> Result<i32, String> {
    let runs = args.runs.max(1);
    let mib = args.mem >> 20;
    let b = Bench::start()?;
    let never = json!({"pause_after": 0, "hibernate_after": 0});
    let base = b.create(json!({"memory_mib": mib, "policy": never}))?;
    b.exec(&base, "count")?;
    let tpl = b.post("/v1/templates", json!({"sandbox": base}))?.body["id"].clone();

    let mut create = Samples::new("create from template -> first exec answer", "ms");
    let mut create_only = Samples::new("  of which POST /v1/sandboxes", "ms");
    for _ in 0..runs {
        let t0 = Instant::now();
        let id = b.create(json!({"template": tpl, "policy": never}))?;
        create_only.push_duration(t0.elapsed());
        b.exec(&id, "ping")?;
        create.push_duration(t0.elapsed());
        b.delete(&id)?;
    }

    let mut via_daemon = Samples::new("exec ping through the daemon", "ms");
    let mut direct = Samples::new("exec ping on the per-VM socket", "ms");
    let vm = VmClient::at(&b.run.join(&base), &base);
    for _ in 0..runs.max(50) {
        let t0 = Instant::now();
        b.exec(&base, "ping")?;
        via_daemon.push_duration(t0.elapsed());
        let t0 = Instant::now();
        vm.call(Exec::new("ping")).map_err(|e| e.to_string())?;
        direct.push_duration(t0.elapsed());
    }

    let mut fork = Samples::new("fork (count 1) through the API", "ms");
    for _ in 0..runs {
        let t0 = Instant::now();
        let a = b.post(&format!("/v1/sandboxes/{base}/fork"), json!({"count": 1}))?;
        fork.push_duration(t0.elapsed());
        if let Some(id) = a.body["sandboxes"][0]["id"].as_str() {
            b.delete(id)?;
        }
    }

    let mut paused = Samples::new("wake from paused -> exec answer", "ms");
    let mut paused_wake = Samples::new("  of which resume (x-forkvm-wake-ms)", "ms");
    let mut hib = Samples::new(&format!("wake from hibernated ({mib} MiB) -> exec answer"), "ms");
    let mut hib_wake = Samples::new("  of which wake (x-forkvm-wake-ms)", "ms");
    for _ in 0..runs {
        b.post(&format!("/v1/sandboxes/{base}/pause"), Value::Null)?;
        let t0 = Instant::now();
        let a = b.exec(&base, "ping")?;
        paused.push_duration(t0.elapsed());
        paused_wake.values.push(wake_ms(&a));
        b.post(&format!("/v1/sandboxes/{base}/hibernate"), Value::Null)?;
        let t0 = Instant::now();
        let a = b.exec(&base, "ping")?;
        hib.push_duration(t0.elapsed());
        hib_wake.values.push(wake_ms(&a));
    }

    let (list1000, list100) = bench_list(&b, runs)?;
    let title = format!("forkvm bench api: daemon on a Unix socket, test guest {mib} MiB, {runs} runs");
    print!(
        "{}",
        table(
            &title,
            &[
                create,
                create_only,
                via_daemon.clone(),
                direct.clone(),
                fork,
                paused,
                paused_wake,
                hib,
                hib_wake,
                list1000,
                list100
            ]
        )
    );
    println!("daemon overhead over the per-VM socket (p50): {:.3} ms\n", via_daemon.median() - direct.median());
    if let Some(proxy) = &b.preview {
        let id = b.create(json!({"memory_mib": mib, "policy": never, "net": true, "privacy": "public"}))?;
        let pause = || b.post(&format!("/v1/sandboxes/{id}/pause"), Value::Null).map(|_| ());
        let hibernate = || b.post(&format!("/v1/sandboxes/{id}/hibernate"), Value::Null).map(|_| ());
        print!("{}", crate::bench_preview::rows(proxy, &id, &b.run.join(&id), runs, &pause, &hibernate)?);
        b.delete(&id)?;
    }
    idle_memory(&b, &tpl)?;
    Ok(0)
}

/// 1000 rows in the database (hibernated, never touched by the policy), then list them.
fn bench_list(b: &Bench, runs: usize) -> Result<(Samples, Samples), String> {
    let db = daemon::db::Db::open(&b.run.join("forkvmd").join("forkvmd.db"))?;
    {
        let c = db.lock();
        let now = 0.0;
        for i in 0..1000 {
            let sb = forkvm_api::v1::Sandbox {
                id: format!("bench-list-{i}"),
                name: format!("bench-list-{i}"),
                workspace: "bench".into(),
                privacy: Default::default(),
                template: None,
                parent: None,
                state: forkvm_api::v1::SandboxState::Hibernated,
                memory_mib: 64,
                vcpus: 1,
                created_at: now,
                last_active_at: now,
                policy: forkvm_api::v1::Policy { pause_after: 0, hibernate_after: 0 },
                pid: None,
            };
            daemon::db::sandboxes::insert(&c, &sb).map_err(|e| e.to_string())?;
        }
    }
    let mut all = Samples::new("list 1000 sandboxes (limit=1000)", "ms");
    let mut page = Samples::new("list first page of 1000 (limit=100)", "ms");
    for _ in 0..runs {
        let t0 = Instant::now();
        let n = b.list("limit=1000")?.len();
        all.push_duration(t0.elapsed());
        if n < 1000 {
            return Err(format!("listed {n} sandboxes, expected at least 1000"));
        }
        let t0 = Instant::now();
        b.list("limit=100")?;
        page.push_duration(t0.elapsed());
    }
    db.lock().execute("DELETE FROM sandboxes WHERE id LIKE 'bench-list-%'", []).map_err(|e| e.to_string())?;
    Ok((all, page))
}

fn vmm_rss_kib(pids: &[u64]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok())
        .filter_map(|s| s.lines().find_map(|l| l.strip_prefix("Rss:")?.split_whitespace().next()?.parse::<u64>().ok()))
        .sum()
}

/// 100 sandboxes from the template, each asked once, then left idle until the policy has paused
/// (1 s) and hibernated (1 s later) them all.
fn idle_memory(b: &Bench, tpl: &Value) -> Result<(), String> {
    const N: usize = 100;
    let avail0 = crate::hostmem::mem_available()?;
    let policy = json!({"pause_after": 1, "hibernate_after": 1});
    let mut ids = Vec::new();
    for _ in 0..N {
        ids.push(b.create(json!({"template": tpl, "policy": policy}))?);
    }
    for id in &ids {
        b.exec(id, "count")?;
    }
    let pids: Vec<u64> = b.list("limit=1000&state=running")?.iter().filter_map(|s| s["pid"].as_u64()).collect();
    let rss_before = vmm_rss_kib(&pids);
    let avail_before = crate::hostmem::mem_available()?;
    let t0 = Instant::now();
    loop {
        let n = b.list("limit=1000&state=hibernated")?.len();
        if n >= N {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            return Err(format!("only {n} of {N} sandboxes hibernated within 300 s"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let settle = t0.elapsed();
    let avail_after = crate::hostmem::mem_available()?;
    let rss_after = vmm_rss_kib(&pids);
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    println!("100 idle sandboxes from the template (policy: pause after 1 s, hibernate 1 s later; all hibernated after {:.1} s)", settle.as_secs_f64());
    println!("{:<44} {:>12} {:>12}", "", "before", "after");
    println!(
        "{:<44} {:>12.1} {:>12.1}",
        "VMM processes resident (MiB)",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    println!(
        "{:<44} {:>12.1} {:>12.1}",
        "host memory used by them (MiB, MemAvailable)",
        mib(avail0.saturating_sub(avail_before)),
        mib(avail0.saturating_sub(avail_after))
    );
    for id in &ids {
        b.delete(id)?;
    }
    Ok(())
}
