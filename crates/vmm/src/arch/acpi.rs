//! ACPI tables for Linux guests (rust-vmm `acpi_tables`): RSDP, XSDT, a hardware-reduced FADT,
//! a DSDT describing the virtio-mmio devices (`LNRO0005`, as Firecracker does on x86), and a
//! MADT with one local APIC per vCPU and the in-kernel IOAPIC. They live in the BIOS area
//! (0xE0000, e820-reserved) where Linux also scans for the RSDP; the zero page points at it.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};

use crate::devices::serial::COM1_BASE;
use crate::devices::virtio::MmioSlot;
use crate::vstate::memory::GuestMem;

/// Where the RSDP goes; the other tables follow it.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// End of the area for the tables (the BIOS area ends at 1 MiB).
const TABLES_END: u64 = 0x10_0000;
const OEM_ID: [u8; 6] = *b"FORKVM";
const OEM_TABLE: [u8; 8] = *b"FORKVMTB";
const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Offset of `acpi_rsdp_addr` in Linux's zero page (boot protocol 2.14).
const ZERO_PAGE_RSDP: u64 = 0x70;
/// IA-PC boot architecture flags: no VGA, no MSI, no PCIe ASPM control.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM: u16 = 1 << 4;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables do not fit below 1 MiB ({0} bytes)")]
    TooBig(u64),
    #[error("guest memory has no room for the ACPI tables at {0:#x}")]
    NoRoom(u64),
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// COM1 (`PNP0501`, ports 0x3f8-0x3ff, IRQ 4): with a hardware-reduced FADT Linux maps no
/// legacy ISA interrupts by itself, so the serial port's GSI must come from the DSDT.
fn com1() -> Vec<u8> {
    let io = aml::IO::new(COM1_BASE, COM1_BASE, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, crate::devices::serial::COM1_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    bytes(&aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]))
}

/// The DSDT: COM1 and one `LNRO0005` device per virtio-mmio slot under `\_SB_`.
fn dsdt(devices: &[MmioSlot]) -> Vec<u8> {
    let mut body = vec![com1()];
    for (i, d) in devices.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, d.base as u32, crate::devices::virtio::mmio::MMIO_WINDOW as u32);
        let irq = aml::Interrupt::new(true, true, false, false, d.irq);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &i);
        let crs = aml::Name::new("_CRS".into(), &crs);
        let name = format!("V{i:03X}");
        let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
        body.push(bytes(&dev));
    }
    let raw: Vec<RawAml> = body.into_iter().map(RawAml).collect();
    let refs: Vec<&dyn Aml> = raw.iter().map(|r| r as &dyn Aml).collect();
    let sb = bytes(&aml::Scope::new("\\_SB_".into(), refs));
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    t.append_slice(&sb);
    t.as_slice().to_vec()
}

/// Already-encoded AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(OEM_ID, OEM_TABLE, 1, LocalInterruptController::Address(LAPIC_ADDR));
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    bytes(&m)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE, 1).dsdt_64(dsdt_addr).flag(Flags::HwReducedAcpi);
    b.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_PCIE_ASPM).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"FORKVMHV").into();
    bytes(&b.finalize())
}

/// Writes the tables for `vcpus` CPUs and the given virtio-mmio devices, and points the zero
/// page at the RSDP. Returns the bytes used.
pub fn write_tables(mem: &GuestMem, vcpus: u8, devices: &[MmioSlot]) -> Result<u64, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let mut at = align(RSDP_ADDR + Rsdp::len() as u64);
    let put = |data: &[u8], at: &mut u64| -> Result<u64, AcpiError> {
        let addr = *at;
        if addr + data.len() as u64 > TABLES_END {
            return Err(AcpiError::TooBig(addr + data.len() as u64 - RSDP_ADDR));
        }
        if !mem.write(addr, data) {
            return Err(AcpiError::NoRoom(addr));
        }
        *at = align(addr + data.len() as u64);
        Ok(addr)
    };
    let dsdt_addr = put(&dsdt(devices), &mut at)?;
    let fadt_addr = put(&fadt(dsdt_addr), &mut at)?;
    let madt_addr = put(&madt(vcpus), &mut at)?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = put(&bytes(&xsdt), &mut at)?;
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    if !mem.write(RSDP_ADDR, &rsdp) {
        return Err(AcpiError::NoRoom(RSDP_ADDR));
    }
    if !mem.write(crate::arch::layout::ZERO_PAGE + ZERO_PAGE_RSDP, &RSDP_ADDR.to_le_bytes()) {
        return Err(AcpiError::NoRoom(crate::arch::layout::ZERO_PAGE));
    }
    Ok(at - RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::Backing;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
    }

    fn table_at(m: &GuestMem, addr: u64) -> Vec<u8> {
        let mut hdr = [0u8; 8];
        assert!(m.read(addr, &mut hdr));
        let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        let mut t = vec![0u8; len];
        assert!(m.read(addr, &mut t));
        t
    }

    #[test]
    fn tables_link_up_with_valid_checksums() {
        let m = GuestMem::new(16 << 20, Backing::Anon, false).unwrap();
        write_tables(&m, 2, &[MmioSlot::nth(0)]).unwrap();
        let mut rsdp = [0u8; 36];
        assert!(m.read(RSDP_ADDR, &mut rsdp));
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(&rsdp));
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table_at(&m, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let sigs: Vec<Vec<u8>> = entries.iter().map(|&a| table_at(&m, a)[..4].to_vec()).collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        let fadt = table_at(&m, entries[0]);
        assert!(checksum_ok(&fadt));
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&m, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
        let madt = table_at(&m, entries[1]);
        assert!(checksum_ok(&madt));
        // Two local APICs (type 0) and one IOAPIC (type 1).
        let mut i = 44;
        let mut kinds = Vec::new();
        while i + 1 < madt.len() {
            kinds.push(madt[i]);
            i += madt[i + 1] as usize;
        }
        assert_eq!(kinds, vec![0, 0, 1]);
        let mut zp = [0u8; 8];
        assert!(m.read(crate::arch::layout::ZERO_PAGE + 0x70, &mut zp));
        assert_eq!(u64::from_le_bytes(zp), RSDP_ADDR);
    }
}
