//! Placeholder for the `forkvm` binary inside the L1 initramfs, used to prove
//! the e2e harness before `forkvm run --kernel` exists.
//!
//! Dependency-free (std + raw libc symbols), build with:
//!   rustc -O -C target-feature=+crt-static --target x86_64-unknown-linux-gnu kvm-probe.rs
//!
//! It opens /dev/kvm, checks KVM_GET_API_VERSION, creates a VM and one vCPU,
//! runs a few real-mode instructions that write "KVM-OK\n" to port 0x3f8 and
//! `hlt`, and reports how long that took. Exit status 0 on success.
//!
//! This is a test tool, not product code: it uses raw ioctls on purpose so
//! that it needs no crates (it is compiled by plain rustc).

use std::ffi::c_void;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

extern "C" {
    fn ioctl(fd: i32, req: u64, ...) -> i32;
    fn mmap(addr: *mut c_void, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut c_void;
}

const KVM_GET_API_VERSION: u64 = 0xAE00;
const KVM_CREATE_VM: u64 = 0xAE01;
const KVM_GET_VCPU_MMAP_SIZE: u64 = 0xAE04;
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_AE46;
const KVM_CREATE_VCPU: u64 = 0xAE41;
const KVM_RUN: u64 = 0xAE80;
const KVM_GET_REGS: u64 = 0x8090_AE81;
const KVM_SET_REGS: u64 = 0x4090_AE82;
const KVM_GET_SREGS: u64 = 0x8138_AE83;
const KVM_SET_SREGS: u64 = 0x4138_AE84;
const KVM_EXIT_IO: u32 = 2;
const KVM_EXIT_HLT: u32 = 5;

const PROT_READ: i32 = 1;
const PROT_WRITE: i32 = 2;
const MAP_SHARED: i32 = 1;
const MAP_PRIVATE: i32 = 2;
const MAP_ANONYMOUS: i32 = 0x20;

#[repr(C)]
struct UserMemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

fn check(what: &str, r: i32) -> Result<i32, String> {
    if r < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(r)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    eprintln!("kvm-probe (forkvm placeholder) args: {:?}", &args[1..]);
    match probe() {
        Ok(()) => println!("KVM-PROBE PASS"),
        Err(e) => {
            println!("KVM-PROBE FAIL: {e}");
            std::process::exit(1);
        }
    }
}

fn probe() -> Result<(), String> {
    let t0 = Instant::now();
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("open /dev/kvm: {e}"))?;
    let kfd = kvm.as_raw_fd();
    // SAFETY: plain ioctl on a valid fd without argument.
    let api = check("KVM_GET_API_VERSION", unsafe { ioctl(kfd, KVM_GET_API_VERSION, 0u64) })?;
    println!("KVM_GET_API_VERSION = {api}");
    if api != 12 {
        return Err(format!("unexpected API version {api}"));
    }
    // SAFETY: plain ioctl; returns a new fd which we take ownership of.
    let vm_raw = check("KVM_CREATE_VM", unsafe { ioctl(kfd, KVM_CREATE_VM, 0u64) })?;
    // SAFETY: vm_raw is a fresh fd we own.
    let vm = unsafe { OwnedFd::from_raw_fd(vm_raw) };
    println!("KVM_CREATE_VM = fd {vm_raw}");

    // 64 KiB of guest memory at GPA 0.
    let mem_size = 0x10000usize;
    // SAFETY: anonymous private mapping, no aliasing.
    let mem = unsafe {
        mmap(std::ptr::null_mut(), mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    };
    if mem as isize == -1 {
        return Err("mmap guest memory failed".into());
    }
    // Real-mode code at 0x1000:
    //   mov dx,0x3f8 ; mov si,msg ; lp: lodsb ; test al,al ; jz done ; out dx,al ; jmp lp ; done: hlt
    let msg = b"KVM-OK\n\0";
    let mut code: Vec<u8> = vec![
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xBE, 0x00, 0x00, // mov si, imm16 (patched)
        0xAC, // lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz +3
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp -8 (to lodsb)
        0xF4, // hlt
    ];
    let msg_addr = 0x1000 + code.len() as u16;
    code[4..6].copy_from_slice(&msg_addr.to_le_bytes());
    code.extend_from_slice(msg);
    // SAFETY: mem is a valid RW mapping of mem_size bytes; 0x1000+len < mem_size.
    unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), (mem as *mut u8).add(0x1000), code.len()) };

    let region = UserMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem_size as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: region is a valid kvm_userspace_memory_region that outlives the call.
    check("KVM_SET_USER_MEMORY_REGION", unsafe {
        ioctl(vm.as_raw_fd(), KVM_SET_USER_MEMORY_REGION, &region as *const UserMemoryRegion)
    })?;
    // SAFETY: plain ioctl returning a new fd.
    let vcpu_raw: RawFd = check("KVM_CREATE_VCPU", unsafe { ioctl(vm.as_raw_fd(), KVM_CREATE_VCPU, 0u64) })?;
    // SAFETY: fresh fd we own.
    let vcpu = unsafe { OwnedFd::from_raw_fd(vcpu_raw) };
    // SAFETY: plain ioctl.
    let run_size = check("KVM_GET_VCPU_MMAP_SIZE", unsafe { ioctl(kfd, KVM_GET_VCPU_MMAP_SIZE, 0u64) })? as usize;
    // SAFETY: mapping the vcpu's kvm_run area as documented.
    let run = unsafe { mmap(std::ptr::null_mut(), run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.as_raw_fd(), 0) };
    if run as isize == -1 {
        return Err("mmap kvm_run failed".into());
    }
    let run = run as *mut u8;

    // kvm_sregs is 312 bytes; cs is the first kvm_segment: base u64 @0, selector u16 @12.
    let mut sregs = [0u8; 312];
    // SAFETY: sregs is large enough for struct kvm_sregs.
    check("KVM_GET_SREGS", unsafe { ioctl(vcpu.as_raw_fd(), KVM_GET_SREGS, sregs.as_mut_ptr()) })?;
    sregs[0..8].copy_from_slice(&0u64.to_le_bytes());
    sregs[12..14].copy_from_slice(&0u16.to_le_bytes());
    // SAFETY: as above.
    check("KVM_SET_SREGS", unsafe { ioctl(vcpu.as_raw_fd(), KVM_SET_SREGS, sregs.as_ptr()) })?;
    // kvm_regs: 18 u64: rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags.
    let mut regs = [0u64; 18];
    // SAFETY: regs is sizeof(struct kvm_regs).
    check("KVM_GET_REGS", unsafe { ioctl(vcpu.as_raw_fd(), KVM_GET_REGS, regs.as_mut_ptr()) })?;
    regs[16] = 0x1000; // rip
    regs[17] = 0x2; // rflags
    // SAFETY: as above.
    check("KVM_SET_REGS", unsafe { ioctl(vcpu.as_raw_fd(), KVM_SET_REGS, regs.as_ptr()) })?;

    let setup = t0.elapsed();
    let t1 = Instant::now();
    let mut out = Vec::new();
    let mut exits = 0u32;
    loop {
        // SAFETY: plain ioctl on a vcpu fd.
        check("KVM_RUN", unsafe { ioctl(vcpu.as_raw_fd(), KVM_RUN, 0u64) })?;
        exits += 1;
        // SAFETY: run points to the kvm_run mapping (run_size >= 4096 bytes).
        let reason = unsafe { (run.add(8) as *const u32).read() };
        match reason {
            KVM_EXIT_IO => {
                // SAFETY: io member of the exit union at offset 32.
                let (port, data_off) = unsafe { ((run.add(34) as *const u16).read(), (run.add(40) as *const u64).read()) };
                // SAFETY: data_offset points into the kvm_run mapping.
                let byte = unsafe { run.add(data_off as usize).read() };
                if port == 0x3f8 {
                    out.push(byte);
                }
            }
            KVM_EXIT_HLT => break,
            other => return Err(format!("unexpected exit reason {other}")),
        }
        if exits > 1000 {
            return Err("too many exits".into());
        }
    }
    let ran = t1.elapsed();
    let text = String::from_utf8_lossy(&out);
    print!("guest serial: {text}");
    println!("setup {:?}, {exits} exits in {:?} ({:?}/exit)", setup, ran, ran / exits);
    if text != "KVM-OK\n" {
        return Err(format!("guest wrote {text:?}"));
    }
    Ok(())
}
