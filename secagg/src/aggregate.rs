//! Aggregator side: weighted sums of ciphertexts, without any key.
//!
//! The aggregator never expands a mask. Every contribution to chunk `c` is a seeded GLWE list
//! `(seed_i, b_i)` whose mask `a_i = XOF(seed_i)` is public. The weighted sum of the full
//! ciphertexts is `(Σ w_i a_i, Σ w_i b_i)`; its mask part is a public function of the seeds and
//! weights, so the aggregator only sums the bodies (mod 2^48) and forwards the seeds and
//! weights. A hospital, which holds the key, re-expands the masks, sums them with the same
//! weights and decrypts. The aggregator learns nothing it could not compute from the messages
//! it already holds, and its work is an integer multiply-add per value.

use std::collections::BTreeMap;

use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::params::{BODY_BITS, BODY_BYTES_PER_VALUE, SecAggParams};
use crate::wire::{
    ChunkHeader, Contribution, decode_hospital_chunk, encode_aggregate_chunk, push48, validate_id,
};

struct ChunkAcc {
    sum: Vec<u64>,
    contributors: BTreeMap<String, Contribution>,
}

/// Sums the hospital chunks of one round of one study. Takes only public parameters and
/// ciphertexts: there is no way to give it a key.
pub struct Aggregator {
    params: SecAggParams,
    study_id: String,
    round: u64,
    key: Option<Fingerprint>,
    layout: Option<(u32, u64)>,
    chunks: BTreeMap<u32, ChunkAcc>,
    weights: BTreeMap<String, u32>,
    total_weight: u64,
}

/// What [`Aggregator::add_chunk`] accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// Sending hospital.
    pub hospital_id: String,
    /// Chunk position.
    pub chunk_index: u32,
    /// Number of chunks in the vector.
    pub chunk_count: u32,
}

impl Aggregator {
    /// An aggregator for `round` of `study_id`.
    pub fn new(params: &SecAggParams, study_id: &str, round: u64) -> Result<Self, Error> {
        validate_id("study id", study_id)?;
        Ok(Aggregator {
            params: params.clone(),
            study_id: study_id.to_owned(),
            round,
            key: None,
            layout: None,
            chunks: BTreeMap::new(),
            weights: BTreeMap::new(),
            total_weight: 0,
        })
    }

    /// Only accept chunks made under the key with this public fingerprint. Without it the
    /// first accepted chunk fixes the fingerprint for the round.
    pub fn expect_key_fingerprint(mut self, key: Fingerprint) -> Self {
        self.key = Some(key);
        self
    }

    /// Hospitals accepted so far, with their weights.
    pub fn weights(&self) -> &BTreeMap<String, u32> {
        &self.weights
    }

    /// Validates one encoded hospital chunk and adds `weight ×` its body to the running sum.
    /// On error nothing changes. A hospital's weight must be the same for all its chunks.
    ///
    /// The sender is taken from the message; prefer [`add_chunk_from`](Self::add_chunk_from)
    /// when the transport authenticates the sender.
    pub fn add_chunk(&mut self, message: &[u8], weight: u32) -> Result<Accepted, Error> {
        self.add(message, weight, None)
    }

    /// Like [`add_chunk`](Self::add_chunk), but refuses a chunk whose hospital id differs from
    /// `sender`, the hospital authenticated by the transport (mTLS client certificate).
    pub fn add_chunk_from(&mut self, sender: &str, message: &[u8], weight: u32) -> Result<Accepted, Error> {
        self.add(message, weight, Some(sender))
    }

    fn add(&mut self, message: &[u8], weight: u32, sender: Option<&str>) -> Result<Accepted, Error> {
        let chunk = decode_hospital_chunk(&self.params, message)?;
        if let Some(sender) = sender
            && sender != chunk.contribution.hospital_id
        {
            return Err(Error::SenderMismatch {
                claimed: chunk.contribution.hospital_id.clone(),
                authenticated: sender.to_owned(),
            });
        }
        let h = &chunk.header;
        h.check_binding(&self.study_id, self.round, self.key)?;
        if let Some((count, total)) = self.layout
            && (count, total) != (h.chunk_count, h.total_values)
        {
            return Err(Error::InconsistentLayout(format!(
                "chunk says {} chunks / {} values, this round has {count} chunks / {total} values",
                h.chunk_count, h.total_values
            )));
        }
        let hospital = chunk.contribution.hospital_id.clone();
        let bounds = self.params.bounds();
        match self.weights.get(&hospital) {
            Some(&w) if w != weight => {
                return Err(Error::BadWeight {
                    hospital,
                    reason: format!("weight {weight} differs from its earlier weight {w}"),
                });
            }
            Some(_) => {}
            None => {
                if weight == 0 || weight > bounds.max_weight {
                    return Err(Error::BadWeight {
                        hospital,
                        reason: format!("weight {weight} outside 1..={}", bounds.max_weight),
                    });
                }
                if self.weights.len() as u32 >= bounds.max_hospitals {
                    return Err(Error::TooManyHospitals {
                        max: bounds.max_hospitals,
                    });
                }
                let total = self.total_weight + u64::from(weight);
                if total > self.params.effective_total_weight() {
                    return Err(Error::BadWeight {
                        hospital,
                        reason: format!(
                            "total weight would be {total}, above the bound {}",
                            self.params.effective_total_weight()
                        ),
                    });
                }
            }
        }
        if let Some(acc) = self.chunks.get(&h.chunk_index)
            && acc.contributors.contains_key(&hospital)
        {
            return Err(Error::DuplicateContribution {
                hospital,
                chunk: h.chunk_index,
            });
        }

        // All checks passed: commit. Chunk sums are allocated on first use, so memory follows
        // the data actually received, not what a header claims.
        if self.layout.is_none() {
            self.layout = Some((h.chunk_count, h.total_values));
            self.key = Some(h.key);
        }
        if !self.weights.contains_key(&hospital) {
            self.weights.insert(hospital.clone(), weight);
            self.total_weight += u64::from(weight);
        }
        let acc = self.chunks.entry(h.chunk_index).or_insert_with(|| ChunkAcc {
            sum: vec![0; chunk.body.len() / BODY_BYTES_PER_VALUE],
            contributors: BTreeMap::new(),
        });
        let w = u64::from(weight);
        for (s, c) in acc.sum.iter_mut().zip(chunk.body.chunks_exact(6)) {
            let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], 0, 0]);
            *s = s.wrapping_add(w.wrapping_mul(v));
        }
        acc.contributors
            .insert(hospital.clone(), chunk.contribution.clone());
        Ok(Accepted {
            hospital_id: hospital,
            chunk_index: h.chunk_index,
            chunk_count: h.chunk_count,
        })
    }

    /// Checks that every accepted hospital contributed every chunk and returns the encoded
    /// aggregate chunks, in order, to be sent to the hospitals.
    pub fn finish(self) -> Result<Vec<Vec<u8>>, Error> {
        let Some((chunk_count, total_values)) = self.layout else {
            return Err(Error::Incomplete("no contribution was accepted".into()));
        };
        let key = self.key.expect("set with the layout");
        let mask = (1u64 << BODY_BITS) - 1;
        if let Some(i) = (0..chunk_count).find(|i| !self.chunks.contains_key(i)) {
            return Err(Error::Incomplete(format!(
                "no hospital sent chunk {i} of {chunk_count}"
            )));
        }
        let mut out = Vec::with_capacity(self.chunks.len());
        for (i, acc) in self.chunks {
            if let Some(missing) = self.weights.keys().find(|h| !acc.contributors.contains_key(*h)) {
                return Err(Error::Incomplete(format!(
                    "hospital {missing:?} did not send chunk {i} of {chunk_count}"
                )));
            }
            let header = ChunkHeader {
                params: self.params.fingerprint(),
                key,
                study_id: self.study_id.clone(),
                round: self.round,
                chunk_index: i,
                chunk_count,
                total_values,
            };
            let contributors: Vec<(Contribution, u32)> = acc
                .contributors
                .into_values()
                .map(|c| {
                    let w = self.weights[&c.hospital_id];
                    (c, w)
                })
                .collect();
            let mut body = Vec::with_capacity(acc.sum.len() * 6);
            for s in acc.sum {
                push48(&mut body, s & mask);
            }
            out.push(encode_aggregate_chunk(&header, &contributors, &body));
        }
        Ok(out)
    }
}
