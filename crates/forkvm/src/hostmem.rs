//! Host memory figures from /proc, for the benchmarks.

/// MemAvailable of the host, in bytes.
pub fn mem_available() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("cannot read /proc/meminfo: {e}"))?;
    kib_field(&text, "MemAvailable:").map(|k| k * 1024).ok_or_else(|| "no MemAvailable in /proc/meminfo".into())
}

/// Private (clean + dirty) memory of a process in KiB: what it holds that no one else maps.
pub fn private_kib(pid: i32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let clean = kib_field(&text, "Private_Clean:").unwrap_or(0);
    let dirty = kib_field(&text, "Private_Dirty:").unwrap_or(0);
    Ok(clean + dirty)
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kib_fields() {
        let t = "MemTotal:  100 kB\nMemAvailable:   42 kB\nPrivate_Dirty: 7 kB\n";
        assert_eq!(kib_field(t, "MemAvailable:"), Some(42));
        assert_eq!(kib_field(t, "Private_Dirty:"), Some(7));
        assert_eq!(kib_field(t, "Nope:"), None);
        assert!(mem_available().unwrap() > 0);
        assert!(private_kib(std::process::id() as i32).unwrap() > 0);
    }
}
