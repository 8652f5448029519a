//! Sealing a study key to one site's X25519 public key.
//!
//! With sites in their own clusters (docs/sites.md, "The study key") the coordinator relays the
//! TFHE study key between hospitals but must not be able to open it. A site that holds the key
//! seals it to each recipient's X25519 public key; only the recipient's [`SealKeyPair`] opens it.
//!
//! Construction (an ECIES / "sealed box"):
//! - a fresh ephemeral X25519 key per blob, Diffie–Hellman with the recipient's public key
//!   (a low-order, non-contributory result is refused);
//! - HKDF-SHA256 of the shared secret, `info` = [`SEAL_LABEL`] ‖ ephemeral public ‖ recipient
//!   public, gives a 32-byte ChaCha20-Poly1305 key;
//! - the plaintext binds the study id and the key fingerprint with the key file bytes
//!   ([`StudyKey::to_bytes`]); the header (version, ephemeral public, nonce) is the AEAD's
//!   associated data.
//!
//! Blob layout (version 1):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version = 1 |
//! | 32 | ephemeral X25519 public key |
//! | 12 | ChaCha20-Poly1305 nonce |
//! | n + 16 | ciphertext and tag of: study id length (1), study id, fingerprint (16), key file bytes |
//!
//! The seal is anonymous: it proves nothing about who sealed. [`open`] therefore checks the
//! study id and the fingerprint the caller expects, so a blob sealed for another study, or a
//! key other than the one the study's fingerprint names, is refused.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::{StudyKey, os_random};

/// The version byte that opens every sealed blob this build writes.
pub const SEAL_VERSION: u8 = 1;
/// The HKDF `info` label (followed by the ephemeral and recipient public keys).
pub const SEAL_LABEL: &[u8] = b"caduceus-secagg/seal/v1";

const PUBLIC_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + PUBLIC_LEN + NONCE_LEN;

/// The smallest possible sealed blob: the header, a tag and an empty plaintext.
pub const MIN_SEALED_LEN: usize = HEADER_LEN + TAG_LEN;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A site's static X25519 sealing key. Its `Debug` output shows only the public key.
#[derive(Clone)]
pub struct SealKeyPair {
    secret: StaticSecret,
    public: PublicKey,
}

impl std::fmt::Debug for SealKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKeyPair")
            .field("public_key", &hex(self.public.as_bytes()))
            .finish_non_exhaustive()
    }
}

impl SealKeyPair {
    /// A fresh key pair from the operating system's random number generator.
    pub fn generate() -> Result<Self, Error> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        os_random(bytes.as_mut())?;
        Ok(Self::from_array(&bytes))
    }

    fn from_array(bytes: &[u8; 32]) -> Self {
        let secret = StaticSecret::from(*bytes);
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// Loads a secret written by [`to_bytes`](Self::to_bytes) (32 bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let array: &[u8; 32] = bytes.try_into().map_err(|_| {
            Error::BadSealKey(format!("an X25519 secret key is 32 bytes, found {}", bytes.len()))
        })?;
        Ok(Self::from_array(array))
    }

    /// The secret key (secret!), 32 bytes, to store in the site's own Secret.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut bytes = self.secret.to_bytes();
        let out = Zeroizing::new(bytes.to_vec());
        bytes.zeroize();
        out
    }

    /// The public key that others seal to (safe to publish).
    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }
}

/// The AEAD key for one (ephemeral, recipient) pair.
fn aead_key(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(None, shared);
    let mut info = Vec::with_capacity(SEAL_LABEL.len() + 2 * PUBLIC_LEN);
    info.extend_from_slice(SEAL_LABEL);
    info.extend_from_slice(ephemeral);
    info.extend_from_slice(recipient);
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand(&info, okm.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

/// Seals `key` to the site whose X25519 public key is `recipient`: only that site's
/// [`SealKeyPair`] can [`open`] the result. Every call gives a different blob.
pub fn seal(key: &StudyKey, recipient: &[u8; 32]) -> Result<Vec<u8>, Error> {
    let key_bytes = key.to_bytes();
    let id = key.study_id().as_bytes();
    let mut plaintext = Zeroizing::new(Vec::with_capacity(1 + id.len() + 16 + key_bytes.len()));
    plaintext.push(id.len() as u8);
    plaintext.extend_from_slice(id);
    plaintext.extend_from_slice(&key.fingerprint().0);
    plaintext.extend_from_slice(&key_bytes);
    seal_plaintext(&plaintext, recipient)
}

fn seal_plaintext(plaintext: &[u8], recipient: &[u8; 32]) -> Result<Vec<u8>, Error> {
    let mut ephemeral_bytes = Zeroizing::new([0u8; 32]);
    os_random(ephemeral_bytes.as_mut())?;
    let ephemeral = StaticSecret::from(*ephemeral_bytes);
    let ephemeral_public = PublicKey::from(&ephemeral);
    let shared = ephemeral.diffie_hellman(&PublicKey::from(*recipient));
    if !shared.was_contributory() {
        return Err(Error::BadSealKey(format!(
            "recipient public key {} is a low-order point (no shared secret)",
            hex(recipient)
        )));
    }
    let key = aead_key(shared.as_bytes(), ephemeral_public.as_bytes(), recipient);
    let mut nonce = [0u8; NONCE_LEN];
    os_random(&mut nonce)?;

    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.push(SEAL_VERSION);
    out.extend_from_slice(ephemeral_public.as_bytes());
    out.extend_from_slice(&nonce);
    let ciphertext = ChaCha20Poly1305::new(Key::from_slice(key.as_ref()))
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &out,
            },
        )
        .map_err(|_| Error::Malformed("sealed study key too long to encrypt".into()))?;
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

fn parse_fingerprint(s: &str) -> Result<Fingerprint, Error> {
    let bad = || {
        Error::InvalidParams(format!(
            "expected key fingerprint {s:?} is not 32 hexadecimal digits"
        ))
    };
    if s.len() != 32 || !s.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(Fingerprint(out))
}

/// Opens a blob made by [`seal`] with this site's key pair, and checks that it holds the key of
/// study `study_id` whose fingerprint (hex, as [`Fingerprint`]'s `Display` writes it) is
/// `fingerprint`.
///
/// Errors: [`Error::Truncated`] (shorter than a header and tag), [`Error::UnsupportedVersion`],
/// [`Error::SealOpen`] (sealed to another site's key, or altered), [`Error::StudyMismatch`] (the
/// key of another study), [`Error::KeyMismatch`] (another key than the fingerprint names),
/// [`Error::InvalidParams`] (`fingerprint` is not 32 hex digits), [`Error::Malformed`] or
/// [`Error::BadKeyFile`] (an authentic blob with an inconsistent body: a faulty sealer).
pub fn open(sealed: &[u8], me: &SealKeyPair, study_id: &str, fingerprint: &str) -> Result<StudyKey, Error> {
    let expected_fingerprint = parse_fingerprint(fingerprint)?;
    let Some(&version) = sealed.first() else {
        return Err(Error::Truncated {
            field: "version",
            offset: 0,
            needed: 1,
            available: 0,
        });
    };
    if version != SEAL_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "sealed study key",
            found: version,
            supported: SEAL_VERSION,
        });
    }
    for (field, offset, needed) in [
        ("ephemeral public key", 1, PUBLIC_LEN),
        ("nonce", 1 + PUBLIC_LEN, NONCE_LEN),
        ("ciphertext tag", HEADER_LEN, TAG_LEN),
    ] {
        if sealed.len() < offset + needed {
            return Err(Error::Truncated {
                field,
                offset,
                needed,
                available: sealed.len() - offset,
            });
        }
    }
    let (header, ciphertext) = sealed.split_at(HEADER_LEN);
    let ephemeral: [u8; 32] = header[1..1 + PUBLIC_LEN].try_into().expect("32 bytes");
    let nonce = &header[1 + PUBLIC_LEN..];

    let shared = me.secret.diffie_hellman(&PublicKey::from(ephemeral));
    if !shared.was_contributory() {
        return Err(Error::Malformed(
            "sealed study key: the ephemeral public key is a low-order point".into(),
        ));
    }
    let key = aead_key(shared.as_bytes(), &ephemeral, me.public.as_bytes());
    let plaintext = Zeroizing::new(
        ChaCha20Poly1305::new(Key::from_slice(key.as_ref()))
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: header,
                },
            )
            .map_err(|_| Error::SealOpen {
                recipient: hex(me.public.as_bytes()),
                len: sealed.len(),
            })?,
    );

    // The body is authentic from here on: whatever is wrong was sealed so.
    let malformed = |m: &str| Error::Malformed(format!("sealed study key: {m}"));
    let id_len = *plaintext.first().ok_or_else(|| malformed("empty body"))? as usize;
    if plaintext.len() < 1 + id_len + 16 {
        return Err(malformed("body too short for its study id and fingerprint"));
    }
    let bound_id =
        std::str::from_utf8(&plaintext[1..1 + id_len]).map_err(|_| malformed("study id is not UTF-8"))?;
    let bound_fingerprint = Fingerprint(
        plaintext[1 + id_len..1 + id_len + 16]
            .try_into()
            .expect("16 bytes"),
    );
    let key = StudyKey::from_bytes(&plaintext[1 + id_len + 16..])?;
    if key.study_id() != bound_id {
        return Err(malformed(&format!(
            "it names study {bound_id:?} but holds the key of study {:?}",
            key.study_id()
        )));
    }
    if key.fingerprint() != bound_fingerprint {
        return Err(malformed(&format!(
            "it names fingerprint {bound_fingerprint} but holds key {}",
            key.fingerprint()
        )));
    }
    if bound_id != study_id {
        return Err(Error::StudyMismatch {
            expected: study_id.to_owned(),
            found: bound_id.to_owned(),
        });
    }
    if bound_fingerprint != expected_fingerprint {
        return Err(Error::KeyMismatch {
            expected: expected_fingerprint,
            found: bound_fingerprint,
        });
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(key: &StudyKey) -> String {
        key.fingerprint().to_string()
    }

    #[test]
    fn round_trip() {
        let key = StudyKey::generate("study-1").unwrap();
        let site = SealKeyPair::generate().unwrap();
        let sealed = seal(&key, &site.public_key()).unwrap();
        assert_eq!(sealed[0], SEAL_VERSION);
        assert_eq!(
            sealed.len(),
            HEADER_LEN + 1 + "study-1".len() + 16 + key.to_bytes().len() + TAG_LEN
        );
        let opened = open(&sealed, &site, "study-1", &fp(&key)).unwrap();
        assert_eq!(opened.study_id(), "study-1");
        assert_eq!(opened.fingerprint(), key.fingerprint());
        assert_eq!(*opened.to_bytes(), *key.to_bytes());
        // The fingerprint is accepted in either case.
        let upper = fp(&key).to_ascii_uppercase();
        assert!(open(&sealed, &site, "study-1", &upper).is_ok());
        // Each seal uses a fresh ephemeral key and nonce, and the key bytes are not in clear.
        let again = seal(&key, &site.public_key()).unwrap();
        assert_ne!(sealed, again);
        let key_bytes = key.to_bytes();
        assert!(!sealed.windows(32).any(|w| w == &key_bytes[11 + 7..11 + 7 + 32]));
    }

    #[test]
    fn key_pair_bytes_round_trip_and_debug_hides_the_secret() {
        let site = SealKeyPair::generate().unwrap();
        let bytes = site.to_bytes();
        assert_eq!(bytes.len(), 32);
        let again = SealKeyPair::from_bytes(&bytes).unwrap();
        assert_eq!(again.public_key(), site.public_key());
        assert_ne!(SealKeyPair::generate().unwrap().public_key(), site.public_key());
        let debug = format!("{site:?}");
        assert!(debug.contains(&hex(&site.public_key())), "{debug}");
        assert!(!debug.contains(&hex(&bytes)), "{debug}");
        for len in [0, 31, 33, 64] {
            let err = SealKeyPair::from_bytes(&vec![7u8; len]).unwrap_err();
            assert!(matches!(err, Error::BadSealKey(_)), "{len}: {err}");
            assert!(err.to_string().contains(&len.to_string()), "{err}");
        }
    }

    #[test]
    fn wrong_recipient_is_refused() {
        let key = StudyKey::generate("study-1").unwrap();
        let site = SealKeyPair::generate().unwrap();
        let other = SealKeyPair::generate().unwrap();
        let sealed = seal(&key, &site.public_key()).unwrap();
        let err = open(&sealed, &other, "study-1", &fp(&key)).unwrap_err();
        assert!(matches!(err, Error::SealOpen { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&hex(&other.public_key())), "{msg}");
        assert!(msg.contains("another site"), "{msg}");
    }

    #[test]
    fn tampered_blobs_are_refused() {
        let key = StudyKey::generate("study-1").unwrap();
        let site = SealKeyPair::generate().unwrap();
        let sealed = seal(&key, &site.public_key()).unwrap();
        // Ephemeral key, nonce, ciphertext body and tag.
        for at in [1, 20, 33, 40, HEADER_LEN, HEADER_LEN + 100, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 0x01;
            let err = open(&bad, &site, "study-1", &fp(&key)).unwrap_err();
            assert!(matches!(err, Error::SealOpen { .. }), "byte {at}: {err}");
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(matches!(
            open(&longer, &site, "study-1", &fp(&key)),
            Err(Error::SealOpen { .. })
        ));
        // A low-order ephemeral key never gives a shared secret.
        let mut zero = sealed.clone();
        zero[1..33].fill(0);
        let err = open(&zero, &site, "study-1", &fp(&key)).unwrap_err();
        assert!(matches!(err, Error::Malformed(_)), "{err}");
    }

    #[test]
    fn truncated_blobs_are_refused() {
        let key = StudyKey::generate("study-1").unwrap();
        let site = SealKeyPair::generate().unwrap();
        let sealed = seal(&key, &site.public_key()).unwrap();
        for (cut, field) in [
            (0, "version"),
            (1, "ephemeral public key"),
            (32, "ephemeral public key"),
            (33, "nonce"),
            (HEADER_LEN, "ciphertext tag"),
            (MIN_SEALED_LEN - 1, "ciphertext tag"),
        ] {
            let err = open(&sealed[..cut], &site, "study-1", &fp(&key)).unwrap_err();
            assert!(
                matches!(err, Error::Truncated { field: f, .. } if f == field),
                "cut at {cut}: {err}"
            );
        }
        for cut in [MIN_SEALED_LEN, MIN_SEALED_LEN + 10, sealed.len() - 1] {
            let err = open(&sealed[..cut], &site, "study-1", &fp(&key)).unwrap_err();
            assert!(matches!(err, Error::SealOpen { .. }), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn unknown_version_is_refused() {
        let key = StudyKey::generate("study-1").unwrap();
        let site = SealKeyPair::generate().unwrap();
        let mut sealed = seal(&key, &site.public_key()).unwrap();
        sealed[0] = 2;
        let err = open(&sealed, &site, "study-1", &fp(&key)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnsupportedVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("sealed study key"), "{err}");
        assert!(matches!(
            open(&[9], &site, "study-1", &fp(&key)),
            Err(Error::UnsupportedVersion { found: 9, .. })
        ));
    }

    #[test]
    fn another_studys_key_is_refused() {
        let key = StudyKey::generate("study-2").unwrap();
        let site = SealKeyPair::generate().unwrap();
        let sealed = seal(&key, &site.public_key()).unwrap();
        let err = open(&sealed, &site, "study-1", &fp(&key)).unwrap_err();
        assert!(
            matches!(&err, Error::StudyMismatch { expected, found }
                if expected == "study-1" && found == "study-2"),
            "{err}"
        );
    }

    #[test]
    fn fingerprint_mismatch_is_refused() {
        let key = StudyKey::generate("study-1").unwrap();
        let other = StudyKey::generate("study-1").unwrap();
        let site = SealKeyPair::generate().unwrap();
        let sealed = seal(&key, &site.public_key()).unwrap();
        let err = open(&sealed, &site, "study-1", &fp(&other)).unwrap_err();
        assert!(
            matches!(err, Error::KeyMismatch { expected, found }
                if expected == other.fingerprint() && found == key.fingerprint()),
            "{err}"
        );
        for bad in [
            "",
            "zz",
            &"g".repeat(32),
            &fp(&key)[..31],
            "é".repeat(16).as_str(),
        ] {
            let err = open(&sealed, &site, "study-1", bad).unwrap_err();
            assert!(matches!(err, Error::InvalidParams(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn low_order_recipient_is_refused() {
        let key = StudyKey::generate("study-1").unwrap();
        let err = seal(&key, &[0u8; 32]).unwrap_err();
        assert!(matches!(err, Error::BadSealKey(_)), "{err}");
    }

    #[test]
    fn inconsistent_bodies_are_refused() {
        let key = StudyKey::generate("study-1").unwrap();
        let other = StudyKey::generate("study-2").unwrap();
        let site = SealKeyPair::generate().unwrap();
        let body = |id: &str, fingerprint: Fingerprint, key: &StudyKey| {
            let mut p = vec![id.len() as u8];
            p.extend_from_slice(id.as_bytes());
            p.extend_from_slice(&fingerprint.0);
            p.extend_from_slice(&key.to_bytes());
            p
        };
        for (plaintext, what) in [
            (vec![], "empty"),
            (vec![7, b'a'], "too short"),
            (
                body("study-1", key.fingerprint(), &other),
                "holds the key of study",
            ),
            (body("study-1", other.fingerprint(), &key), "names fingerprint"),
        ] {
            let sealed = seal_plaintext(&plaintext, &site.public_key()).unwrap();
            let err = open(&sealed, &site, "study-1", &fp(&key)).unwrap_err();
            assert!(
                matches!(err, Error::Malformed(ref m) if m.contains(what)),
                "{what}: {err}"
            );
        }
        let mut cut = body("study-1", key.fingerprint(), &key);
        cut.pop();
        let sealed = seal_plaintext(&cut, &site.public_key()).unwrap();
        assert!(matches!(
            open(&sealed, &site, "study-1", &fp(&key)),
            Err(Error::BadKeyFile(_))
        ));
    }
}
