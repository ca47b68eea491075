//! Authentication of the cross-host page protocol: a shared secret, a mutual challenge–response
//! with blake3 keyed hashes, and per-page MACs under a per-session key.
//!
//! Both sides hold the same secret file. Its bytes are turned into a 32-byte key `K` with
//! `blake3::derive_key`. Each side sends a fresh 32-byte nonce; the server proves it knows `K`
//! with `keyed_hash(K, "server" | version | client nonce | server nonce)`, the client with
//! `keyed_hash(K, "client" | version | server nonce | client nonce)`, and both derive the session
//! key `S = keyed_hash(K, "session" | version | client nonce | server nonce)`. Every page on the
//! wire carries `keyed_hash(S, offset | kind | data)`, checked before the page is placed; the
//! state blob carries `keyed_hash(S, "state" | bytes)`. A page from another session, another
//! offset, a corrupted or forged page therefore fails its check.
//!
//! There is no encryption (no TLS): page contents cross the network in the clear. Use a private
//! network or an encrypted tunnel (WireGuard, IPsec) between hosts that must not see each other's
//! guest memory.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

const CONTEXT: &str = "forkvm pagesrv tcp 2026-11 shared secret";
/// Shortest secret accepted.
pub const MIN_SECRET: usize = 16;
const MAX_SECRET: u64 = 4096;

/// The key derived from the shared secret.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A key from secret bytes (at least [`MIN_SECRET`]).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() < MIN_SECRET {
            return Err(Error::InvalidArgument(format!(
                "the shared secret is {} bytes; use at least {MIN_SECRET} random bytes",
                b.len()
            )));
        }
        Ok(Secret(blake3::derive_key(CONTEXT, b)))
    }

    /// Reads a secret file: a regular file (not a symlink), not readable by group or others,
    /// of at most 4 KiB (e.g. `head -c 32 /dev/urandom > F; chmod 600 F`).
    pub fn load(path: &Path) -> Result<Self> {
        let what = |e: std::io::Error| Error::InvalidArgument(format!("secret file {}: {e}", path.display()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(what)?;
        let md = f.metadata().map_err(what)?;
        if !md.is_file() {
            return Err(Error::InvalidArgument(format!("secret file {} is not a regular file", path.display())));
        }
        if md.mode() & 0o077 != 0 {
            return Err(Error::InvalidArgument(format!(
                "secret file {} is accessible by group or others (mode {:o}); chmod 600 it",
                path.display(),
                md.mode() & 0o777
            )));
        }
        let mut b = Vec::new();
        f.take(MAX_SECRET + 1).read_to_end(&mut b).map_err(what)?;
        if b.len() as u64 > MAX_SECRET {
            return Err(Error::InvalidArgument(format!("secret file {} is over 4 KiB", path.display())));
        }
        Self::from_bytes(&b)
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        parts.iter().for_each(|p| {
            h.update(p);
        });
        *h.finalize().as_bytes()
    }

    /// The server's proof.
    pub fn server_proof(&self, version: u16, cn: &[u8; 32], sn: &[u8; 32]) -> [u8; 32] {
        self.mac(&[b"server", &version.to_le_bytes(), cn, sn])
    }

    /// The client's proof.
    pub fn client_proof(&self, version: u16, cn: &[u8; 32], sn: &[u8; 32]) -> [u8; 32] {
        self.mac(&[b"client", &version.to_le_bytes(), sn, cn])
    }

    /// The session key.
    pub fn session(&self, version: u16, cn: &[u8; 32], sn: &[u8; 32]) -> SessionKey {
        SessionKey(Secret(self.mac(&[b"session", &version.to_le_bytes(), cn, sn])))
    }
}

/// The per-connection key of the page MACs.
#[derive(Clone, Debug)]
pub struct SessionKey(Secret);

impl SessionKey {
    /// MAC of the page at `offset` (`data` empty for a zero page).
    pub fn page(&self, offset: u64, kind: u8, data: &[u8]) -> [u8; 32] {
        self.0.mac(&[&offset.to_le_bytes(), &[kind], data])
    }
    /// MAC of the state blob.
    pub fn state(&self, data: &[u8]) -> [u8; 32] {
        self.0.mac(&[b"state", data])
    }
}

/// Constant-time comparison of two MACs.
pub fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from(*a) == blake3::Hash::from(*b)
}

/// 32 fresh random bytes.
pub fn nonce() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    let mut got = 0;
    while got < n.len() {
        // SAFETY: getrandom writes at most n.len() - got bytes into our buffer from `got`.
        let r = unsafe { libc::getrandom(n[got..].as_mut_ptr().cast(), n.len() - got, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(crate::error::sys("getrandom")(e));
        }
        got += r as usize;
    }
    Ok(n)
}

/// True if the page is all zero.
pub fn is_zero_page(p: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { p.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}
