//! A file holding the encoded chunks of one round's aggregate, as the aggregator checkpoints it:
//! magic `CADSAGB1`, the chunk count (u32 LE), then per chunk its length (u64 LE) and bytes. The
//! chunks themselves are verified when a hospital decrypts them; this only frames them.

use crate::error::Error;
use crate::params::MAX_MESSAGE_BYTES;

const MAGIC: &[u8; 8] = b"CADSAGB1";

/// Frames `chunks` into one byte string.
pub fn encode_bundle<B: AsRef<[u8]>>(chunks: &[B]) -> Vec<u8> {
    let total: usize = chunks.iter().map(|c| c.as_ref().len() + 8).sum();
    let mut out = Vec::with_capacity(12 + total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for c in chunks {
        let c = c.as_ref();
        out.extend_from_slice(&(c.len() as u64).to_le_bytes());
        out.extend_from_slice(c);
    }
    out
}

/// Splits a byte string made by [`encode_bundle`] back into its chunks.
pub fn decode_bundle(bytes: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    let bad = |m: &str| Error::Malformed(format!("aggregate bundle: {m}"));
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        return Err(Error::BadMagic {
            expected: "aggregate bundle",
        });
    }
    let n = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let mut pos = 12;
    let mut out = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let len_bytes = bytes.get(pos..pos + 8).ok_or_else(|| bad("truncated length"))?;
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(bad("chunk larger than a message may be"));
        }
        pos += 8;
        let c = bytes.get(pos..pos + len).ok_or_else(|| bad("truncated chunk"))?;
        out.push(c.to_vec());
        pos += len;
    }
    if pos != bytes.len() {
        return Err(Error::TrailingBytes {
            extra: bytes.len() - pos,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_round_trip_and_refuse_damage() {
        let chunks = vec![vec![1u8, 2, 3], vec![], vec![9; 100]];
        let b = encode_bundle(&chunks);
        assert_eq!(decode_bundle(&b).unwrap(), chunks);
        assert!(decode_bundle(&b[..b.len() - 1]).is_err());
        let mut extra = b.clone();
        extra.push(0);
        assert!(decode_bundle(&extra).is_err());
        assert!(decode_bundle(b"CADSAGB2\0\0\0\0").is_err());
    }
}
