//! `forkvm demo`: the main job on the embedded default guest, narrated.

use std::time::{Duration, Instant};

use vmm::{MicroVm, RestoreMode, RestoreOptions, SnapshotKind, VmConfig};

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
    clones(&vm)?;
    println!("done.");
    Ok(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Snapshot and copy-on-write restore, then a fork into two children that are not twins.
fn clones(vm: &MicroVm) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("forkvm-demo-{}", std::process::id()));
    let result = (|| {
        vm.pause().map_err(|e| e.to_string())?;
        let rep = vm.snapshot(&dir, SnapshotKind::Full).map_err(|e| e.to_string())?;
        vm.resume().map_err(|e| e.to_string())?;
        println!(
            "snapshot in {:.2} ms: {} B of state, {} memory pages written to {}",
            ms(rep.duration),
            rep.state_bytes,
            rep.pages_written,
            dir.display()
        );
        let t = Instant::now();
        let restored =
            MicroVm::restore(&dir, RestoreMode::Cow, RestoreOptions::default()).map_err(|e| e.to_string())?;
        println!("restored copy-on-write in {:.2} ms; the clone continues from the snapshot:", ms(t.elapsed()));
        ask(&restored, "count")?;
        ask(&restored, "sum 0x400000 16")?;
        drop(restored);

        let t = Instant::now();
        let (mut kids, rep) = vm.fork(2).map_err(|e| e.to_string())?;
        let first = kids[0].command("ping", T).map_err(|e| e.to_string())?;
        println!(
            "forked into 2 children in {:.2} ms (parent paused {:.3} ms); first child answered {first} after {:.2} ms",
            ms(rep.pause + rep.save + rep.fork),
            ms(rep.pause),
            ms(t.elapsed())
        );
        for (i, k) in kids.iter_mut().enumerate() {
            let g = k.command("gen", T).map_err(|e| e.to_string())?;
            let r = k.command("random", T).map_err(|e| e.to_string())?;
            let w = k.command(&format!("touch 0x400000 1 {}", i + 1), T).map_err(|e| e.to_string())?;
            let s = k.command("sum 0x400000 16", T).map_err(|e| e.to_string())?;
            println!("  child {} (pid {}): {g}, {r}, after {w}: {s}", i + 1, k.pid);
        }
        println!("  parent: (its memory is untouched by the children)");
        ask(vm, "random")?;
        ask(vm, "sum 0x400000 16")?;
        for k in kids {
            k.stop().map_err(|e| e.to_string())?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
