//! Errors of the secure-aggregation codec.

use crate::fingerprint::Fingerprint;

/// Everything that can go wrong while encoding, aggregating or decoding.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The study parameters are inconsistent or leave no room for messages.
    #[error("invalid secure-aggregation parameters: {0}")]
    InvalidParams(String),

    /// A study or hospital identifier is empty, too long or uses disallowed characters.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidId {
        what: &'static str,
        value: String,
        reason: &'static str,
    },

    /// An update value is NaN or infinite.
    #[error("update value at index {index} is not finite ({value})")]
    NonFinite { index: usize, value: f32 },

    /// A quantised value is outside `[-M, M]`.
    #[error("quantised value at index {index} is {value}, outside ±{max}")]
    QuantisedOutOfRange { index: usize, value: i64, max: i64 },

    /// The update is empty or too long.
    #[error("invalid update length {len}: {reason}")]
    BadLength { len: usize, reason: &'static str },

    /// The message does not start with the expected magic bytes.
    #[error("not a caduceus secure-aggregation {expected} (bad magic bytes)")]
    BadMagic { expected: &'static str },

    /// The message was written by an unknown format version.
    #[error("unsupported {what} format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        what: &'static str,
        found: u8,
        supported: u8,
    },

    /// The message is of another kind than the one expected (e.g. an aggregate given to the
    /// aggregator).
    #[error("wrong message kind: expected {expected}, found kind byte {found}")]
    WrongKind { expected: &'static str, found: u8 },

    /// The message ends before a field.
    #[error(
        "message truncated: field `{field}` needs {needed} bytes at offset {offset}, \
         only {available} left"
    )]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },

    /// Bytes follow the end of the body.
    #[error("message has {extra} unexpected trailing bytes after the body")]
    TrailingBytes { extra: usize },

    /// A header field has an impossible value.
    #[error("malformed message: {0}")]
    Malformed(String),

    /// The message was made under other parameters.
    #[error(
        "parameter fingerprint mismatch: message was made under parameters {found}, \
         expected {expected}"
    )]
    ParamsMismatch {
        expected: Fingerprint,
        found: Fingerprint,
    },

    /// The message was made under another study key.
    #[error("key fingerprint mismatch: message was made under key {found}, expected {expected}")]
    KeyMismatch {
        expected: Fingerprint,
        found: Fingerprint,
    },

    /// The message belongs to another study.
    #[error("study mismatch: message is for study {found:?}, expected {expected:?}")]
    StudyMismatch { expected: String, found: String },

    /// The message belongs to another round.
    #[error("round mismatch: message is for round {found}, expected round {expected}")]
    RoundMismatch { expected: u64, found: u64 },

    /// The authentication tag of a contribution does not verify under this study key: the
    /// header or seed was altered, or it was made under another key.
    #[error(
        "authentication tag of hospital {hospital:?} (chunk {chunk}) does not verify under this \
         study key"
    )]
    BadTag { hospital: String, chunk: u32 },

    /// The chunk layout (count, vector length) differs between messages of one round.
    #[error("inconsistent chunk layout: {0}")]
    InconsistentLayout(String),

    /// A chunk names another hospital than the authenticated sender.
    #[error("chunk claims to come from hospital {claimed:?} but the sender is {authenticated:?}")]
    SenderMismatch { claimed: String, authenticated: String },

    /// A hospital sent the same chunk twice.
    #[error("hospital {hospital:?} already contributed chunk {chunk}")]
    DuplicateContribution { hospital: String, chunk: u32 },

    /// A weight violates the study bounds.
    #[error("invalid weight for hospital {hospital:?}: {reason}")]
    BadWeight { hospital: String, reason: String },

    /// More hospitals than the bounds allow.
    #[error("too many hospitals: the parameters allow at most {max}")]
    TooManyHospitals { max: u32 },

    /// Some chunk lacks a contribution, or no contribution arrived at all.
    #[error("incomplete aggregate: {0}")]
    Incomplete(String),

    /// The aggregate does not satisfy the decrypting hospital's acceptance policy.
    #[error("aggregate rejected by policy: {0}")]
    PolicyViolation(String),

    /// A key file is malformed.
    #[error("invalid study key file: {0}")]
    BadKeyFile(String),

    /// Reading or writing a key file failed.
    #[error("key file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// An X25519 sealing key is malformed or unusable.
    #[error("invalid sealing key: {0}")]
    BadSealKey(String),

    /// A sealed study key does not open (its AEAD tag does not verify) with this site's sealing
    /// key: it was sealed to another site's key, or altered or cut in transit.
    #[error(
        "sealed study key ({len} bytes) does not open with this site's sealing key (public key \
         {recipient}): it was sealed to another site's key, or altered or truncated in transit"
    )]
    SealOpen { recipient: String, len: usize },

    /// The operating system's random number generator failed.
    #[error("operating-system randomness unavailable: {0}")]
    Randomness(String),
}
