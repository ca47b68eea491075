//! `forkvm demo`: the main job on the embedded default guest, narrated.

use std::time::{Duration, Instant};

use vmm::{MicroVm, VmConfig};

use crate::cli::DemoArgs;

const T: Duration = Duration::from_secs(60);

fn ask(vm: &MicroVm, cmd: &str) -> Result<String, String> {
    let t = Instant::now();
    let answer = vm.command(cmd, T).map_err(|e| e.to_string())?;
    println!("  guest> {cmd:<28} -> {answer}   ({:.2} ms)", t.elapsed().as_secs_f64() * 1e3);
    Ok(answer)
}

pub fn demo(args: DemoArgs) -> Result<i32, String> {
    println!("forkvm demo: booting the embedded test guest ({} MiB, 1 vCPU)", args.mem >> 20);
    let vm = MicroVm::boot(VmConfig { mem_size: args.mem, ..Default::default() }).map_err(|e| e.to_string())?;
    vm.wait_for("forkvm-test-guest ready", T).map_err(|e| e.to_string())?;
    println!("  first serial line after {:.2} ms", vm.started().elapsed().as_secs_f64() * 1e3);
    ask(&vm, "ping")?;
    ask(&vm, "count")?;
    ask(&vm, "touch 0x400000 16 0x5a")?;
    ask(&vm, "sum 0x400000 16")?;
    println!("pausing in the middle of `spin 300000`...");
    let mut cursor = vm.console().cursor();
    vm.send_line("spin 300000").map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(20));
    let p = vm.pause().map_err(|e| e.to_string())?;
    println!("  paused in {:.3} ms; guest is frozen (no answer while paused)", p.as_secs_f64() * 1e3);
    std::thread::sleep(Duration::from_millis(300));
    let early = vm.console().wait_line(&mut cursor, Duration::from_millis(1), |_| true);
    if let Some(l) = early {
        println!("  (the loop had already finished before the pause: {l})");
    }
    let r = vm.resume().map_err(|e| e.to_string())?;
    println!("  resumed in {:.3} ms", r.as_secs_f64() * 1e3);
    let spun = vm.console().wait_line(&mut cursor, T, |_| true).ok_or("no answer after resume")?;
    println!("  guest> spin 300000 -> {spun}   (the loop continued exactly where it stopped)");
    ask(&vm, "count")?;
    ask(&vm, "random")?;
    println!("done.");
    Ok(0)
}
