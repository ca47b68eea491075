//! The envelope every forkvm state file is wrapped in:
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic: `FORKVM` + 2-byte kind (e.g. `ST` for VM state) |
//! | 4 | format version, little endian |
//! | 4 | reserved, zero |
//! | 8 | payload length, little endian |
//! | 32 | blake3 of the payload |
//! | n | payload (JSON) |
//!
//! A file that is short, long, of another kind or version, or whose checksum does not match is
//! rejected before a byte of the payload is interpreted.

use serde::de::DeserializeOwned;
use serde::Serialize;

const HEADER: usize = 56;
/// Largest payload accepted (state files are small; memory lives elsewhere).
pub const MAX_PAYLOAD: u64 = 256 << 20;

/// Why a state file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("file is truncated: {len} bytes, the header alone needs {HEADER}")]
    ShortHeader { len: usize },
    #[error("not a forkvm {expected} file (bad magic)")]
    BadMagic { expected: &'static str },
    #[error("format version {found} is not supported (this forkvm reads version {supported})")]
    Version { found: u32, supported: u32 },
    #[error("payload length {0} is implausible")]
    BadLength(u64),
    #[error("file is truncated or has trailing bytes: header says {expected} payload bytes, file has {actual}")]
    LengthMismatch { expected: u64, actual: u64 },
    #[error("checksum mismatch: the file is corrupted")]
    Checksum,
    #[error("payload is not valid: {0}")]
    Payload(String),
}

/// A kind of enveloped file.
#[derive(Clone, Copy, Debug)]
pub struct Kind {
    pub tag: [u8; 2],
    pub name: &'static str,
    pub version: u32,
}

fn magic(kind: &Kind) -> [u8; 8] {
    let mut m = *b"FORKVM__";
    m[6..].copy_from_slice(&kind.tag);
    m
}

/// Serializes `value` into an enveloped file image.
pub fn encode<T: Serialize>(kind: &Kind, value: &T) -> Result<Vec<u8>, EnvelopeError> {
    let payload = serde_json::to_vec(value).map_err(|e| EnvelopeError::Payload(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&magic(kind));
    out.extend_from_slice(&kind.version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&payload).as_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[at..at + N]);
    a
}

/// Checks and opens an enveloped file image.
pub fn decode<T: DeserializeOwned>(kind: &Kind, bytes: &[u8]) -> Result<T, EnvelopeError> {
    if bytes.len() < HEADER {
        return Err(EnvelopeError::ShortHeader { len: bytes.len() });
    }
    if field::<8>(bytes, 0) != magic(kind) {
        return Err(EnvelopeError::BadMagic { expected: kind.name });
    }
    let version = u32::from_le_bytes(field(bytes, 8));
    if version != kind.version {
        return Err(EnvelopeError::Version { found: version, supported: kind.version });
    }
    let len = u64::from_le_bytes(field(bytes, 16));
    if len > MAX_PAYLOAD {
        return Err(EnvelopeError::BadLength(len));
    }
    let actual = (bytes.len() - HEADER) as u64;
    if actual != len {
        return Err(EnvelopeError::LengthMismatch { expected: len, actual });
    }
    let payload = &bytes[HEADER..];
    if blake3::hash(payload).as_bytes() != &field::<32>(bytes, 24) {
        return Err(EnvelopeError::Checksum);
    }
    serde_json::from_slice(payload).map_err(|e| EnvelopeError::Payload(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Kind = Kind { tag: *b"TT", name: "test", version: 3 };

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let v = vec![1u32, 2, 3];
        let bytes = encode(&K, &v).unwrap();
        assert_eq!(decode::<Vec<u32>>(&K, &bytes).unwrap(), v);
        for cut in [0, 10, HEADER, bytes.len() - 1] {
            assert!(decode::<Vec<u32>>(&K, &bytes[..cut]).is_err(), "truncated at {cut}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            if (12..16).contains(&i) {
                continue; // reserved bytes are not checked
            }
            assert!(decode::<Vec<u32>>(&K, &b).is_err(), "flip at byte {i} not detected");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode::<Vec<u32>>(&K, &longer), Err(EnvelopeError::LengthMismatch { .. })));
        let other = Kind { version: 4, ..K };
        assert!(matches!(decode::<Vec<u32>>(&other, &bytes), Err(EnvelopeError::Version { .. })));
    }
}
