//! KVM tier: boots the embedded test guest on this machine's /dev/kvm and talks to it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! These tests need /dev/kvm; without it they fail and say how to get it.

use std::time::Duration;

use vmm::{Backing, ExitReason, MicroVm, VmConfig};

const T: Duration = Duration::from_secs(60);

fn boot(mem: u64, vcpus: u8, backing: Backing) -> MicroVm {
    let cfg = VmConfig { mem_size: mem, vcpus, backing, ..Default::default() };
    let vm = MicroVm::boot(cfg).unwrap_or_else(|e| {
        panic!("cannot boot the test guest: {e}\n(these tests need a usable /dev/kvm: run on a Linux host with KVM, as root or in the kvm group)")
    });
    vm.wait_for("forkvm-test-guest ready", T).expect("guest ready line");
    vm
}

#[test]
fn ping_touch_sum() {
    let vm = boot(64 << 20, 1, Backing::Anon);
    assert_eq!(vm.command("ping", T).unwrap(), "pong");
    assert_eq!(vm.command("touch 0x400000 4 0xab", T).unwrap(), "touched 4");
    let expect = test_guest::sum_bytes(&vec![0xab; 4 * 4096]);
    assert_eq!(vm.command("sum 0x400000 4", T).unwrap(), format!("sum {expect:016x}"));
    // The host sees what the guest wrote.
    let mut b = [0u8; 1];
    assert!(vm.memory().read(0x400000 + 3 * 4096 + 17, &mut b));
    assert_eq!(b[0], 0xab);
    assert_eq!(vm.command("mem", T).unwrap(), format!("mem {}", 64 << 20));
    assert_eq!(vm.command("touch 0x1000 1 1", T).unwrap(), "err range");
    assert_eq!(vm.command("bogus", T).unwrap(), "err unknown command");
}

/// The guest spins in a loop that only the host ends (by writing a flag into guest memory), so
/// the pause lands mid-loop on any host, however fast: no sleeps, no timing assumptions.
#[test]
fn count_survives_pause_mid_loop() {
    let vm = boot(32 << 20, 2, Backing::SharedFile);
    assert_eq!(vm.command("count", T).unwrap(), "count 1");
    let flag = 0x400000;
    let mut cursor = vm.console().cursor();
    vm.send_line(&format!("wait {flag:#x}")).unwrap();
    assert_eq!(vm.console().wait_line(&mut cursor, T, |_| true).unwrap(), "waiting");
    let p = vm.pause().unwrap();
    assert!(vm.is_paused());
    let before = vm.save_state().unwrap();
    // The guest cannot see the flag until it runs again.
    assert!(vm.memory().write(flag, &1u64.to_le_bytes()));
    let after = vm.save_state().unwrap();
    let regs = |s: &vmm::persist::state::VmState| serde_json::to_string(&s.vcpus[0].regs).unwrap();
    assert_eq!(regs(&before), regs(&after), "a paused vCPU must not move");
    assert_eq!(
        vm.console().wait_line(&mut cursor, std::time::Duration::ZERO, |_| true),
        None,
        "no answer while paused"
    );
    let r = vm.resume().unwrap();
    eprintln!("pause {p:?} resume {r:?}");
    let line = vm.console().wait_line(&mut cursor, T, |_| true).unwrap();
    assert!(line.starts_with("waited "), "{line}");
    assert_eq!(vm.command("count", T).unwrap(), "count 2");
}

#[test]
fn halt_exits_cleanly() {
    let vm = boot(16 << 20, 1, Backing::Anon);
    vm.send_line("halt").unwrap();
    assert_eq!(vm.wait_exit(Some(T)), Some(ExitReason::GuestReset));
}
