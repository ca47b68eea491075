//! `forkvm bench agent --vm NAME`: the guest agent of a running VM over its vsock socket —
//! round trip (p50 / p99), read throughput, exec of `true` through the agent vs through the serial
//! shell, and fork → the child's agent answers. The e2e harness runs it on the L2 Linux guest.

use std::time::{Duration, Instant};

use forkvm_api::vm::{self, Client};
use vmm::agent::{AgentAddr, ExecRequest};

use crate::cli::BenchArgs;
use crate::stats::{table, Samples};

const T: Duration = Duration::from_secs(60);

fn percentile(s: &Samples, p: f64) -> f64 {
    let mut v = s.values.clone();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn addr(name: &str) -> Result<AgentAddr, String> {
    Ok(crate::agent_exec::addr(&vm::vm_dir(name)?))
}

/// Connects to a new fork child's agent (its vsock socket listens once the fork answered), pings it.
fn first_answer(child: &str) -> Result<(), String> {
    let a = addr(child)?;
    let deadline = Instant::now() + T;
    loop {
        match a.connect(T).and_then(|mut c| c.ping(1, T)) {
            Ok(()) => return Ok(()),
            // The fork answers once the child's vsock socket listens; a connection can still
            // meet the guest resetting its vsock transport (every clone's does: the guest drops
            // the connections it has when it handles the reset event, one made just before
            // included), so retry, as the VMM's own clone hook does.
            Err(vmm::agent::ClientError::Connect { .. } | vmm::agent::ClientError::Closed)
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

pub fn bench_agent(args: &BenchArgs) -> Result<i32, String> {
    let name = args.vm.as_deref().ok_or("bench agent needs --vm NAME: a running VM whose guest runs forkvm-agent")?;
    let runs = args.runs.max(1);
    let a = addr(name)?;
    let mut c = a.connect(T).map_err(|e| format!("agent of {name}: {e}"))?;
    let mut connect = Samples::new("connect + hello (vsock CONNECT 52)", "ms");
    let mut rtt = Samples::new("round trip host->agent->host (ping)", "ms");
    let mut thr = Samples::new("read 8 MiB from the guest (/dev/zero)", "MB/s");
    let mut exec_agent = Samples::new("exec `true` via the agent", "ms");
    let mut exec_serial = Samples::new("exec `true` via the serial shell", "ms");
    let mut fork_answer = Samples::new("fork -> the child's agent answers", "ms");
    for i in 0..runs {
        let t = Instant::now();
        drop(a.connect(T).map_err(|e| e.to_string())?);
        connect.push_duration(t.elapsed());
        for j in 0..20 {
            let t = Instant::now();
            c.ping((i * 20 + j) as u64, T).map_err(|e| e.to_string())?;
            rtt.push_duration(t.elapsed());
        }
        let t = Instant::now();
        let data = c.read_file("/dev/zero", 8 << 20, T).map_err(|e| e.to_string())?;
        thr.values.push(data.len() as f64 / t.elapsed().as_secs_f64() / 1e6);
        let t = Instant::now();
        let req = ExecRequest {
            argv: vec!["true".into()],
            env: vec![],
            cwd: None,
            stdin: false,
            timeout_ms: 0,
            max_output: 0,
        };
        let exit = c.exec(req, None, T, |_, _| {}).map_err(|e| e.to_string())?;
        if exit.code != Some(0) {
            return Err(format!("`true` through the agent exited {exit:?}"));
        }
        exec_agent.push_duration(t.elapsed());
        let api = Client::for_name(name).map_err(|e| e.to_string())?.timeout(T);
        let t = Instant::now();
        let line = format!("true; echo bench-$(({i}+1000))-done");
        let want = format!("bench-{}-done", i + 1000);
        api.call(vm::Exec { line, wait_for: Some(want), timeout_ms: 60_000 }).map_err(|e| e.to_string())?;
        exec_serial.push_duration(t.elapsed());
    }
    for i in 0..runs.min(3) {
        let prefix = format!("{name}-bench{i}-");
        let api = Client::for_name(name).map_err(|e| e.to_string())?.timeout(T);
        let t = Instant::now();
        api.call(vm::Fork { count: 1, prefix: Some(prefix.clone()) }).map_err(|e| e.to_string())?;
        let child = format!("{prefix}1");
        let answered = first_answer(&child);
        fork_answer.push_duration(t.elapsed());
        let _ = Client::for_name(&child).map(|c| c.timeout(T).call(vm::Stop {}));
        answered.map_err(|e| format!("fork child {child}: {e}"))?;
    }
    let title = format!("forkvm bench agent: VM {name} ({}), {runs} runs", c.agent);
    print!("{}", table(&title, &[connect, rtt.clone(), thr, exec_agent, exec_serial, fork_answer]));
    println!(
        "agent round trip p50 {:.3} ms, p99 {:.3} ms ({} pings)",
        percentile(&rtt, 0.5),
        percentile(&rtt, 0.99),
        rtt.values.len()
    );
    Ok(0)
}
