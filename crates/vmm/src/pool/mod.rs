//! Warm pools: VMs created before any request, waiting for a clone ticket (see
//! [`crate::live_clone`]). [`WarmVm`] is one such VM; a pool member process creates one, listens
//! on its socket and serves the first parent that connects.

mod restore;
mod warm;

pub use restore::restore_into;
pub use warm::{CloneLink, Offer, WarmReport, WarmVm, TICKET_TIMEOUT};

/// A warm member's socket name in the pool directory, `m<MiB>-v<vCPUs>-<pid>.sock`.
pub fn member_socket_name(mem_mib: u64, vcpus: u8, pid: u32) -> String {
    format!("m{mem_mib}-v{vcpus}-{pid}.sock")
}

/// The (MiB, vCPUs, pid) of a [`member_socket_name`]; None for any other name.
pub fn parse_member_socket(name: &str) -> Option<(u64, u8, i32)> {
    let rest = name.strip_prefix('m')?.strip_suffix(".sock")?;
    let mut parts = rest.split('-');
    let (m, v, p) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some((m.parse().ok()?, v.strip_prefix('v')?.parse().ok()?, p.parse().ok()?))
}

/// Whether `pid` is a live warm pool member (a `forkvm pool member` process, not a zombie). A
/// crashed member's socket stays behind, and its pid may belong to another process by now.
pub fn member_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    if stat.rsplit_once(')').is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
        args.windows(2).any(|w| w[0] == b"pool" && w[1] == b"member")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_member_socket_name_parses_back_and_nothing_else_does() {
        use super::{member_socket_name, parse_member_socket};
        assert_eq!(parse_member_socket(&member_socket_name(256, 2, 4321)), Some((256, 2, 4321)));
        for junk in [
            "m256-v2-4321.log",
            "member-4321.log",
            "m256-v2.sock",
            "m256-2-4321.sock",
            "m256-v2-43-21.sock",
            "mx-v2-1.sock",
        ] {
            assert_eq!(parse_member_socket(junk), None, "{junk}");
        }
    }

    #[test]
    fn only_pool_member_processes_are_members() {
        assert!(!super::member_alive(std::process::id() as i32), "a test binary is no member");
        assert!(!super::member_alive(0) && !super::member_alive(-1));
        assert!(!super::member_alive(i32::MAX));
    }
}
