//! Warm pools: VMs created before any request, waiting for a clone ticket (see
//! [`crate::live_clone`]). [`WarmVm`] is one such VM; a pool member process creates one, listens
//! on its socket and serves the first parent that connects.

mod restore;
mod warm;

pub use restore::restore_into;
pub use warm::{CloneLink, Offer, WarmReport, WarmVm, TICKET_TIMEOUT};

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
    fn only_pool_member_processes_are_members() {
        assert!(!super::member_alive(std::process::id() as i32), "a test binary is no member");
        assert!(!super::member_alive(0) && !super::member_alive(-1));
        assert!(!super::member_alive(i32::MAX));
    }
}
