//! gRPC protocol between hospital trainers and the study aggregator.
//!
//! The single source is `proto/caduceus/fl/v1/federation.proto`, compiled at build time (protox +
//! tonic-prost-build). Besides the generated types (re-exported at the crate root), this crate holds the
//! helpers both sides use to stream flat `f32` vectors in chunks ([`f32_chunks`]) and to reassemble and
//! validate them ([`VectorAssembler`]), the mTLS [`FederationClient`] the trainer uses, and the
//! conversions of evaluation counts to and from the fairness crate ([`convert`]).

/// Generated protobuf messages and tonic client/server code for `caduceus.fl.v1`.
// `UpdateChunk.kind` holds the header (with its evaluation counts) or a data chunk; boxing the header
// would change the generated API for a one-per-stream message.
#[allow(clippy::large_enum_variant)]
pub mod v1 {
    tonic::include_proto!("caduceus.fl.v1");
}

pub mod client;
pub mod convert;

pub use client::{ClientError, ClientTls, FederationClient, GlobalModel, SecureGlobalModel};
pub use convert::{Evaluation, MAX_EVALUATION_COUNT, evaluation_from_proto, evaluation_to_proto};
pub use tonic::Code;
pub use v1::*;

use sha2::{Digest, Sha256};

/// Elements per data chunk: 256 Ki `f32` = 1 MiB of payload, far below gRPC's 4 MiB message default.
pub const DEFAULT_CHUNK_ELEMS: usize = 256 * 1024;

/// Largest decoded gRPC message either side accepts. Chunks are 1 MiB; headers are small.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Fewest elements a data chunk may carry, except the last chunk of a vector: a receiver refuses a
/// vector of n elements sent in more than [`max_chunks`]`(n)` chunks.
pub const MIN_CHUNK_ELEMS: u64 = 1024;

/// Most chunks a vector of `elements` elements may arrive in: max(1, ⌈elements / 1024⌉).
pub fn max_chunks(elements: u64) -> u64 {
    elements.div_ceil(MIN_CHUNK_ELEMS).max(1)
}

/// A flat vector could not be reassembled from its chunks.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChunkError {
    #[error("chunk for vector {got:?} arrived while assembling {expected:?}")]
    WrongVector { expected: Vector, got: Vector },
    #[error("chunk of {vector:?} starts at element {got}, expected {expected} (chunks must be contiguous)")]
    OutOfOrder { vector: Vector, expected: u64, got: u64 },
    #[error("chunk of {vector:?} has {bytes} payload bytes, not a multiple of 4 (f32 little-endian)")]
    Misaligned { vector: Vector, bytes: usize },
    #[error("{vector:?} has more than the declared {expected} elements")]
    TooLong { vector: Vector, expected: u64 },
    #[error("{vector:?} ended after {got} of {expected} elements")]
    TooShort { vector: Vector, expected: u64, got: u64 },
    #[error("{vector:?} element {index} is {value} (NaN and infinities are not accepted)")]
    NotFinite { vector: Vector, index: u64, value: f32 },
    #[error(
        "data chunk {index} of {vector:?} (at element {offset}) carries no data; empty chunks are refused"
    )]
    Empty { vector: Vector, index: u64, offset: u64 },
    #[error(
        "{vector:?} arrives in more than {max} chunks (chunks carry at least {MIN_CHUNK_ELEMS} elements)"
    )]
    TooManyChunks { vector: Vector, max: u64 },
    #[error("chunk of {vector:?} is encrypted, but this vector is plaintext f32")]
    Encrypted { vector: Vector },
}

/// Splits `values` into [`DataChunk`]s of at most `chunk_elems` elements (little-endian `f32`).
pub fn f32_chunks(
    vector: Vector,
    values: &[f32],
    chunk_elems: usize,
) -> impl Iterator<Item = DataChunk> + '_ {
    let chunk_elems = chunk_elems.max(1);
    values
        .chunks(chunk_elems)
        .enumerate()
        .map(move |(i, chunk)| f32_chunk(vector, i * chunk_elems, chunk))
}

/// One [`DataChunk`] holding `values`, which start at element `offset` of their vector.
pub fn f32_chunk(vector: Vector, offset: usize, values: &[f32]) -> DataChunk {
    DataChunk {
        vector: vector as i32,
        offset: offset as u64,
        payload: Some(data_chunk::Payload::F32Le(encode_f32_le(values).into())),
    }
}

/// Little-endian bytes of `values`.
pub fn encode_f32_le(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Hex SHA-256 of the little-endian bytes of `values` (what [`ModelHeader::parameters_sha256`] holds).
pub fn sha256_f32(values: &[f32]) -> String {
    let mut hasher = Sha256::new();
    for block in values.chunks(16 * 1024) {
        hasher.update(encode_f32_le(block));
    }
    hex::encode(hasher.finalize())
}

/// Reassembles one flat `f32` vector of a declared length from contiguous chunks, refusing NaN/Inf,
/// empty chunks, and more than [`max_chunks`] chunks.
#[derive(Debug)]
pub struct VectorAssembler {
    vector: Vector,
    expected: u64,
    values: Vec<f32>,
    chunks: u64,
    max_chunks: u64,
}

impl VectorAssembler {
    /// Starts assembling `vector` of exactly `expected` elements, in at most
    /// [`max_chunks`]`(expected)` chunks.
    pub fn new(vector: Vector, expected: u64) -> Self {
        Self::with_max_chunks(vector, expected, max_chunks(expected))
    }

    /// Same, accepting up to `max_chunks` chunks (each still non-empty), e.g. `expected` for
    /// senders that use small chunks.
    pub fn with_max_chunks(vector: Vector, expected: u64, max_chunks: u64) -> Self {
        Self {
            vector,
            expected,
            // Cap the up-front reservation so a lying header cannot make us allocate huge buffers.
            values: Vec::with_capacity(expected.min(1 << 26) as usize),
            chunks: 0,
            max_chunks,
        }
    }

    /// Chunks accepted so far.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// The vector being assembled.
    pub fn vector(&self) -> Vector {
        self.vector
    }

    /// Elements received so far.
    pub fn len(&self) -> u64 {
        self.values.len() as u64
    }

    /// Whether nothing has been received yet.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Appends one chunk after checking vector, order, chunk count, emptiness, alignment, length and
    /// finiteness.
    pub fn push(&mut self, chunk: &DataChunk) -> Result<(), ChunkError> {
        let got_vector = Vector::try_from(chunk.vector).unwrap_or(Vector::Unspecified);
        if got_vector != self.vector {
            return Err(ChunkError::WrongVector {
                expected: self.vector,
                got: got_vector,
            });
        }
        let have = self.values.len() as u64;
        if chunk.offset != have {
            return Err(ChunkError::OutOfOrder {
                vector: self.vector,
                expected: have,
                got: chunk.offset,
            });
        }
        let bytes: &[u8] = match &chunk.payload {
            Some(data_chunk::Payload::F32Le(b)) => b,
            Some(data_chunk::Payload::Encrypted(_)) => {
                return Err(ChunkError::Encrypted { vector: self.vector });
            }
            None => &[],
        };
        if bytes.is_empty() {
            return Err(ChunkError::Empty {
                vector: self.vector,
                index: self.chunks,
                offset: chunk.offset,
            });
        }
        if self.chunks >= self.max_chunks {
            return Err(ChunkError::TooManyChunks {
                vector: self.vector,
                max: self.max_chunks,
            });
        }
        if !bytes.len().is_multiple_of(4) {
            return Err(ChunkError::Misaligned {
                vector: self.vector,
                bytes: bytes.len(),
            });
        }
        let n = (bytes.len() / 4) as u64;
        if have + n > self.expected {
            return Err(ChunkError::TooLong {
                vector: self.vector,
                expected: self.expected,
            });
        }
        self.values.reserve(n as usize);
        for (i, b) in bytes.chunks_exact(4).enumerate() {
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if !v.is_finite() {
                return Err(ChunkError::NotFinite {
                    vector: self.vector,
                    index: have + i as u64,
                    value: v,
                });
            }
            self.values.push(v);
        }
        self.chunks += 1;
        Ok(())
    }

    /// Whether all declared elements have arrived.
    pub fn is_complete(&self) -> bool {
        self.values.len() as u64 == self.expected
    }

    /// The assembled vector, or an error when elements are missing.
    pub fn finish(self) -> Result<Vec<f32>, ChunkError> {
        if !self.is_complete() {
            return Err(ChunkError::TooShort {
                vector: self.vector,
                expected: self.expected,
                got: self.values.len() as u64,
            });
        }
        Ok(self.values)
    }
}

impl Strategy {
    /// Lower-case name used on command lines and in results (`fedavg`, `fedprox`, `scaffold`, `fairfed`).
    pub fn cli_name(self) -> &'static str {
        match self {
            Strategy::Unspecified => "unspecified",
            Strategy::Fedavg => "fedavg",
            Strategy::Fedprox => "fedprox",
            Strategy::Scaffold => "scaffold",
            Strategy::Fairfed => "fairfed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(values: &[f32], chunk: usize) -> Result<Vec<f32>, ChunkError> {
        let n = values.len() as u64;
        let mut a = VectorAssembler::with_max_chunks(Vector::Parameters, n, n);
        for c in f32_chunks(Vector::Parameters, values, chunk) {
            a.push(&c)?;
        }
        a.finish()
    }

    #[test]
    fn chunks_roundtrip_exactly() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25 - 7.0).collect();
        for chunk in [1, 7, 256, 1000, 5000] {
            assert_eq!(roundtrip(&values, chunk).unwrap(), values);
        }
        let n = f32_chunks(Vector::Parameters, &values, 256).count();
        assert_eq!(n, 4);
    }

    #[test]
    fn refuses_nan_and_inf_with_index() {
        let mut values = vec![1.0f32; 10];
        values[7] = f32::NAN;
        let err = roundtrip(&values, 3).unwrap_err();
        assert!(matches!(err, ChunkError::NotFinite { index: 7, .. }), "{err}");
        values[7] = f32::NEG_INFINITY;
        assert!(matches!(
            roundtrip(&values, 3).unwrap_err(),
            ChunkError::NotFinite { index: 7, .. }
        ));
    }

    #[test]
    fn refuses_gaps_overruns_and_short_vectors() {
        let values = vec![0.5f32; 10];
        let chunks: Vec<_> = f32_chunks(Vector::Parameters, &values, 4).collect();
        let small = |vector, n| VectorAssembler::with_max_chunks(vector, n, n);
        let mut a = small(Vector::Parameters, 10);
        a.push(&chunks[0]).unwrap();
        assert!(matches!(
            a.push(&chunks[2]).unwrap_err(),
            ChunkError::OutOfOrder {
                expected: 4,
                got: 8,
                ..
            }
        ));
        let mut a = small(Vector::Parameters, 6);
        a.push(&chunks[0]).unwrap();
        assert!(matches!(
            a.push(&chunks[1]).unwrap_err(),
            ChunkError::TooLong { .. }
        ));
        let mut a = small(Vector::Parameters, 10);
        a.push(&chunks[0]).unwrap();
        assert!(matches!(
            a.finish().unwrap_err(),
            ChunkError::TooShort {
                expected: 10,
                got: 4,
                ..
            }
        ));
        let mut a = small(Vector::Control, 10);
        assert!(matches!(
            a.push(&chunks[0]).unwrap_err(),
            ChunkError::WrongVector { .. }
        ));
        let bad = DataChunk {
            vector: Vector::Parameters as i32,
            offset: 0,
            payload: Some(data_chunk::Payload::F32Le(vec![0u8; 5].into())),
        };
        let mut a = VectorAssembler::new(Vector::Parameters, 10);
        assert!(matches!(
            a.push(&bad).unwrap_err(),
            ChunkError::Misaligned { bytes: 5, .. }
        ));
    }

    #[test]
    fn empty_chunks_and_too_many_chunks_are_refused() {
        let empty = |offset| DataChunk {
            vector: Vector::Parameters as i32,
            offset,
            payload: Some(data_chunk::Payload::F32Le(bytes::Bytes::new())),
        };
        let mut a = VectorAssembler::new(Vector::Parameters, 3000);
        let e = a.push(&empty(0)).unwrap_err();
        assert!(
            matches!(
                e,
                ChunkError::Empty {
                    index: 0,
                    offset: 0,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("no data"), "{e}");
        let none = DataChunk {
            payload: None,
            ..empty(0)
        };
        assert!(matches!(a.push(&none).unwrap_err(), ChunkError::Empty { .. }));
        // 3000 elements may come in at most 3 chunks.
        assert_eq!(max_chunks(3000), 3);
        assert_eq!(max_chunks(0), 1);
        let values = vec![0.25f32; 3000];
        let mut a = VectorAssembler::new(Vector::Parameters, 3000);
        let mut err = None;
        for c in f32_chunks(Vector::Parameters, &values, 1000) {
            a.push(&c).unwrap();
        }
        assert_eq!(a.chunks(), 3);
        assert_eq!(a.finish().unwrap(), values);
        let mut a = VectorAssembler::new(Vector::Parameters, 3000);
        for c in f32_chunks(Vector::Parameters, &values, 700) {
            if let Err(e) = a.push(&c) {
                err = Some(e);
                break;
            }
        }
        assert!(
            matches!(err, Some(ChunkError::TooManyChunks { max: 3, .. })),
            "{err:?}"
        );
    }

    #[test]
    fn sha_is_stable() {
        assert_eq!(
            sha256_f32(&[]),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_ne!(sha256_f32(&[1.0]), sha256_f32(&[2.0]));
    }
}
