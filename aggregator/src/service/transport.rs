//! The tonic service: peer identity (client certificate → hospital), upload limits, reading update
//! streams and chunking the served model.
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caduceus_proto::v1::federation_server::Federation;
use caduceus_proto::{
    DEFAULT_CHUNK_ELEMS, GetGlobalModelRequest, GetRoundStatusRequest, ModelChunk, RoundStatus,
    SubmitUpdateResponse, UpdateChunk, UpdateHeader, Vector, evaluation_from_proto, f32_chunk, model_chunk,
    update_chunk,
};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::aggregate::UpdateBody;
use super::study::{Received, Study};
use crate::config::StudyConfig;

/// A served model, as the stream of `GetGlobalModel`.
pub(super) type ModelStream = Pin<Box<dyn Stream<Item = Result<ModelChunk, Status>> + Send>>;

/// `values` as the data chunks of vector `vector`, [`DEFAULT_CHUNK_ELEMS`] values each.
pub(super) fn model_chunks(
    vector: Vector,
    values: Arc<Vec<f32>>,
) -> impl Iterator<Item = ModelChunk> + Send + 'static {
    let n = values.len();
    (0..n.div_ceil(DEFAULT_CHUNK_ELEMS)).map(move |i| {
        let lo = i * DEFAULT_CHUNK_ELEMS;
        let hi = (lo + DEFAULT_CHUNK_ELEMS).min(n);
        ModelChunk {
            kind: Some(model_chunk::Kind::Data(f32_chunk(vector, lo, &values[lo..hi]))),
        }
    })
}

/// The hospital named by the verified client certificate of a request.
fn peer_hospital<T>(cfg: &StudyConfig, req: &Request<T>) -> Result<String, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated("no client certificate: the aggregator requires mutual TLS")
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    let hospital = caduceus_pki::hospital_from_cert_der(leaf.as_ref())
        .map_err(|e| Status::permission_denied(format!("client certificate: {e}")))?;
    if !cfg.hospitals.contains(&hospital) {
        return Err(Status::permission_denied(format!(
            "hospital {hospital:?} is not a participant of study {:?}",
            cfg.study_id
        )));
    }
    Ok(hospital)
}

fn check_study(cfg: &StudyConfig, id: &str) -> Result<(), Status> {
    if id != cfg.study_id {
        return Err(Status::permission_denied(format!(
            "this aggregator serves study {:?}, not {id:?}",
            cfg.study_id
        )));
    }
    Ok(())
}

/// Refuses an update's `num_examples` that `FedAvg` cannot use: 0 in a training update (no weight),
/// or above [`caduceus_aggregation::MAX_NUM_EXAMPLES`] in any update.
fn check_num_examples(num_examples: u64, evaluation_only: bool) -> Result<(), Status> {
    use caduceus_aggregation::MAX_NUM_EXAMPLES;
    if num_examples > MAX_NUM_EXAMPLES {
        return Err(Status::invalid_argument(format!(
            "num_examples is {num_examples}, above the maximum of {MAX_NUM_EXAMPLES}"
        )));
    }
    if num_examples == 0 && !evaluation_only {
        return Err(Status::invalid_argument(
            "num_examples is 0: an update must say how many examples trained it",
        ));
    }
    Ok(())
}

/// The time limits of one upload: each message must arrive within the idle timeout, and the whole
/// upload within the upload timeout. A client that stops sending (or trickles) is cut off with
/// `DEADLINE_EXCEEDED`, which frees its upload slot.
struct UploadLimits {
    idle: Duration,
    total: Duration,
    deadline: Instant,
}

impl UploadLimits {
    fn start(cfg: &StudyConfig) -> Self {
        Self {
            idle: cfg.upload_idle_timeout,
            total: cfg.upload_timeout,
            deadline: Instant::now() + cfg.upload_timeout,
        }
    }

    /// The next message of the upload, or the end of the stream.
    async fn next(&self, stream: &mut Streaming<UpdateChunk>) -> Result<Option<UpdateChunk>, Status> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let wait = left.min(self.idle);
        match tokio::time::timeout(wait, stream.message()).await {
            Ok(r) => r,
            Err(_) if wait < self.idle => Err(Status::deadline_exceeded(format!(
                "the upload took longer than {} s (--upload-timeout-secs) and is cut off",
                self.total.as_secs()
            ))),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no message for {} s (--upload-idle-timeout-secs): the upload is cut off",
                self.idle.as_secs()
            ))),
        }
    }
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct FederationService {
    study: Arc<Study>,
}

impl FederationService {
    #[must_use]
    pub fn new(study: Arc<Study>) -> Self {
        Self { study }
    }

    async fn receive(&self, req: Request<Streaming<UpdateChunk>>) -> Result<SubmitUpdateResponse, Status> {
        let study = &*self.study;
        let cfg = study.config();
        let hospital = peer_hospital(cfg, &req)?;
        let mut stream = req.into_inner();
        let limits = UploadLimits::start(cfg);
        let header: UpdateHeader = match limits.next(&mut stream).await? {
            Some(UpdateChunk {
                kind: Some(update_chunk::Kind::Header(h)),
            }) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the update stream must start with a header",
                ));
            }
            None => return Err(Status::invalid_argument("empty update stream")),
        };
        check_study(cfg, &header.study_id)?;
        if !header.hospital.is_empty() && header.hospital != hospital {
            return Err(Status::permission_denied(format!(
                "the header names hospital {:?} but the client certificate names {hospital:?}",
                header.hospital
            )));
        }
        let expected_len = study.num_parameters();
        let (round, evaluation_only, _slot) = study.begin_upload(&hospital, header.round)?;
        if header.evaluation_only != evaluation_only {
            return Err(Status::failed_precondition(if evaluation_only {
                format!("round {round} is the final evaluation: send evaluation counts only")
            } else {
                format!("round {round} is a training round: an evaluation-only update is not accepted")
            }));
        }
        let evaluation = evaluation_from_proto(&header.evaluation.clone().unwrap_or_default())
            .map_err(Status::invalid_argument)?;
        check_num_examples(header.num_examples, evaluation_only)?;
        let body = if evaluation_only {
            if limits.next(&mut stream).await?.is_some() {
                return Err(Status::invalid_argument(
                    "an evaluation-only update carries no parameter chunks",
                ));
            }
            UpdateBody::default()
        } else {
            let mut body = study
                .aggregator()
                .open_upload(&header, &hospital, round, expected_len)?;
            while let Some(msg) = limits.next(&mut stream).await? {
                let Some(update_chunk::Kind::Data(chunk)) = msg.kind else {
                    return Err(Status::invalid_argument("a second header in the update stream"));
                };
                body.push(chunk)?;
            }
            body.finish()?
        };
        let received = Received {
            num_examples: header.num_examples,
            evaluation,
            local_steps: header.local_steps,
            train_loss: header.train_loss,
            privacy: header.privacy,
            body,
        };
        let count = study.accept(&hospital, round, received)?;
        Ok(SubmitUpdateResponse {
            round,
            hospital,
            received: count,
        })
    }
}

#[tonic::async_trait]
impl Federation for FederationService {
    type GetGlobalModelStream = ModelStream;

    async fn get_global_model(
        &self,
        req: Request<GetGlobalModelRequest>,
    ) -> Result<Response<Self::GetGlobalModelStream>, Status> {
        let study = &*self.study;
        let hospital = peer_hospital(study.config(), &req)?;
        let req = req.into_inner();
        check_study(study.config(), &req.study_id)?;
        let served = study.served_for(req.round)?;
        tracing::debug!(%hospital, round = req.round, "serving global model");
        Ok(Response::new(
            study.aggregator().model_stream(&served, req.have_round),
        ))
    }

    async fn submit_update(
        &self,
        req: Request<Streaming<UpdateChunk>>,
    ) -> Result<Response<SubmitUpdateResponse>, Status> {
        match self.receive(req).await {
            Ok(r) => Ok(Response::new(r)),
            Err(s) => {
                tracing::warn!(code = ?s.code(), "update refused: {}", s.message());
                Err(s)
            }
        }
    }

    async fn get_round_status(
        &self,
        req: Request<GetRoundStatusRequest>,
    ) -> Result<Response<RoundStatus>, Status> {
        let study = &*self.study;
        peer_hospital(study.config(), &req)?;
        let req = req.into_inner();
        check_study(study.config(), &req.study_id)?;
        if let Some(target) = req.wait_for_round {
            let wait = Duration::from_millis(u64::from(req.wait_timeout_ms.min(60_000)));
            study.wait_for_round(target, wait).await;
        }
        Ok(Response::new(study.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num_examples_is_bounded_and_nonzero_for_training() {
        use caduceus_aggregation::MAX_NUM_EXAMPLES;
        assert!(check_num_examples(1, false).is_ok());
        assert!(check_num_examples(MAX_NUM_EXAMPLES, false).is_ok());
        assert!(
            check_num_examples(0, true).is_ok(),
            "evaluation-only updates carry no weight"
        );
        for (n, eval_only) in [
            (0, false),
            (MAX_NUM_EXAMPLES + 1, false),
            (MAX_NUM_EXAMPLES + 1, true),
        ] {
            let e = check_num_examples(n, eval_only).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains("num_examples"), "{}", e.message());
        }
    }

    #[test]
    fn model_chunks_cover_the_vector_in_order() {
        let n = 2 * DEFAULT_CHUNK_ELEMS + 3;
        let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut asm = caduceus_proto::VectorAssembler::new(Vector::Parameters, n as u64);
        let mut count = 0;
        for c in model_chunks(Vector::Parameters, Arc::new(values.clone())) {
            let Some(model_chunk::Kind::Data(d)) = c.kind else {
                panic!("not a data chunk")
            };
            asm.push(&d).unwrap();
            count += 1;
        }
        assert_eq!(count, 3);
        assert_eq!(asm.finish().unwrap(), values);
        assert_eq!(model_chunks(Vector::Control, Arc::new(Vec::new())).count(), 0);
    }
}
