//! `forkvm bench`: benchmark tables.

use std::time::Duration;

use vmm::{MicroVm, VmConfig};

use crate::cli::{BenchArgs, BenchKind};
use crate::stats::{table, Samples};

const T: Duration = Duration::from_secs(60);

pub fn bench(args: BenchArgs) -> Result<i32, String> {
    match args.kind {
        BenchKind::Vm => bench_vm(&args),
        BenchKind::Disk => crate::bench_disk::bench_disk(&args),
        BenchKind::Clone => crate::bench_clone::bench_clone(&args),
        BenchKind::Store => crate::bench_store::bench_store(&args),
        BenchKind::StoreFc => crate::bench_store::bench_store_fc(&args),
        BenchKind::Agent => crate::bench_agent::bench_agent(&args),
        BenchKind::Api => crate::bench_api::bench_api(&args),
        BenchKind::Xhost => crate::bench_xhost::bench_xhost(&args),
        BenchKind::Pool => crate::bench_pool::bench_pool(&args),
        BenchKind::Restore => crate::bench_restore::bench_restore(&args),
    }
}

fn bench_vm(args: &BenchArgs) -> Result<i32, String> {
    let mut boot = Samples::new("boot to first serial line", "ms");
    let mut pause = Samples::new("pause (all vCPUs parked)", "ms");
    let mut resume = Samples::new("resume", "ms");
    let mut rtt = Samples::new("serial round trip (ping)", "ms");
    for _ in 0..args.runs.max(1) {
        let vm = MicroVm::boot(VmConfig { mem_size: args.mem, ..Default::default() }).map_err(|e| e.to_string())?;
        vm.wait_for("forkvm-test-guest ready", T).map_err(|e| e.to_string())?;
        boot.push_duration(vm.started().elapsed());
        let t = std::time::Instant::now();
        vm.command("ping", T).map_err(|e| e.to_string())?;
        rtt.push_duration(t.elapsed());
        vm.send_line("spin 100000").map_err(|e| e.to_string())?;
        pause.push_duration(vm.pause().map_err(|e| e.to_string())?);
        resume.push_duration(vm.resume().map_err(|e| e.to_string())?);
    }
    let title = format!("forkvm bench vm: test guest, {} MiB, 1 vCPU, {} runs", args.mem >> 20, args.runs);
    print!("{}", table(&title, &[boot, rtt, pause, resume]));
    Ok(0)
}
