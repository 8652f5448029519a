//! How a study reads training updates and combines a closed round's into the next model: one
//! [`RoundAggregator`] per study, in the clear ([`Plaintext`]) or under TFHE ([`Tfhe`]), chosen once by
//! [`for_study`] so that the round loop and the service do not branch on the mode.
mod plaintext;
mod tfhe;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use caduceus_aggregation::ModelStore;
use caduceus_fairness::RoundResult;
use caduceus_proto::{DataChunk, UpdateHeader};
use tonic::Status;

pub(super) use plaintext::Plaintext;
pub(super) use tfhe::Tfhe;

use super::study::{Received, Served, Summary};
use super::transport::ModelStream;
use crate::config::StudyConfig;

/// The encrypted aggregates of rounds `0..n` (index = round), each as its ciphertext messages.
pub(super) type EncryptedAggregates = Vec<Arc<Vec<Vec<u8>>>>;

/// The model of a round: plaintext parameters (and SCAFFOLD's control variate), or under secure
/// aggregation the public initial model plus the encrypted aggregates of the rounds before.
#[derive(Debug)]
pub(super) struct RoundModel {
    pub params: Vec<f32>,
    pub control: Option<Vec<f32>>,
    pub aggregates: EncryptedAggregates,
}

/// A training update's body as read from its stream: the plaintext delta (and control-variate delta),
/// or the validated ciphertext messages of the encrypted delta. Empty for an evaluation-only update.
#[derive(Debug, Default)]
pub(super) struct UpdateBody {
    pub delta: Vec<f32>,
    pub control_delta: Option<Vec<f32>>,
    pub encrypted: Vec<Vec<u8>>,
}

/// Reads one training update's data chunks (those after its header), checking each as it comes.
pub(super) trait UploadBody: Send {
    /// Takes the next data chunk.
    fn push(&mut self, chunk: DataChunk) -> Result<(), Status>;
    /// The whole body, once the stream has ended; refuses an incomplete one.
    fn finish(self: Box<Self>) -> Result<UpdateBody, Status>;
}

/// A closed training round, as its aggregator sees it.
#[derive(Debug)]
pub(super) struct ClosedRound<'a> {
    pub round: u32,
    /// The study's model store (for the mode's own files).
    pub store: &'a ModelStore,
    pub received: &'a BTreeMap<String, Received>,
    pub served: &'a Served,
    /// `FairFed`'s weights in `received`'s order; `None`: the strategy's own.
    pub weights: Option<&'a [f64]>,
}

/// The model a closed round produced, for the next checkpoint.
#[derive(Debug)]
pub(super) struct Combined {
    pub model: RoundModel,
    /// Checkpoint metadata of the mode (key `secure_aggregation`), when it has any.
    pub checkpoint_extra: Option<(&'static str, serde_json::Value)>,
}

/// How one study reads and combines updates: everything that differs between plaintext and secure
/// (TFHE) aggregation.
pub(super) trait RoundAggregator: Send + Sync + std::fmt::Debug {
    /// What the served model's header says about secure aggregation.
    fn header_info(&self) -> Option<caduceus_proto::SecureAggregation>;

    /// The metadata (`extra`) of a new study's checkpoint 0.
    fn initial_extra(&self) -> serde_json::Value;

    /// Refuses a model store written in another mode (or under another key).
    fn check_store(&self, model_store: &Path, extra: &serde_json::Value) -> anyhow::Result<()>;

    /// The encrypted aggregates of rounds `0..round` that resuming from a checkpoint serves.
    fn resume(
        &self,
        store: &ModelStore,
        extra: &serde_json::Value,
        round: u32,
    ) -> anyhow::Result<EncryptedAggregates>;

    /// The model stream of a round (`have_round`: the round whose model the hospital holds, if any).
    fn model_stream(&self, served: &Served, have_round: Option<u32>) -> ModelStream;

    /// Checks a training update's header and starts reading its body.
    fn open_upload<'a>(
        &'a self,
        header: &UpdateHeader,
        hospital: &'a str,
        round: u32,
        expected_len: u64,
    ) -> Result<Box<dyn UploadBody + 'a>, Status>;

    /// Combines a closed training round's updates into the next round's model (blocking work); fills in
    /// the record's weights and what it says about the aggregation.
    fn aggregate(&self, closed: &ClosedRound<'_>, record: &mut RoundResult) -> Result<Combined, String>;

    /// Names the final checkpoint (`path`) in the summary, as a plaintext or an encrypted model.
    fn describe_model(&self, summary: &mut Summary, path: String);
}

/// The study's aggregator.
pub(super) fn for_study(cfg: &StudyConfig) -> Box<dyn RoundAggregator> {
    match &cfg.secagg {
        Some(sa) => Box::new(Tfhe::new(cfg, sa.clone())),
        None => Box::new(Plaintext::new(cfg)),
    }
}

/// Refuses an update whose parameter count is not the model's.
fn check_len(header: &UpdateHeader, expected_len: u64, arch: caduceus_models::Arch) -> Result<(), Status> {
    if header.num_parameters != expected_len {
        return Err(Status::invalid_argument(format!(
            "update has {} parameters, the {arch} model has {expected_len}",
            header.num_parameters
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::service::Study;
    use crate::service::test_config;

    const FINGERPRINT: &str = "0123456789abcdef0123456789abcdef";

    fn secure() -> [&'static str; 2] {
        [
            "--secure-aggregation=tfhe",
            "--key-fingerprint=0123456789abcdef0123456789abcdef",
        ]
    }

    #[test]
    fn a_model_store_of_the_other_mode_or_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let plain = test_config(dir.path(), &[]);
        let tfhe = test_config(dir.path(), &secure());
        let other_key = test_config(
            dir.path(),
            &[
                "--secure-aggregation=tfhe",
                "--key-fingerprint=ffffffffffffffffffffffffffffffff",
            ],
        );
        let path = dir.path().join("store");
        let written = super::for_study(&tfhe).initial_extra();
        assert_eq!(written["secure_aggregation"]["key_fingerprint"], FINGERPRINT);
        assert!(super::for_study(&tfhe).check_store(&path, &written).is_ok());
        let e = super::for_study(&plain).check_store(&path, &written).unwrap_err();
        assert!(e.to_string().contains("--secure-aggregation tfhe"), "{e}");
        let e = super::for_study(&other_key)
            .check_store(&path, &written)
            .unwrap_err();
        assert!(e.to_string().contains(FINGERPRINT), "{e}");
        let plain_extra = super::for_study(&plain).initial_extra();
        assert!(super::for_study(&plain).check_store(&path, &plain_extra).is_ok());
        let e = super::for_study(&tfhe)
            .check_store(&path, &plain_extra)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("not written by a secure-aggregation study"),
            "{e}"
        );
    }

    #[test]
    fn a_study_resumes_only_in_the_mode_that_wrote_its_store() {
        let dir = tempfile::tempdir().unwrap();
        let plain = test_config(dir.path(), &[]);
        let study = Study::open(plain.clone()).unwrap();
        assert_eq!(study.progress().0, 0);
        let header = study.served_for(0).unwrap().header.clone();
        assert!(header.secure_aggregation.is_none());
        assert!(study.summary(&Ok(())).model_path.is_some());
        drop(study);
        let e = Study::open(test_config(dir.path(), &secure())).unwrap_err();
        assert!(
            format!("{e:#}").contains("not written by a secure-aggregation study"),
            "{e:#}"
        );
        assert!(Study::open(plain).is_ok(), "the same mode resumes");

        let dir = tempfile::tempdir().unwrap();
        let study = Study::open(test_config(dir.path(), &secure())).unwrap();
        let served = study.served_for(0).unwrap();
        let info = served.header.secure_aggregation.as_ref().unwrap();
        assert_eq!(info.key_fingerprint, FINGERPRINT);
        let summary = study.summary(&Ok(()));
        assert!(summary.model_path.is_none() && summary.encrypted_model.is_some());
        let e = Study::open(test_config(dir.path(), &[])).unwrap_err();
        assert!(
            format!("{e:#}").contains("holds a secure-aggregation study"),
            "{e:#}"
        );
    }
}
