//! Secure (TFHE) aggregation: the hospitals' ciphertexts are checked and summed with public integer
//! weights, without any key; the served model is the public initial model plus the encrypted aggregates.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use caduceus_aggregation::ModelStore;
use caduceus_fairness::RoundResult;
use caduceus_proto::{DataChunk, ModelChunk, UpdateHeader, Vector, data_chunk, model_chunk};
use tonic::Status;

use super::{
    ClosedRound, Combined, EncryptedAggregates, RoundAggregator, RoundModel, UpdateBody, UploadBody,
    check_len,
};
use crate::config::{SecAggConfig, StudyConfig};
use crate::service::checkpoint;
use crate::service::study::{Served, Summary};
use crate::service::transport::{ModelStream, model_chunks};

/// Aggregation of TFHE-encrypted deltas under the study key with fingerprint `sa.key_fingerprint`.
#[derive(Debug)]
pub(in crate::service) struct Tfhe {
    sa: SecAggConfig,
    study_id: String,
    arch: caduceus_models::Arch,
}

impl Tfhe {
    pub(in crate::service) fn new(cfg: &StudyConfig, sa: SecAggConfig) -> Self {
        Self {
            sa,
            study_id: cfg.study_id.clone(),
            arch: cfg.arch,
        }
    }

    /// A checker of one round's ciphertexts: bound to this study, round and key.
    fn checker(&self, round: u32) -> Result<caduceus_secagg::Aggregator, caduceus_secagg::Error> {
        Ok(
            caduceus_secagg::Aggregator::new(&self.sa.params, &self.study_id, u64::from(round))?
                .expect_key_fingerprint(self.sa.key_fingerprint),
        )
    }
}

impl RoundAggregator for Tfhe {
    fn header_info(&self) -> Option<caduceus_proto::SecureAggregation> {
        Some(caduceus_proto::SecureAggregation {
            key_fingerprint: self.sa.key_fingerprint.to_string(),
            params_fingerprint: self.sa.params.fingerprint().to_string(),
            clip: self.sa.params.clip(),
            base_round: 0,
        })
    }

    fn initial_extra(&self) -> serde_json::Value {
        serde_json::json!({"secure_aggregation": {
            "key_fingerprint": self.sa.key_fingerprint.to_string(),
            "params_fingerprint": self.sa.params.fingerprint().to_string(),
            "base_round": 0,
            "aggregates": [],
        }})
    }

    fn check_store(&self, model_store: &Path, extra: &serde_json::Value) -> anyhow::Result<()> {
        let found = extra["secure_aggregation"]["key_fingerprint"].as_str();
        if found != Some(self.sa.key_fingerprint.to_string().as_str()) {
            anyhow::bail!(
                "the model store {} was not written by a secure-aggregation study under key {} (found {:?})",
                model_store.display(),
                self.sa.key_fingerprint,
                found
            );
        }
        Ok(())
    }

    fn resume(
        &self,
        store: &ModelStore,
        extra: &serde_json::Value,
        round: u32,
    ) -> anyhow::Result<EncryptedAggregates> {
        checkpoint::load_aggregates(store, extra, round)
    }

    /// Header, the public initial model (unless the hospital holds the model of a later round,
    /// `have_round`), then the encrypted aggregates from the base round on.
    fn model_stream(&self, served: &Served, have_round: Option<u32>) -> ModelStream {
        let round = served.header.round;
        let base = have_round.filter(|&h| h <= round).unwrap_or(0);
        let mut header = served.header.clone();
        if let Some(info) = header.secure_aggregation.as_mut() {
            info.base_round = base;
        }
        let params = (base == 0).then(|| served.params.clone());
        if params.is_none() {
            header.parameters_sha256 = String::new();
        }
        let first = ModelChunk {
            kind: Some(model_chunk::Kind::Header(header)),
        };
        let data = params
            .into_iter()
            .flat_map(|p| model_chunks(Vector::Parameters, p));
        let enc = served
            .aggregates
            .iter()
            .zip(0u32..)
            .skip(base as usize)
            .flat_map(|(a, r)| {
                // A round's aggregate has as many chunks as one update (far below 2³²).
                let count = u32::try_from(a.len()).unwrap_or(u32::MAX);
                a.iter().zip(0u32..).map(move |(data, i)| ModelChunk {
                    kind: Some(model_chunk::Kind::EncryptedAggregate(
                        caduceus_proto::EncryptedAggregate {
                            round: r,
                            chunk_index: i,
                            chunk_count: count,
                            data: data.clone(),
                        },
                    )),
                })
            });
        let all: Vec<ModelChunk> = std::iter::once(first).chain(data).chain(enc).collect();
        Box::pin(futures::stream::iter(all.into_iter().map(Ok)))
    }

    fn open_upload<'a>(
        &'a self,
        header: &UpdateHeader,
        hospital: &'a str,
        round: u32,
        expected_len: u64,
    ) -> Result<Box<dyn UploadBody + 'a>, Status> {
        if !header.secure_aggregation {
            return Err(Status::failed_precondition(
                "this study runs secure aggregation: plaintext updates are refused (start the trainer \
                 with --secure-aggregation tfhe --study-key PATH)",
            ));
        }
        if header.key_fingerprint != self.sa.key_fingerprint.to_string() {
            return Err(Status::failed_precondition(format!(
                "update encrypted under key {:?}, but this study's key fingerprint is {}",
                header.key_fingerprint, self.sa.key_fingerprint
            )));
        }
        check_len(header, expected_len, self.arch)?;
        let check = self.checker(round).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Box::new(EncryptedUpload {
            tfhe: self,
            hospital,
            expected_len,
            expected_chunks: self.sa.params.chunk_count(expected_len),
            check,
            out: Vec::new(),
            offset: 0,
        }))
    }

    /// Sums the hospitals' ciphertexts with public integer weights (no key, no decryption) and writes the
    /// encrypted aggregate; the next model is the previous aggregates plus this one.
    fn aggregate(&self, closed: &ClosedRound<'_>, record: &mut RoundResult) -> Result<Combined, String> {
        let (round, received, sa) = (closed.round, closed.received, &self.sa);
        let participants: Vec<&String> = received.keys().collect();
        let real: Vec<f64> = match closed.weights {
            Some(w) => w.to_vec(),
            None => received.values().map(|r| r.num_examples as f64).collect(),
        };
        let total = sa.params.bounds().max_total_weight;
        let ints = caduceus_secagg::round_weights(&real, total)
            .map_err(|e| format!("secure aggregation weights: {e}"))?;
        let mut agg = self.checker(round).map_err(|e| e.to_string())?;
        let started = Instant::now();
        for ((h, r), &w) in received.iter().zip(&ints) {
            if w == 0 {
                tracing::warn!(hospital = %h, "weight rounds to 0: left out of the encrypted sum");
                continue;
            }
            for m in &r.body.encrypted {
                agg.add_chunk_from(h, m, w)
                    .map_err(|e| format!("secure aggregation of {h}: {e}"))?;
            }
        }
        let chunks = agg.finish().map_err(|e| format!("secure aggregation: {e}"))?;
        let sum_seconds = started.elapsed().as_secs_f64();
        let int_total: u64 = ints.iter().map(|&w| u64::from(w)).sum();
        record.weights = participants
            .iter()
            .map(|h| (*h).clone())
            .zip(ints.iter().map(|&w| f64::from(w) / int_total as f64))
            .collect();
        let train_examples = caduceus_aggregation::total_examples(received.values().map(|r| r.num_examples))
            .map_err(|e| e.to_string())?;
        record
            .extra
            .insert("train_examples".into(), serde_json::json!(train_examples));
        record.extra.insert(
            "secure_aggregation".into(),
            serde_json::json!({
                "scheme": "tfhe",
                "integer_weights": participants.iter().zip(&ints).collect::<BTreeMap<_, _>>(),
                "ciphertext_bytes_in": received.values().map(|r| r.body.encrypted.iter().map(Vec::len).sum::<usize>()).sum::<usize>(),
                "aggregate_bytes": chunks.iter().map(Vec::len).sum::<usize>(),
                "sum_seconds": sum_seconds,
            }),
        );
        // The aggregate file before the record and the checkpoint that lists it: a crash in between
        // redoes the round (the file is rewritten atomically).
        let listed = checkpoint::write_aggregate(closed.store, round, &chunks)?;
        let mut aggregates = closed.served.aggregates.clone();
        aggregates.push(Arc::new(chunks));
        Ok(Combined {
            model: RoundModel {
                params: closed.served.params.as_ref().clone(),
                control: None,
                aggregates,
            },
            checkpoint_extra: Some((
                "secure_aggregation",
                serde_json::json!({
                    "key_fingerprint": sa.key_fingerprint.to_string(),
                    "params_fingerprint": sa.params.fingerprint().to_string(),
                    "clip": sa.params.clip(),
                    "base_round": 0,
                    "note": "params are the public initial model (round 0); the model of this round is \
                             params plus the decrypted aggregates of rounds 0..round, applied in order",
                    "aggregates": listed,
                }),
            )),
        })
    }

    fn describe_model(&self, summary: &mut Summary, path: String) {
        summary.encrypted_model = Some(path);
    }
}

/// An encrypted update's body: one caduceus-secagg message per data chunk, bound to this study, round,
/// key and parameters, from the authenticated hospital, complete, of the model's length.
struct EncryptedUpload<'a> {
    tfhe: &'a Tfhe,
    hospital: &'a str,
    expected_len: u64,
    expected_chunks: u64,
    check: caduceus_secagg::Aggregator,
    out: Vec<Vec<u8>>,
    /// Byte offset of the next chunk.
    offset: u64,
}

impl UploadBody for EncryptedUpload<'_> {
    fn push(&mut self, chunk: DataChunk) -> Result<(), Status> {
        let (expected_len, expected_chunks) = (self.expected_len, self.expected_chunks);
        let Some(data_chunk::Payload::Encrypted(bytes)) = chunk.payload else {
            return Err(Status::invalid_argument(
                "plaintext data chunk in an encrypted update (secure aggregation)",
            ));
        };
        if bytes.is_empty() {
            return Err(Status::invalid_argument(format!(
                "encrypted data chunk {} (at byte offset {}) carries no data; empty chunks are refused",
                self.out.len(),
                chunk.offset
            )));
        }
        if chunk.vector != Vector::Parameters as i32 {
            return Err(Status::invalid_argument(
                "encrypted updates carry only the parameter delta",
            ));
        }
        if chunk.offset != self.offset {
            return Err(Status::invalid_argument(format!(
                "encrypted chunk at byte offset {}, expected {} (chunks must be contiguous)",
                chunk.offset, self.offset
            )));
        }
        if self.out.len() as u64 >= expected_chunks {
            return Err(Status::invalid_argument(format!(
                "more than the {expected_chunks} ciphertext chunks a {expected_len}-parameter delta has"
            )));
        }
        let header = caduceus_secagg::wire::decode_hospital_chunk(&self.tfhe.sa.params, &bytes)
            .map_err(secagg_status)?
            .header;
        if header.total_values != expected_len {
            return Err(Status::invalid_argument(format!(
                "the ciphertext holds {} values, the {} model has {expected_len}",
                header.total_values, self.tfhe.arch
            )));
        }
        self.check
            .add_chunk_from(self.hospital, &bytes, 1)
            .map_err(secagg_status)?;
        self.offset += bytes.len() as u64;
        self.out.push(bytes.to_vec());
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<UpdateBody, Status> {
        self.check.finish().map_err(secagg_status)?;
        Ok(UpdateBody {
            encrypted: self.out,
            ..UpdateBody::default()
        })
    }
}

fn secagg_status(e: caduceus_secagg::Error) -> Status {
    use caduceus_secagg::Error as E;
    match e {
        E::KeyMismatch { .. }
        | E::ParamsMismatch { .. }
        | E::StudyMismatch { .. }
        | E::RoundMismatch { .. } => Status::failed_precondition(format!("encrypted update refused: {e}")),
        E::SenderMismatch { .. } => Status::permission_denied(format!("encrypted update refused: {e}")),
        E::DuplicateContribution { .. } => Status::already_exists(format!("encrypted update refused: {e}")),
        other => Status::invalid_argument(format!("encrypted update refused: {other}")),
    }
}
