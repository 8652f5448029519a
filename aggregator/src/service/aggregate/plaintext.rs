//! Plaintext aggregation: f32 deltas (and SCAFFOLD's control-variate deltas) combined by the
//! study's strategy into the next model.
use std::path::Path;

use caduceus_aggregation::{ClientUpdate, GlobalState, ModelStore, Strategy, aggregate};
use caduceus_fairness::RoundResult;
use caduceus_proto::{
    ChunkError, DataChunk, ModelChunk, UpdateHeader, Vector, VectorAssembler, data_chunk, model_chunk,
};
use tonic::Status;

use super::{
    ClosedRound, Combined, EncryptedAggregates, RoundAggregator, RoundModel, UpdateBody, UploadBody,
    check_len,
};
use crate::config::StudyConfig;
use crate::service::study::{Served, Summary};
use crate::service::transport::{ModelStream, model_chunks};

/// Aggregation in the clear, by the study's strategy.
#[derive(Debug)]
pub(in crate::service) struct Plaintext {
    strategy: Strategy,
    arch: caduceus_models::Arch,
    /// N, the number of hospitals in the study (SCAFFOLD's `|S|/N`).
    hospitals: usize,
}

impl Plaintext {
    pub(in crate::service) fn new(cfg: &StudyConfig) -> Self {
        Self {
            strategy: cfg.strategy,
            arch: cfg.arch,
            hospitals: cfg.hospitals.len(),
        }
    }
}

impl RoundAggregator for Plaintext {
    fn header_info(&self) -> Option<caduceus_proto::SecureAggregation> {
        None
    }

    fn initial_extra(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    fn check_store(&self, model_store: &Path, extra: &serde_json::Value) -> anyhow::Result<()> {
        if extra["secure_aggregation"]["key_fingerprint"].as_str().is_some() {
            anyhow::bail!(
                "the model store {} holds a secure-aggregation study: start the aggregator with \
                 --secure-aggregation tfhe and its --key-fingerprint",
                model_store.display()
            );
        }
        Ok(())
    }

    fn resume(&self, _: &ModelStore, _: &serde_json::Value, _: u32) -> anyhow::Result<EncryptedAggregates> {
        Ok(Vec::new())
    }

    fn model_stream(&self, served: &Served, _have_round: Option<u32>) -> ModelStream {
        let header = ModelChunk {
            kind: Some(model_chunk::Kind::Header(served.header.clone())),
        };
        let data = model_chunks(Vector::Parameters, served.params.clone());
        let control = served
            .control
            .clone()
            .into_iter()
            .flat_map(|c| model_chunks(Vector::Control, c));
        let all = std::iter::once(header).chain(data).chain(control).map(Ok);
        Box::pin(futures::stream::iter(all))
    }

    fn open_upload<'a>(
        &'a self,
        header: &UpdateHeader,
        _hospital: &'a str,
        _round: u32,
        expected_len: u64,
    ) -> Result<Box<dyn UploadBody + 'a>, Status> {
        if header.secure_aggregation {
            return Err(Status::failed_precondition(
                "encrypted update, but secure aggregation is not enabled on this aggregator",
            ));
        }
        check_len(header, expected_len, self.arch)?;
        let wants_control = self.strategy.uses_control();
        if header.has_control != wants_control {
            return Err(Status::invalid_argument(if wants_control {
                "SCAFFOLD updates must carry a control-variate delta"
            } else {
                "this study's strategy takes no control-variate delta"
            }));
        }
        Ok(Box::new(PlainUpload {
            params: VectorAssembler::new(Vector::Parameters, expected_len),
            control: wants_control.then(|| VectorAssembler::new(Vector::Control, expected_len)),
        }))
    }

    fn aggregate(&self, closed: &ClosedRound<'_>, record: &mut RoundResult) -> Result<Combined, String> {
        let served = closed.served;
        let mut state = GlobalState {
            params: served.params.as_ref().clone(),
            control: served.control.as_ref().map(|c| c.as_ref().clone()),
        };
        let updates: Vec<ClientUpdate<'_>> = closed
            .received
            .iter()
            .map(|(h, r)| ClientUpdate {
                hospital: h,
                num_examples: r.num_examples,
                delta: &r.body.delta,
                control_delta: r.body.control_delta.as_deref(),
            })
            .collect();
        let report = aggregate(
            &self.strategy,
            &mut state,
            &updates,
            self.hospitals,
            closed.weights,
        )
        .map_err(|e| e.to_string())?;
        record.weights = closed
            .received
            .keys()
            .cloned()
            .zip(report.weights.iter().copied())
            .collect();
        record
            .extra
            .insert("train_examples".into(), serde_json::json!(report.total_examples));
        if let Some(i) = state.params.iter().position(|v| !v.is_finite()) {
            return Err(format!("the aggregated model has a non-finite value at {i}"));
        }
        Ok(Combined {
            model: RoundModel {
                params: state.params,
                control: state.control,
                aggregates: Vec::new(),
            },
            checkpoint_extra: None,
        })
    }

    fn describe_model(&self, summary: &mut Summary, path: String) {
        summary.model_path = Some(path);
    }
}

/// A plaintext update's body: the parameter delta and, under SCAFFOLD, the control-variate delta.
struct PlainUpload {
    params: VectorAssembler,
    control: Option<VectorAssembler>,
}

impl UploadBody for PlainUpload {
    fn push(&mut self, chunk: DataChunk) -> Result<(), Status> {
        if matches!(chunk.payload, Some(data_chunk::Payload::Encrypted(_))) {
            return Err(Status::unimplemented(
                "encrypted (secure-aggregation) payloads are not enabled on this aggregator",
            ));
        }
        if chunk.vector == Vector::Control as i32 {
            match self.control.as_mut() {
                Some(c) => c.push(&chunk).map_err(chunk_status),
                None => Err(Status::invalid_argument(
                    "control-variate chunk in an update without one",
                )),
            }
        } else {
            self.params.push(&chunk).map_err(chunk_status)
        }
    }

    fn finish(self: Box<Self>) -> Result<UpdateBody, Status> {
        let delta = self.params.finish().map_err(chunk_status)?;
        let control_delta = self
            .control
            .map(VectorAssembler::finish)
            .transpose()
            .map_err(chunk_status)?;
        Ok(UpdateBody {
            delta,
            control_delta,
            encrypted: Vec::new(),
        })
    }
}

fn chunk_status(e: ChunkError) -> Status {
    match e {
        ChunkError::Encrypted { .. } => Status::unimplemented(format!(
            "{e}; secure aggregation is not enabled on this aggregator"
        )),
        other => Status::invalid_argument(other.to_string()),
    }
}
