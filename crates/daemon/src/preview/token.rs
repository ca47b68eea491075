//! Preview tokens: `HMAC-SHA256(daemon secret, "preview:" + sandbox id)`, so a token opens the
//! previews of exactly one sandbox and nothing is stored per token. The secret lives in
//! `<state dir>/preview.key` (mode 0600, made once); deleting it revokes every preview token.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Clone)]
pub struct Minter {
    key: [u8; 32],
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Minter(..)")
    }
}

impl Minter {
    /// Loads the secret at `path`, creating it (private, never following a symlink) if missing.
    pub fn load_or_create(path: &Path) -> Result<Minter, String> {
        let open = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path);
        let mut key = [0u8; 32];
        match open {
            Ok(mut f) => {
                let mut hex_key = String::new();
                Read::by_ref(&mut f)
                    .take(128)
                    .read_to_string(&mut hex_key)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                hex::decode_to_slice(hex_key.trim(), &mut key)
                    .map_err(|e| format!("{}: not a preview key ({e}); delete it to make a new one", path.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                hex::decode_to_slice(crate::util::random_hex(32), &mut key).map_err(|e| e.to_string())?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                writeln!(f, "{}", hex::encode(key)).map_err(|e| format!("{}: {e}", path.display()))?;
                f.sync_all().map_err(|e| format!("{}: {e}", path.display()))?;
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
        Ok(Minter { key })
    }

    fn mac(&self, sandbox: &str) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        m.update(b"preview:");
        m.update(sandbox.as_bytes());
        m
    }

    /// The preview token of `sandbox`.
    pub fn mint(&self, sandbox: &str) -> String {
        format!("fkp_{}", hex::encode(self.mac(sandbox).finalize().into_bytes()))
    }

    /// Whether `token` is `sandbox`'s preview token (constant-time compare).
    pub fn verify(&self, sandbox: &str, token: &str) -> bool {
        let Some(hex_part) = token.strip_prefix("fkp_") else { return false };
        let mut raw = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut raw).is_ok() && self.mac(sandbox).verify_slice(&raw).is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tokens_open_one_sandbox_and_survive_a_reload() {
        let dir = std::env::temp_dir().join(format!("forkvm-preview-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("preview.key");
        let m = Minter::load_or_create(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let t = m.mint("sb-1");
        assert!(m.verify("sb-1", &t));
        assert!(!m.verify("sb-2", &t));
        assert!(!m.verify("sb-1", "fkp_00"));
        assert!(!m.verify("sb-1", &t.replace("fkp_", "fkv_")));
        assert!(Minter::load_or_create(&path).unwrap().verify("sb-1", &t), "same key after a restart");
        std::fs::write(&path, "junk").unwrap();
        assert!(Minter::load_or_create(&path).unwrap_err().contains("not a preview key"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
