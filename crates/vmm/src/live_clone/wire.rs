//! The clone ticket protocol between a live parent and a warm pool VMM, over one Unix stream:
//!
//! 1. warm VMM -> parent: Firecracker's uffd handshake (mappings JSON + the userfaultfd as
//!    `SCM_RIGHTS`, see `pagesrv::fc_wire`), sent as soon as the connection is accepted;
//! 2. parent -> warm VMM: the ticket, one JSON header line ([`TicketHeader`]) followed by
//!    `state_len` bytes of enveloped `VmState`;
//! 3. warm VMM -> parent: `ready` or `error <why>` (one line);
//! 4. parent -> warm VMM, optionally: `filled` once every data page of the parent is in the child
//!    (it may then drop its userfaultfd and is independent). End of stream before `filled` means
//!    the page server went away: the child stops with an error.
//!
//! Everything read is bounded: header line, state size, reply line.

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Protocol version carried in every ticket.
pub const VERSION: u32 = 1;
/// Longest header or reply line.
pub const MAX_LINE: usize = 64 << 10;
/// Largest state accepted.
pub const MAX_STATE: u64 = 64 << 20;

/// What a clone ticket says besides the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketHeader {
    pub v: u32,
    pub state_len: u64,
    /// The clone's sandbox name (pool VMMs serving the per-VM API claim it).
    pub name: Option<String>,
    /// The parent's name.
    pub parent: Option<String>,
    /// The parent sends `filled` when the child has all its data pages.
    pub prefetch: bool,
    /// Instead of a clone: restore this snapshot directory into the warm VM (no state bytes
    /// follow, and no page server: the VM serves its memory from the image itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
}

fn proto(msg: impl Into<String>) -> Error {
    Error::State(format!("clone ticket: {}", msg.into()))
}

/// Reads one line of at most [`MAX_LINE`] bytes (without its newline); None at end of stream.
pub fn read_line(r: &mut impl BufRead) -> Result<Option<String>, Error> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).map_err(|e| proto(format!("read: {e}")))?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(proto(if buf.len() > MAX_LINE { "line too long" } else { "truncated line" }));
    }
    buf.pop();
    String::from_utf8(buf).map(Some).map_err(|_| proto("line is not UTF-8"))
}

/// Sends a ticket.
pub fn send_ticket(conn: &UnixStream, h: &TicketHeader, state: &[u8]) -> Result<(), Error> {
    let mut line = serde_json::to_vec(h).map_err(|e| proto(e.to_string()))?;
    line.push(b'\n');
    let mut w = conn;
    w.write_all(&line).and_then(|()| w.write_all(state)).map_err(|e| proto(format!("send: {e}")))
}

/// Receives a ticket: its header and state bytes (bounded, version checked).
pub fn recv_ticket(r: &mut impl BufRead) -> Result<(TicketHeader, Vec<u8>), Error> {
    let line = read_line(r)?.ok_or_else(|| proto("the parent closed the connection before sending a ticket"))?;
    let h: TicketHeader = serde_json::from_str(&line).map_err(|e| proto(format!("bad header: {e}")))?;
    if h.v != VERSION {
        return Err(proto(format!("version {} is not supported (this VMM speaks {VERSION})", h.v)));
    }
    if (h.state_len == 0 && h.restore.is_none()) || h.state_len > MAX_STATE {
        return Err(proto(format!("state of {} bytes (at most {MAX_STATE})", h.state_len)));
    }
    let mut state = vec![0u8; h.state_len as usize];
    r.read_exact(&mut state).map_err(|e| proto(format!("state: {e}")))?;
    Ok((h, state))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ticket_round_trip_and_bounds() {
        let (a, b) = UnixStream::pair().unwrap();
        let h = TicketHeader {
            v: VERSION,
            state_len: 3,
            name: Some("c1".into()),
            parent: None,
            prefetch: true,
            restore: None,
        };
        send_ticket(&a, &h, b"abc").unwrap();
        let mut r = std::io::BufReader::new(&b);
        assert_eq!(recv_ticket(&mut r).unwrap(), (h, b"abc".to_vec()));
        for bad in [
            "{\"v\":2,\"state_len\":3,\"name\":null,\"parent\":null,\"prefetch\":false}\n".to_string(),
            format!("{{\"v\":1,\"state_len\":{},\"name\":null,\"parent\":null,\"prefetch\":false}}\n", MAX_STATE + 1),
            "not json\n".into(),
            "x".repeat(MAX_LINE + 10),
        ] {
            let mut r = std::io::BufReader::new(bad.as_bytes());
            assert!(recv_ticket(&mut r).is_err(), "{bad:.60}");
        }
        let mut r = std::io::BufReader::new(&b""[..]);
        assert!(recv_ticket(&mut r).is_err());
    }
}
