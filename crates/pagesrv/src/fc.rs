//! Firecracker's uffd handshake: what a Firecracker sends, across its versions, and the checks
//! every field gets before a page is served.
//!
//! On `PUT /snapshot/load` with `mem_backend: {backend_type: "Uffd", backend_path: SOCKET}`,
//! Firecracker maps guest memory anonymously, registers it on a userfaultfd, connects to SOCKET
//! and, in one `sendmsg`, sends a JSON array of mappings with the uffd as `SCM_RIGHTS` data
//! (see [`crate::fc_wire`]). The page size has been spelled three ways:
//!
//! | Firecracker | mapping fields |
//! |---|---|
//! | < 1.7 | `base_host_virt_addr`, `size`, `offset` (no page size: 4 KiB) |
//! | 1.7 - 1.11 | ... `page_size_kib`, which carries **bytes** despite its name |
//! | 1.12 and later | ... `page_size` and `page_size_kib`, both bytes |
//! | without the deprecated field | ... `page_size` (bytes) |
//!
//! Everything in the message is untrusted: [`parse`] bounds the JSON and the region count, and
//! [`validate`] checks alignment, sizes, overlaps and that every region lies inside the source.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::server::Region;

/// Largest handshake JSON accepted (Firecracker's is ~100 bytes per region).
pub const MAX_JSON: usize = 256 << 10;
/// Most regions accepted in one handshake.
pub const MAX_REGIONS: usize = 1024;
/// Largest page size accepted (1 GiB hugetlbfs pages).
pub const MAX_PAGE_SIZE: u64 = 1 << 30;

/// One guest memory region as Firecracker describes it (page size normalised to bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Host virtual address of the region in the VMM.
    pub base_host_virt_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the memory snapshot.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: u64,
}

/// How the peer spelled the page size (roughly: which Firecracker it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSizeField {
    /// No page size (Firecracker < 1.7): 4 KiB.
    Absent,
    /// Only `page_size_kib`, in bytes (1.7 - 1.11).
    KibOnly,
    /// `page_size` and `page_size_kib`, both bytes (1.12 and later).
    Both,
    /// Only `page_size`.
    PageSizeOnly,
}

impl std::fmt::Display for PageSizeField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PageSizeField::Absent => "no page size (Firecracker < 1.7)",
            PageSizeField::KibOnly => "page_size_kib (Firecracker 1.7-1.11)",
            PageSizeField::Both => "page_size + page_size_kib (Firecracker 1.12+)",
            PageSizeField::PageSizeOnly => "page_size",
        })
    }
}

/// A parsed handshake message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The regions, in the order sent.
    pub mappings: Vec<GuestRegionUffdMapping>,
    /// How the page size was spelled (by the first region).
    pub field: PageSizeField,
}

#[derive(Deserialize)]
struct RawMapping {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: Option<u64>,
    #[serde(default)]
    page_size_kib: Option<u64>,
}

impl RawMapping {
    fn resolve(&self, i: usize) -> Result<(GuestRegionUffdMapping, PageSizeField)> {
        let (page_size, field) = match (self.page_size, self.page_size_kib) {
            (Some(b), Some(k)) if b != k => {
                return Err(bad(format!("region {i}: page_size {b} and page_size_kib {k} disagree")))
            }
            (Some(b), Some(_)) => (b, PageSizeField::Both),
            (Some(b), None) => (b, PageSizeField::PageSizeOnly),
            (None, Some(k)) => (k, PageSizeField::KibOnly),
            (None, None) => (4096, PageSizeField::Absent),
        };
        if !page_size.is_power_of_two() || !(4096..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(bad(format!("region {i}: page size {page_size} is not a power of two in 4 KiB..=1 GiB")));
        }
        let m = GuestRegionUffdMapping {
            base_host_virt_addr: self.base_host_virt_addr,
            size: self.size,
            offset: self.offset,
            page_size,
        };
        Ok((m, field))
    }
}

fn bad(msg: String) -> Error {
    Error::Protocol(format!("Firecracker handshake: {msg}"))
}

/// Parse a handshake body. An error whose JSON merely ended early is reported by
/// [`is_incomplete`] so that a reader can wait for the rest.
pub fn parse(body: &[u8]) -> Result<Handshake> {
    if body.len() > MAX_JSON {
        return Err(bad(format!("message larger than {MAX_JSON} bytes")));
    }
    let raw: Vec<RawMapping> = serde_json::from_slice(body).map_err(|e| {
        let kind = if e.is_eof() { "incomplete JSON" } else { "bad mappings JSON" };
        bad(format!("{kind}: {e}"))
    })?;
    if raw.is_empty() {
        return Err(bad("no regions".into()));
    }
    if raw.len() > MAX_REGIONS {
        return Err(bad(format!("{} regions, at most {MAX_REGIONS} accepted", raw.len())));
    }
    let mut mappings = Vec::with_capacity(raw.len());
    let mut field = PageSizeField::Absent;
    for (i, r) in raw.iter().enumerate() {
        let (m, f) = r.resolve(i)?;
        if i == 0 {
            field = f;
        } else if f != field {
            return Err(bad(format!("region {i} spells its page size as {f}, region 0 as {field}")));
        }
        mappings.push(m);
    }
    Ok(Handshake { mappings, field })
}

/// True if `e` (from [`parse`]) only says the JSON ended early.
pub fn is_incomplete(e: &Error) -> bool {
    matches!(e, Error::Protocol(m) if m.contains("incomplete JSON"))
}

/// Check the mappings against a source of `source_len` bytes and turn them into regions.
/// Returns the regions and their (common) page size.
pub fn validate(mappings: &[GuestRegionUffdMapping], source_len: u64) -> Result<(Vec<Region>, u64)> {
    let ps = mappings.first().map(|m| m.page_size).ok_or_else(|| bad("no regions".into()))?;
    let mut regions = Vec::with_capacity(mappings.len());
    for (i, m) in mappings.iter().enumerate() {
        let r = format!("region {i} ({:#x}+{:#x} at offset {:#x})", m.base_host_virt_addr, m.size, m.offset);
        if m.page_size != ps {
            return Err(bad(format!("{r}: page size {} differs from region 0's {ps}", m.page_size)));
        }
        if m.size == 0 {
            return Err(bad(format!("{r}: empty")));
        }
        if m.size % ps != 0 {
            return Err(bad(format!("{r}: size is not a multiple of the page size {ps}")));
        }
        if m.base_host_virt_addr % ps != 0 || m.offset % ps != 0 {
            return Err(bad(format!("{r}: address or offset not aligned to the page size {ps}")));
        }
        if m.base_host_virt_addr.checked_add(m.size).is_none_or(|e| e > 1 << 57) {
            return Err(bad(format!("{r}: beyond the user address space")));
        }
        match m.offset.checked_add(m.size) {
            Some(end) if end <= source_len => {}
            _ => return Err(bad(format!("{r}: extends past the end of the memory ({source_len} bytes)"))),
        }
        regions.push(Region { base: m.base_host_virt_addr, len: m.size, offset: m.offset });
    }
    let mut by_addr: Vec<&Region> = regions.iter().collect();
    by_addr.sort_by_key(|r| r.base);
    for w in by_addr.windows(2) {
        if w[0].base + w[0].len > w[1].base {
            return Err(bad(format!(
                "regions {:#x}+{:#x} and {:#x}+{:#x} overlap",
                w[0].base, w[0].len, w[1].base, w[1].len
            )));
        }
    }
    Ok((regions, ps))
}

/// The body a Firecracker sends for `mappings` with the page size spelled as `field`, byte for
/// byte (fields in the order Firecracker serialises them, no spaces).
pub fn body(mappings: &[GuestRegionUffdMapping], field: PageSizeField) -> Vec<u8> {
    let items: Vec<String> = mappings
        .iter()
        .map(|m| {
            let head = format!(
                "{{\"base_host_virt_addr\":{},\"size\":{},\"offset\":{}",
                m.base_host_virt_addr, m.size, m.offset
            );
            let ps = m.page_size;
            match field {
                PageSizeField::Absent => format!("{head}}}"),
                PageSizeField::KibOnly => format!("{head},\"page_size_kib\":{ps}}}"),
                PageSizeField::Both => format!("{head},\"page_size\":{ps},\"page_size_kib\":{ps}}}"),
                PageSizeField::PageSizeOnly => format!("{head},\"page_size\":{ps}}}"),
            }
        })
        .collect();
    format!("[{}]", items.join(",")).into_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Vec<GuestRegionUffdMapping>> {
        super::parse(json.as_bytes()).map(|h| h.mappings)
    }

    /// Every region of one handshake spells its page size the same way (one Firecracker wrote
    /// them all); a mix is refused rather than read with region 0's spelling (found by the
    /// fc_handshake fuzz target: a re-encoded mixed handshake parsed differently).
    #[test]
    fn regions_that_spell_the_page_size_differently_are_refused() {
        let mixed = r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0},{"base_host_virt_addr":8192,"size":8192,"offset":4096,"page_size":8192}]"#;
        let e = parse(mixed).unwrap_err().to_string();
        assert!(e.contains("region 1") && e.contains("spells"), "{e}");
        let same = r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096},{"base_host_virt_addr":8192,"size":8192,"offset":4096,"page_size":4096}]"#;
        assert_eq!(parse(same).unwrap().len(), 2);
    }

    /// Firecracker 1.7-1.11 send only `page_size_kib`, and it has always carried bytes.
    #[test]
    fn page_size_kib_carries_bytes() {
        let old = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}]"#;
        assert_eq!(parse(old).unwrap()[0].page_size, 4096);
        let huge = r#"[{"base_host_virt_addr":2097152,"size":2097152,"offset":0,"page_size_kib":2097152}]"#;
        assert_eq!(parse(huge).unwrap()[0].page_size, 2 << 20);
    }

    /// Releases before 1.7 send no page size at all: 4 KiB.
    #[test]
    fn no_page_size_means_4k() {
        let none = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0}]"#;
        assert_eq!(parse(none).unwrap()[0].page_size, 4096);
    }

    #[test]
    fn both_fields_in_bytes() {
        let both = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        let new = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096}]"#;
        assert_eq!(parse(both).unwrap(), parse(new).unwrap());
        assert_eq!(parse(new).unwrap()[0].page_size, 4096);
    }
}
