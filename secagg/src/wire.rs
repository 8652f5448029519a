//! Versioned, self-describing, length-checked wire format.
//!
//! Two message kinds share one header. All integers are little-endian.
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `CDSA` |
//! | 1 | version = 1 |
//! | 1 | kind: 1 = hospital chunk, 2 = aggregate chunk |
//! | 2 | reserved, must be 0 |
//! | 16 | parameter fingerprint ([`SecAggParams::fingerprint`]) |
//! | 16 | key fingerprint ([`StudyKey::fingerprint`](crate::StudyKey::fingerprint)) |
//! | 8 | round |
//! | 4 | chunk index |
//! | 4 | chunk count |
//! | 8 | total values of the whole update vector |
//! | 1 + n | study id (length byte, bytes) |
//!
//! A **hospital chunk** continues with one contribution — hospital id (length byte, bytes),
//! 16-byte mask seed, 16-byte tag — then a 4-byte body length and the body. An **aggregate
//! chunk** continues with a 2-byte contributor count, then per contributor: hospital id,
//! 4-byte weight, seed, tag; then the body length and the body.
//!
//! The body holds, for each GLWE ciphertext of the chunk, the 2048 body coefficients rounded
//! to their top 48 bits, 6 bytes each. The mask never travels: it is re-expanded from the seed.
//!
//! The tag is HMAC-SHA256 (truncated to 16 bytes) under a key derived from the study key, over
//! the version, both fingerprints, the study id, round, chunk position, vector length, hospital
//! id and seed. Hospitals verify it before decrypting an aggregate, so a relabelled or replayed
//! contribution (another round, chunk or hospital) is refused. The aggregator cannot check tags.
//!
//! Decoding checks, in order: magic, version, kind, reserved bytes, parameter fingerprint, the
//! chunk layout implied by the parameters, every length, and that nothing follows the body.

use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::params::{
    BODY_BYTES_PER_VALUE, MAX_HOSPITALS_LIMIT, MAX_TOTAL_VALUES, POLYNOMIAL_SIZE, SecAggParams,
};

/// Magic bytes opening every message.
pub const MAGIC: &[u8; 4] = b"CDSA";
/// Wire format version written and read by this build.
pub const WIRE_VERSION: u8 = 1;
const KIND_HOSPITAL: u8 = 1;
const KIND_AGGREGATE: u8 = 2;
/// Longest study or hospital id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Checks an identifier: 1..=128 bytes of ASCII letters, digits, `.`, `_` and `-`.
pub fn validate_id(what: &'static str, value: &str) -> Result<(), Error> {
    let reason = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > MAX_ID_LEN {
        Some("longer than 128 bytes")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only ASCII letters, digits, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidId {
            what,
            value: value.chars().take(MAX_ID_LEN + 8).collect(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Fields shared by every chunk of one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Fingerprint of the parameters the chunk was made under.
    pub params: Fingerprint,
    /// Fingerprint of the study key the chunk was made under.
    pub key: Fingerprint,
    /// Study the chunk belongs to.
    pub study_id: String,
    /// Training round.
    pub round: u64,
    /// Position of this chunk, `0..chunk_count`.
    pub chunk_index: u32,
    /// Number of chunks of the whole vector.
    pub chunk_count: u32,
    /// Length of the whole (unchunked) update vector.
    pub total_values: u64,
}

impl ChunkHeader {
    /// Refuses a chunk of another study or round, or made under another key (when `key` is
    /// given).
    pub fn check_binding(&self, study_id: &str, round: u64, key: Option<Fingerprint>) -> Result<(), Error> {
        if let Some(expected) = key
            && self.key != expected
        {
            return Err(Error::KeyMismatch {
                expected,
                found: self.key,
            });
        }
        if self.study_id != study_id {
            return Err(Error::StudyMismatch {
                expected: study_id.to_owned(),
                found: self.study_id.clone(),
            });
        }
        if self.round != round {
            return Err(Error::RoundMismatch {
                expected: round,
                found: self.round,
            });
        }
        Ok(())
    }

    /// Values carried by this chunk (the last ciphertext is zero-padded).
    pub fn values_in_chunk(&self, params: &SecAggParams) -> usize {
        params.values_in_chunk(self.total_values, u64::from(self.chunk_index))
    }

    /// Bytes that the tag authenticates for `hospital_id` and `seed`.
    #[cfg_attr(not(feature = "crypto"), allow(dead_code))]
    pub(crate) fn tag_input(&self, hospital_id: &str, seed: &[u8; 16]) -> Vec<u8> {
        let mut v = Vec::with_capacity(128 + self.study_id.len() + hospital_id.len());
        v.extend_from_slice(b"caduceus-secagg/tag/v1");
        v.push(WIRE_VERSION);
        v.extend_from_slice(&self.params.0);
        v.extend_from_slice(&self.key.0);
        v.push(self.study_id.len() as u8);
        v.extend_from_slice(self.study_id.as_bytes());
        v.extend_from_slice(&self.round.to_le_bytes());
        v.extend_from_slice(&self.chunk_index.to_le_bytes());
        v.extend_from_slice(&self.chunk_count.to_le_bytes());
        v.extend_from_slice(&self.total_values.to_le_bytes());
        v.push(hospital_id.len() as u8);
        v.extend_from_slice(hospital_id.as_bytes());
        v.extend_from_slice(seed);
        v
    }

    fn encode_into(&self, kind: u8, out: &mut Vec<u8>) {
        out.extend_from_slice(MAGIC);
        out.push(WIRE_VERSION);
        out.push(kind);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.params.0);
        out.extend_from_slice(&self.key.0);
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.chunk_index.to_le_bytes());
        out.extend_from_slice(&self.chunk_count.to_le_bytes());
        out.extend_from_slice(&self.total_values.to_le_bytes());
        out.push(self.study_id.len() as u8);
        out.extend_from_slice(self.study_id.as_bytes());
    }
}

/// One hospital's contribution to a chunk: who, the mask seed and the authentication tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contribution {
    /// Hospital id.
    pub hospital_id: String,
    /// 128-bit seed from which the GLWE masks of this chunk are expanded.
    pub seed: [u8; 16],
    /// HMAC tag binding the seed to the header and hospital (see module docs).
    pub tag: [u8; 16],
}

/// A decoded hospital chunk; the body borrows from the message.
#[derive(Clone, Debug)]
pub struct HospitalChunk<'a> {
    /// Header.
    pub header: ChunkHeader,
    /// Sender, seed and tag.
    pub contribution: Contribution,
    /// Packed 48-bit body coefficients.
    pub body: &'a [u8],
}

/// A decoded aggregate chunk: the weighted sum of the contributors' bodies.
#[derive(Clone, Debug)]
pub struct AggregateChunk<'a> {
    /// Header (no sender).
    pub header: ChunkHeader,
    /// Contributors with their weights, sorted by hospital id.
    pub contributors: Vec<(Contribution, u32)>,
    /// Packed 48-bit summed body coefficients.
    pub body: &'a [u8],
}

/// Expected body length in bytes of a chunk.
pub(crate) fn body_len(params: &SecAggParams, header: &ChunkHeader) -> usize {
    params.polys_in_chunk(header.total_values, u64::from(header.chunk_index))
        * POLYNOMIAL_SIZE
        * BODY_BYTES_PER_VALUE
}

/// Encodes a hospital chunk.
pub fn encode_hospital_chunk(header: &ChunkHeader, contribution: &Contribution, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + body.len());
    header.encode_into(KIND_HOSPITAL, &mut out);
    put_contribution(&mut out, contribution);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Encodes an aggregate chunk.
pub fn encode_aggregate_chunk(
    header: &ChunkHeader,
    contributors: &[(Contribution, u32)],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + contributors.len() * 170 + body.len());
    header.encode_into(KIND_AGGREGATE, &mut out);
    out.extend_from_slice(&(contributors.len() as u16).to_le_bytes());
    for (c, w) in contributors {
        out.push(c.hospital_id.len() as u8);
        out.extend_from_slice(c.hospital_id.as_bytes());
        out.extend_from_slice(&w.to_le_bytes());
        out.extend_from_slice(&c.seed);
        out.extend_from_slice(&c.tag);
    }
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn put_contribution(out: &mut Vec<u8>, c: &Contribution) {
    out.push(c.hospital_id.len() as u8);
    out.extend_from_slice(c.hospital_id.as_bytes());
    out.extend_from_slice(&c.seed);
    out.extend_from_slice(&c.tag);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], Error> {
        let available = self.buf.len() - self.pos;
        if n > available {
            return Err(Error::Truncated {
                field,
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], Error> {
        Ok(self.take(field, N)?.try_into().expect("length checked"))
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, Error> {
        Ok(self.take(field, 1)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn id(&mut self, field: &'static str) -> Result<String, Error> {
        let len = self.u8(field)? as usize;
        let raw = self.take(field, len)?;
        let s = std::str::from_utf8(raw).map_err(|_| Error::Malformed(format!("{field} is not UTF-8")))?;
        validate_id(field, s)?;
        Ok(s.to_owned())
    }
    fn finish(&self) -> Result<(), Error> {
        let extra = self.buf.len() - self.pos;
        if extra == 0 {
            Ok(())
        } else {
            Err(Error::TrailingBytes { extra })
        }
    }
}

fn read_header(
    r: &mut Reader<'_>,
    params: &SecAggParams,
    kind: u8,
    kind_name: &'static str,
) -> Result<ChunkHeader, Error> {
    if r.buf.len() < MAGIC.len() || &r.buf[..MAGIC.len()] != MAGIC {
        return Err(Error::BadMagic { expected: kind_name });
    }
    r.take("magic", MAGIC.len())?;
    let version = r.u8("version")?;
    if version != WIRE_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "ciphertext",
            found: version,
            supported: WIRE_VERSION,
        });
    }
    let found_kind = r.u8("kind")?;
    if found_kind != kind {
        return Err(Error::WrongKind {
            expected: kind_name,
            found: found_kind,
        });
    }
    if r.u16("reserved")? != 0 {
        return Err(Error::Malformed("reserved header bytes are not zero".into()));
    }
    let params_fp = Fingerprint(r.array("parameter fingerprint")?);
    if params_fp != params.fingerprint() {
        return Err(Error::ParamsMismatch {
            expected: params.fingerprint(),
            found: params_fp,
        });
    }
    let key = Fingerprint(r.array("key fingerprint")?);
    let round = r.u64("round")?;
    let chunk_index = r.u32("chunk index")?;
    let chunk_count = r.u32("chunk count")?;
    let total_values = r.u64("total values")?;
    let study_id = r.id("study id")?;
    if total_values == 0 || total_values > MAX_TOTAL_VALUES {
        return Err(Error::Malformed(format!(
            "vector length {total_values} outside 1..={MAX_TOTAL_VALUES}"
        )));
    }
    let expected_count = params.chunk_count(total_values);
    if u64::from(chunk_count) != expected_count {
        return Err(Error::Malformed(format!(
            "chunk count {chunk_count} does not match {expected_count} chunks for \
             {total_values} values"
        )));
    }
    if chunk_index >= chunk_count {
        return Err(Error::Malformed(format!(
            "chunk index {chunk_index} out of range (count {chunk_count})"
        )));
    }
    Ok(ChunkHeader {
        params: params_fp,
        key,
        study_id,
        round,
        chunk_index,
        chunk_count,
        total_values,
    })
}

fn read_body<'a>(r: &mut Reader<'a>, params: &SecAggParams, header: &ChunkHeader) -> Result<&'a [u8], Error> {
    let declared = r.u32("body length")? as usize;
    let expected = body_len(params, header);
    if declared != expected {
        return Err(Error::Malformed(format!(
            "body length {declared} bytes, expected {expected} for chunk {} of a \
             {}-value vector",
            header.chunk_index, header.total_values
        )));
    }
    let body = r.take("body", expected)?;
    r.finish()?;
    Ok(body)
}

/// Decodes and structurally validates a hospital chunk made under `params`.
pub fn decode_hospital_chunk<'a>(params: &SecAggParams, bytes: &'a [u8]) -> Result<HospitalChunk<'a>, Error> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let header = read_header(&mut r, params, KIND_HOSPITAL, "hospital chunk")?;
    let hospital_id = r.id("hospital id")?;
    let seed = r.array("seed")?;
    let tag = r.array("tag")?;
    let body = read_body(&mut r, params, &header)?;
    Ok(HospitalChunk {
        header,
        contribution: Contribution {
            hospital_id,
            seed,
            tag,
        },
        body,
    })
}

/// Decodes and structurally validates an aggregate chunk made under `params`.
pub fn decode_aggregate_chunk<'a>(
    params: &SecAggParams,
    bytes: &'a [u8],
) -> Result<AggregateChunk<'a>, Error> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let header = read_header(&mut r, params, KIND_AGGREGATE, "aggregate chunk")?;
    let count = r.u16("contributor count")?;
    if count == 0 || u32::from(count) > params.bounds().max_hospitals.min(MAX_HOSPITALS_LIMIT) {
        return Err(Error::Malformed(format!(
            "contributor count {count} outside 1..={}",
            params.bounds().max_hospitals
        )));
    }
    let mut contributors: Vec<(Contribution, u32)> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let hospital_id = r.id("hospital id")?;
        let weight = r.u32("weight")?;
        let seed = r.array("seed")?;
        let tag = r.array("tag")?;
        if let Some((prev, _)) = contributors.last()
            && prev.hospital_id >= hospital_id
        {
            return Err(Error::Malformed(format!(
                "contributors not strictly sorted by hospital id ({:?} before {hospital_id:?})",
                prev.hospital_id
            )));
        }
        contributors.push((
            Contribution {
                hospital_id,
                seed,
                tag,
            },
            weight,
        ));
    }
    let body = read_body(&mut r, params, &header)?;
    Ok(AggregateChunk {
        header,
        contributors,
        body,
    })
}

/// Reads coefficient `i` of a packed 48-bit body.
#[inline]
#[cfg_attr(not(feature = "crypto"), allow(dead_code))]
pub(crate) fn read48(body: &[u8], i: usize) -> u64 {
    let o = i * BODY_BYTES_PER_VALUE;
    let mut b = [0u8; 8];
    b[..6].copy_from_slice(&body[o..o + 6]);
    u64::from_le_bytes(b)
}

/// Appends the low 48 bits of `v`.
#[inline]
pub(crate) fn push48(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes()[..6]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::SumBounds;

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("study id", "utk-face_1.0").is_ok());
        for bad in ["", "a b", "é", "a/b", &"x".repeat(129)] {
            assert!(validate_id("study id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn packing_48_bits_round_trips() {
        let mut v = Vec::new();
        for x in [0u64, 1, (1 << 48) - 1, 0x1234_5678_9abc] {
            push48(&mut v, x);
        }
        assert_eq!(read48(&v, 2), (1 << 48) - 1);
        assert_eq!(read48(&v, 3), 0x1234_5678_9abc);
    }

    #[test]
    fn aggregate_round_trips() {
        let params = SecAggParams::with_polys_per_chunk(1.0, SumBounds::default(), 1).unwrap();
        let header = ChunkHeader {
            params: params.fingerprint(),
            key: Fingerprint([7; 16]),
            study_id: "s".into(),
            round: 3,
            chunk_index: 1,
            chunk_count: 2,
            total_values: 3000,
        };
        let c = |id: &str| Contribution {
            hospital_id: id.into(),
            seed: [1; 16],
            tag: [2; 16],
        };
        let body = vec![9u8; body_len(&params, &header)];
        let bytes = encode_aggregate_chunk(&header, &[(c("a"), 3), (c("b"), 4)], &body);
        let d = decode_aggregate_chunk(&params, &bytes).unwrap();
        assert_eq!(d.header, header);
        assert_eq!(d.contributors.len(), 2);
        assert_eq!(d.contributors[1].1, 4);
        assert_eq!(d.body, &body[..]);
        // Unsorted contributors are refused.
        let bytes = encode_aggregate_chunk(&header, &[(c("b"), 3), (c("a"), 4)], &body);
        assert!(matches!(
            decode_aggregate_chunk(&params, &bytes),
            Err(Error::Malformed(_))
        ));
        // A hospital chunk is not an aggregate.
        let bytes = encode_hospital_chunk(&header, &c("a"), &body);
        assert!(matches!(
            decode_aggregate_chunk(&params, &bytes),
            Err(Error::WrongKind { found: 1, .. })
        ));
    }
}
