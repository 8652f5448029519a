//! The per-study secret key and its file format.
//!
//! One binary GLWE secret key (2048 bits) per study, generated from the operating system's
//! random number generator by a trainer (or by `caduceus simulate` on behalf of the trainers)
//! and handed to the hospitals as a file. The aggregator never receives it: no aggregator-side
//! type in this crate accepts a [`StudyKey`].
//!
//! Key file layout (version 1, little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `CDSK` |
//! | 1 | version = 1 |
//! | 1 | GLWE dimension (1) |
//! | 4 | polynomial size (2048) |
//! | 1 + n | study id length and bytes |
//! | 256 | key bits, packed LSB-first |
//! | 16 | SHA-256 of everything above, truncated (corruption check) |

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
#[cfg(all(test, feature = "crypto"))]
use tfhe::core_crypto::prelude::{GlweSecretKey, PolynomialSize};
use zeroize::{Zeroize, Zeroizing};

use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::params::{GLWE_DIMENSION, POLYNOMIAL_SIZE};
use crate::wire::validate_id;

/// Magic bytes opening a study key file. Tests that must prove a process holds no key material
/// (the aggregator's) can scan its files and environment for them, and for key fingerprints.
pub const KEY_MAGIC: &[u8; 4] = b"CDSK";
const KEY_VERSION: u8 = 1;
const KEY_BITS: usize = GLWE_DIMENSION * POLYNOMIAL_SIZE;
const KEY_BYTES: usize = KEY_BITS / 8;

struct Inner {
    study_id: String,
    /// Binary key coefficients (0 or 1), tfhe layout.
    bits: Vec<u64>,
    fingerprint: Fingerprint,
    mac_key: [u8; 32],
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.bits.zeroize();
        self.mac_key.zeroize();
    }
}

/// The secret key of one study. Cheap to clone (shared, zeroised when the last clone drops).
/// Its `Debug` output never shows key material.
#[derive(Clone)]
pub struct StudyKey {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StudyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StudyKey")
            .field("study_id", &self.inner.study_id)
            .field("fingerprint", &self.inner.fingerprint)
            .finish_non_exhaustive()
    }
}

pub(crate) fn os_random(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::fill(buf).map_err(|e| Error::Randomness(e.to_string()))
}

impl StudyKey {
    /// Generates a fresh uniformly random binary key for `study_id` from the OS RNG.
    pub fn generate(study_id: &str) -> Result<Self, Error> {
        validate_id("study id", study_id)?;
        let mut packed = Zeroizing::new([0u8; KEY_BYTES]);
        os_random(packed.as_mut())?;
        Ok(Self::from_packed(study_id, &packed))
    }

    fn from_packed(study_id: &str, packed: &[u8; KEY_BYTES]) -> Self {
        let bits: Vec<u64> = (0..KEY_BITS)
            .map(|i| u64::from((packed[i / 8] >> (i % 8)) & 1))
            .collect();
        let mut h = Sha256::new();
        h.update(b"caduceus-secagg/key-fingerprint/v1");
        h.update([study_id.len() as u8]);
        h.update(study_id.as_bytes());
        h.update(packed);
        let digest = h.finalize();
        let mut fingerprint = [0u8; 16];
        fingerprint.copy_from_slice(&digest[..16]);
        let mut h = Sha256::new();
        h.update(b"caduceus-secagg/mac-key/v1");
        h.update(packed);
        let mac_key: [u8; 32] = h.finalize().into();
        StudyKey {
            inner: Arc::new(Inner {
                study_id: study_id.to_owned(),
                bits,
                fingerprint: Fingerprint(fingerprint),
                mac_key,
            }),
        }
    }

    /// The study this key belongs to.
    pub fn study_id(&self) -> &str {
        &self.inner.study_id
    }

    /// Public fingerprint of the key (truncated SHA-256 of the study id and key bits). It
    /// reveals nothing about the key and lets the aggregator refuse to mix ciphertexts made
    /// under different keys.
    pub fn fingerprint(&self) -> Fingerprint {
        self.inner.fingerprint
    }

    /// The binary key coefficients (0 or 1).
    #[cfg_attr(not(feature = "crypto"), allow(dead_code))]
    pub(crate) fn bits(&self) -> &[u64] {
        &self.inner.bits
    }

    /// The key as a tfhe entity (tests cross-check against tfhe's own routines).
    #[cfg(all(test, feature = "crypto"))]
    pub(crate) fn glwe_key(&self) -> GlweSecretKey<&[u64]> {
        GlweSecretKey::from_container(&self.inner.bits[..], PolynomialSize(POLYNOMIAL_SIZE))
    }

    /// HMAC-SHA256 over `data` under a key derived from the study key, truncated to 16 bytes.
    #[cfg_attr(not(feature = "crypto"), allow(dead_code))]
    pub(crate) fn tag(&self, data: &[u8]) -> [u8; 16] {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.inner.mac_key).expect("HMAC accepts any key length");
        mac.update(data);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// Constant-time check of a tag made by [`tag`](Self::tag).
    #[cfg_attr(not(feature = "crypto"), allow(dead_code))]
    pub(crate) fn verify_tag(&self, data: &[u8], tag: &[u8; 16]) -> bool {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.inner.mac_key).expect("HMAC accepts any key length");
        mac.update(data);
        mac.verify_truncated_left(tag).is_ok()
    }

    /// Serialises the key (secret!) in the key-file format.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let id = self.inner.study_id.as_bytes();
        let mut out = Zeroizing::new(Vec::with_capacity(4 + 1 + 1 + 4 + 1 + id.len() + KEY_BYTES + 16));
        out.extend_from_slice(KEY_MAGIC);
        out.push(KEY_VERSION);
        out.push(GLWE_DIMENSION as u8);
        out.extend_from_slice(&(POLYNOMIAL_SIZE as u32).to_le_bytes());
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        let mut packed = Zeroizing::new([0u8; KEY_BYTES]);
        for (i, &b) in self.inner.bits.iter().enumerate() {
            packed[i / 8] |= (b as u8) << (i % 8);
        }
        out.extend_from_slice(packed.as_ref());
        let digest = Sha256::digest(&out[..]);
        out.extend_from_slice(&digest[..16]);
        out
    }

    /// Parses a key file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let bad = |m: String| Error::BadKeyFile(m);
        if bytes.len() < 11 {
            return Err(bad(format!("{} bytes is too short", bytes.len())));
        }
        if &bytes[..4] != KEY_MAGIC {
            return Err(bad("bad magic bytes (not a caduceus study key)".into()));
        }
        if bytes[4] != KEY_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "study key",
                found: bytes[4],
                supported: KEY_VERSION,
            });
        }
        let dim = bytes[5] as usize;
        let n = u32::from_le_bytes(bytes[6..10].try_into().expect("4 bytes")) as usize;
        if dim != GLWE_DIMENSION || n != POLYNOMIAL_SIZE {
            return Err(bad(format!(
                "key is for GLWE dimension {dim} and polynomial size {n}, this build uses \
                 {GLWE_DIMENSION} and {POLYNOMIAL_SIZE}"
            )));
        }
        let id_len = bytes[10] as usize;
        let expected = 11 + id_len + KEY_BYTES + 16;
        if bytes.len() != expected {
            return Err(bad(format!(
                "expected {expected} bytes for a study id of {id_len} bytes, found {}",
                bytes.len()
            )));
        }
        let body_end = expected - 16;
        let digest = Sha256::digest(&bytes[..body_end]);
        if digest[..16] != bytes[body_end..] {
            return Err(bad("checksum mismatch (file corrupted or truncated)".into()));
        }
        let study_id =
            std::str::from_utf8(&bytes[11..11 + id_len]).map_err(|_| bad("study id is not UTF-8".into()))?;
        validate_id("study id", study_id)?;
        let mut packed = Zeroizing::new([0u8; KEY_BYTES]);
        packed.copy_from_slice(&bytes[11 + id_len..body_end]);
        Ok(Self::from_packed(study_id, &packed))
    }

    /// Writes the key to a new file readable only by its owner (mode 0600 on Unix). Refuses to
    /// overwrite an existing file.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let io = |source| Error::Io {
            path: path.display().to_string(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(io)?;
        f.write_all(&self.to_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }

    /// Reads a key file written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?);
        Self::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_binary_and_fingerprinted() {
        let a = StudyKey::generate("study-1").unwrap();
        let b = StudyKey::generate("study-1").unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert!(a.inner.bits.iter().all(|&x| x <= 1));
        let ones = a.inner.bits.iter().filter(|&&x| x == 1).count();
        assert!((800..1250).contains(&ones), "{ones} ones out of 2048");
        assert!(!format!("{a:?}").contains("bits"));
    }

    #[test]
    fn file_round_trip_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("study.key");
        let k = StudyKey::generate("study-1").unwrap();
        k.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let l = StudyKey::load(&path).unwrap();
        assert_eq!(l.fingerprint(), k.fingerprint());
        assert_eq!(l.study_id(), "study-1");
        assert_eq!(l.inner.bits, k.inner.bits);
        // No silent overwrite.
        assert!(matches!(k.save(&path), Err(Error::Io { .. })));
    }

    #[test]
    fn corrupted_key_files_are_rejected() {
        let k = StudyKey::generate("s").unwrap();
        let bytes = k.to_bytes();
        for cut in [0, 5, 11, bytes.len() - 1] {
            assert!(StudyKey::from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(StudyKey::from_bytes(&longer).is_err());
        let mut flipped = bytes.to_vec();
        flipped[20] ^= 1;
        assert!(matches!(
            StudyKey::from_bytes(&flipped),
            Err(Error::BadKeyFile(_))
        ));
        let mut version = bytes.to_vec();
        version[4] = 9;
        assert!(matches!(
            StudyKey::from_bytes(&version),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));
    }
}
