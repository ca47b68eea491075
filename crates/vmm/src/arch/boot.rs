//! Loading a kernel (ELF64 such as vmlinux or our test guest, or a bzImage), an initrd and the
//! command line, and writing Linux's zero page with the e820 map.

use std::io::Cursor;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::GuestAddress;

use crate::arch::layout::*;
use crate::vstate::memory::GuestMem;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const CAN_USE_HEAP: u8 = 0x80;

/// Errors loading what the guest boots. Those about a file ([`BootError::file`]) read as the
/// rest of "cannot load kernel PATH: ...", which only the caller can say (it read the file).
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the image is empty")]
    EmptyKernel,
    #[error("not a bzImage or ELF vmlinux ({0})")]
    BadKernel(String),
    #[error("does not fit in guest memory ({0})")]
    KernelTooBig(String),
    #[error("{size} bytes do not fit in guest memory below {limit:#x} after the kernel")]
    InitrdTooBig { size: u64, limit: u64 },
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write boot data into guest memory: {0}")]
    Memory(String),
}

/// The file a [`BootError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootFile {
    Kernel,
    Initrd,
}

impl BootError {
    /// The file the error is about (None: the command line or guest memory).
    pub fn file(&self) -> Option<BootFile> {
        match self {
            BootError::EmptyKernel | BootError::BadKernel(_) | BootError::KernelTooBig(_) => Some(BootFile::Kernel),
            BootError::InitrdTooBig { .. } => Some(BootFile::Initrd),
            BootError::Cmdline(_) | BootError::Memory(_) => None,
        }
    }
}

/// What the vCPU needs to enter the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub entry: u64,
    pub kernel_end: u64,
}

/// Loads `kernel` (ELF64 or bzImage bytes), an optional initrd and the command line; writes the
/// zero page. Returns the 64-bit entry point.
pub fn load(mem: &GuestMem, kernel: &[u8], initrd: Option<&[u8]>, cmdline: &str) -> Result<Loaded, BootError> {
    if kernel.is_empty() {
        return Err(BootError::EmptyKernel);
    }
    let view = mem.view().map_err(|e| BootError::Memory(e.to_string()))?;
    let is_elf = kernel.starts_with(b"\x7fELF");
    let (entry, kernel_end, setup_header) = if is_elf {
        let r = Elf::load(&view, None, &mut Cursor::new(kernel), Some(GuestAddress(HIMEM_START)))
            .map_err(|e| classify(e, "ELF"))?;
        (r.kernel_load.0, r.kernel_end, None)
    } else {
        let r = BzImage::load(
            &view,
            Some(GuestAddress(HIMEM_START)),
            &mut Cursor::new(kernel),
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(|e| classify(e, "bzImage"))?;
        // The 64-bit entry of a bzImage is 0x200 past where its protected-mode part is loaded.
        (r.kernel_load.0 + 0x200, r.kernel_end, r.setup_header)
    };
    if kernel_end > mem.size().min(MMIO_GAP_START) {
        return Err(BootError::KernelTooBig(format!("ends at {kernel_end:#x}")));
    }

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(&view, GuestAddress(CMDLINE_ADDR), &cl).map_err(|e| BootError::Cmdline(e.to_string()))?;

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = (cmdline.len() + 1) as u32;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some(initrd) = initrd {
        let low_end = mem.size().min(MMIO_GAP_START);
        let limit = if params.hdr.initrd_addr_max != 0 {
            low_end.min(u64::from(params.hdr.initrd_addr_max) + 1)
        } else {
            low_end
        };
        let size = initrd.len() as u64;
        let start = limit.checked_sub(size).map(|s| s & !0xfff).filter(|&s| s >= kernel_end);
        let start = start.ok_or(BootError::InitrdTooBig { size, limit })?;
        if !mem.write(start, initrd) {
            return Err(BootError::InitrdTooBig { size, limit });
        }
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let mut e820 = vec![(0, EBDA_START, E820_RAM), (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)];
    for (base, len) in crate::vstate::memory::ram_ranges(mem.size()) {
        if base == 0 {
            e820.push((HIMEM_START, len - HIMEM_START, E820_RAM));
        } else {
            e820.push((base, len, E820_RAM));
        }
    }
    for (i, (addr, size, ty)) in e820.into_iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr, size, r#type: ty };
        params.e820_entries = (i + 1) as u8;
    }
    LinuxBootConfigurator::write_bootparams::<GuestMemoryView>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        &view,
    )
    .map_err(|e| BootError::Memory(e.to_string()))?;
    Ok(Loaded { entry, kernel_end })
}

type GuestMemoryView = vm_memory::GuestMemoryMmap;

/// linux-loader's error as one phrase: its Display nests "Kernel Loader: failed to load bzImage
/// kernel image: Kernel Loader: Invalid bzImage"; we say "no ELF header; bzImage: invalid bzImage".
fn classify(e: linux_loader::loader::Error, kind: &str) -> BootError {
    use linux_loader::loader::Error as L;
    let inner = match &e {
        L::Bzimage(i) => i.to_string(),
        L::Elf(i) => i.to_string(),
        other => other.to_string(),
    };
    let inner = inner.trim_start_matches("Kernel Loader: ");
    let mut chars = inner.chars();
    let inner: String = chars.next().map(|c| c.to_lowercase().chain(chars).collect()).unwrap_or_default();
    let msg = if kind == "ELF" { format!("ELF: {inner}") } else { format!("no ELF header; {kind}: {inner}") };
    if msg.contains("memory") || msg.contains("Memory") || msg.contains("read kernel image") {
        BootError::KernelTooBig(msg)
    } else {
        BootError::BadKernel(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::Backing;

    #[test]
    fn garbage_kernel_is_rejected() {
        let m = GuestMem::new(16 << 20, Backing::Anon, false).unwrap();
        assert!(matches!(load(&m, &[], None, ""), Err(BootError::EmptyKernel)));
        let err = load(&m, &[0x55; 8192], None, "").unwrap_err();
        assert!(matches!(err, BootError::BadKernel(_)), "{err}");
        assert_eq!(err.to_string(), "not a bzImage or ELF vmlinux (no ELF header; bzImage: invalid bzImage)");
        let mut elf = b"\x7fELF".to_vec();
        elf.resize(100, 0);
        assert!(matches!(load(&m, &elf, None, ""), Err(BootError::BadKernel(_))));
    }

    #[test]
    fn test_guest_loads_with_e820() {
        let m = GuestMem::new(16 << 20, Backing::Anon, false).unwrap();
        let l = load(&m, test_guest::ELF, Some(&[1, 2, 3]), "console=ttyS0").unwrap();
        assert_eq!(l.entry, 0x100000);
        let mut n = [0u8; 1];
        m.read(ZERO_PAGE + 0x1e8, &mut n);
        assert_eq!(n[0], 3);
        let mut c = [0u8; 13];
        m.read(CMDLINE_ADDR, &mut c);
        assert_eq!(&c, b"console=ttyS0");
    }

    #[test]
    fn initrd_too_big_is_rejected() {
        let m = GuestMem::new(4 << 20, Backing::Anon, false).unwrap();
        let big = vec![0u8; 8 << 20];
        assert!(matches!(load(&m, test_guest::ELF, Some(&big), ""), Err(BootError::InitrdTooBig { .. })));
    }
}
