//! The study ([`Study`]): its state, the admission of uploads and the round loop that closes each
//! round, has it aggregated and checkpointed, and opens the next.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use caduceus_aggregation::{Checkpoint, ModelStore, Strategy, TensorMeta};
use caduceus_fairness::RoundResult;
use caduceus_proto::{Evaluation, ModelHeader, RoundStatus, StudyPhase, TensorSpec, sha256_f32};
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tonic::Status;

use super::aggregate::{self, ClosedRound, EncryptedAggregates, RoundAggregator, RoundModel, UpdateBody};
use super::{checkpoint, record};
use crate::config::StudyConfig;

/// Where the study stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Training,
    FinalEvaluation,
    Completed,
    Failed(String),
}

impl Phase {
    fn to_proto(&self) -> StudyPhase {
        match self {
            Phase::Training => StudyPhase::Training,
            Phase::FinalEvaluation => StudyPhase::FinalEvaluation,
            Phase::Completed => StudyPhase::Completed,
            Phase::Failed(_) => StudyPhase::Failed,
        }
    }

    fn is_over(&self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed(_))
    }

    /// The phase as the number long-polling status calls compare (over: 2 and above).
    fn code(&self) -> u8 {
        match self {
            Phase::Training => 0,
            Phase::FinalEvaluation => 1,
            Phase::Completed => 2,
            Phase::Failed(_) => 3,
        }
    }
}

/// The model served in the current round.
#[derive(Debug)]
pub(super) struct Served {
    pub header: ModelHeader,
    pub params: Arc<Vec<f32>>,
    pub control: Option<Arc<Vec<f32>>>,
    /// Secure aggregation: the encrypted aggregates of rounds `0..header.round` (index = round), and
    /// `params` is the public initial model.
    pub aggregates: EncryptedAggregates,
}

impl Served {
    /// The model of `round` (in `phase`) with its header; `secure_aggregation` is the header's
    /// secure-aggregation information, when on.
    fn new(
        cfg: &StudyConfig,
        specs: &[TensorMeta],
        secure_aggregation: Option<caduceus_proto::SecureAggregation>,
        round: u32,
        phase: &Phase,
        model: RoundModel,
    ) -> Self {
        let (mu, strategy) = match cfg.strategy {
            Strategy::FedAvg => (0.0, caduceus_proto::Strategy::Fedavg),
            Strategy::FedProx { mu } => (mu, caduceus_proto::Strategy::Fedprox),
            Strategy::Scaffold { .. } => (0.0, caduceus_proto::Strategy::Scaffold),
            Strategy::FairFed { .. } => (0.0, caduceus_proto::Strategy::Fairfed),
        };
        let RoundModel {
            params,
            control,
            aggregates,
        } = model;
        let header = ModelHeader {
            study_id: cfg.study_id.clone(),
            round,
            total_rounds: cfg.rounds,
            arch: cfg.arch.name().to_string(),
            tensors: specs
                .iter()
                .map(|t| TensorSpec {
                    name: t.name.clone(),
                    shape: t.shape.iter().map(|&d| d as u64).collect(),
                })
                .collect(),
            num_parameters: params.len() as u64,
            strategy: strategy as i32,
            proximal_mu: mu,
            has_control: control.is_some(),
            evaluation_only: *phase == Phase::FinalEvaluation,
            parameters_sha256: sha256_f32(&params),
            secure_aggregation,
        };
        Served {
            header,
            params: Arc::new(params),
            control: control.map(Arc::new),
            aggregates,
        }
    }
}

/// A validated update waiting for its round to close.
#[derive(Debug)]
pub(super) struct Received {
    pub num_examples: u64,
    pub evaluation: Evaluation,
    pub local_steps: u64,
    pub train_loss: f64,
    pub privacy: Option<caduceus_proto::PrivacySpend>,
    /// The delta (plaintext, or its validated ciphertext messages); empty for an evaluation-only update.
    pub body: UpdateBody,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    round: u32,
    /// False while a round is being aggregated: submissions are refused.
    accepting: bool,
    served: Arc<Served>,
    opened_at: Instant,
    deadline: Instant,
    received: BTreeMap<String, Received>,
    in_flight: BTreeSet<String>,
    history: Vec<RoundResult>,
    fairfed_weights: BTreeMap<String, f64>,
}

impl State {
    /// The number of updates the open round has (at most the study's hospitals).
    fn received_count(&self) -> u32 {
        u32::try_from(self.received.len()).unwrap_or(u32::MAX)
    }
}

/// The final outcome, for the summary file.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub study_id: String,
    pub status: &'static str,
    pub message: String,
    pub strategy: String,
    pub rounds: u32,
    pub rounds_completed: u32,
    pub final_accuracy: Option<f64>,
    pub final_loss: Option<f64>,
    pub participants: Vec<Vec<String>>,
    /// The final checkpoint. Absent under secure aggregation: the aggregator has no plaintext model
    /// (its checkpoints hold the public initial model plus encrypted aggregates, see
    /// `encrypted_model`).
    pub model_path: Option<String>,
    pub resumed_from_round: Option<u32>,
    /// Secure aggregation: the checkpoint whose metadata lists the encrypted aggregates that the
    /// hospitals decrypt and apply to the initial model to obtain the final model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted_model: Option<String>,
}

/// The next round's model and `FairFed` weights, once a training round is aggregated.
type NextRound = (Served, BTreeMap<String, f64>);

/// Shared state of the running study.
pub struct Study {
    cfg: StudyConfig,
    specs: Vec<TensorMeta>,
    store: ModelStore,
    /// Plaintext or secure aggregation.
    aggregator: Box<dyn RoundAggregator>,
    state: Mutex<State>,
    /// Wakes the round coordinator when an update arrives.
    arrivals: Notify,
    /// Round/phase changes, for long-polling status calls.
    changes: watch::Sender<(u32, u8)>,
    resumed_from: Option<u32>,
}

impl std::fmt::Debug for Study {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Study")
            .field("study_id", &self.cfg.study_id)
            .finish_non_exhaustive()
    }
}

impl Study {
    /// Opens the model store and resumes from its newest valid checkpoint, or initialises round 0.
    ///
    /// # Errors
    /// An unreadable model store, one of another study, model or aggregation mode, or an unusable
    /// `--initial-model`.
    pub fn open(cfg: StudyConfig) -> anyhow::Result<Arc<Self>> {
        let store = ModelStore::open(&cfg.model_store)
            .with_context(|| format!("--model-store {}", cfg.model_store.display()))?;
        let template = caduceus_models::Model::build(cfg.arch, cfg.num_classes, cfg.init_seed)
            .context("building the initial model")?;
        let specs: Vec<TensorMeta> = template
            .param_specs()
            .iter()
            .map(|s| TensorMeta {
                name: s.name.clone(),
                shape: s.shape.clone(),
            })
            .collect();
        let aggregator = aggregate::for_study(&cfg);
        let (ckpt, resumed_from) =
            checkpoint::resume_or_init(&cfg, &store, &specs, &template, aggregator.as_ref())?;
        let round = ckpt.meta.round;
        let history = checkpoint::load_history(&store, &cfg, round);
        let fairfed_weights = checkpoint::fairfed_weights(&ckpt.meta.extra);
        let final_done = history.iter().any(|r| r.round == cfg.rounds);
        let phase = if round < cfg.rounds {
            Phase::Training
        } else if cfg.final_evaluation && !final_done {
            Phase::FinalEvaluation
        } else {
            Phase::Completed
        };
        let aggregates = aggregator.resume(&store, &ckpt.meta.extra, round)?;
        let model = RoundModel {
            params: ckpt.params,
            control: ckpt.control,
            aggregates,
        };
        let served = Arc::new(Served::new(
            &cfg,
            &specs,
            aggregator.header_info(),
            round,
            &phase,
            model,
        ));
        let now = Instant::now();
        let (changes, _) = watch::channel((round, phase.code()));
        Ok(Arc::new(Study {
            specs,
            store,
            aggregator,
            state: Mutex::new(State {
                phase,
                round,
                accepting: true,
                served,
                opened_at: now,
                deadline: now + cfg.round_deadline,
                received: BTreeMap::new(),
                in_flight: BTreeSet::new(),
                history,
                fairfed_weights,
            }),
            arrivals: Notify::new(),
            changes,
            resumed_from,
            cfg,
        }))
    }

    /// The study's settings.
    #[must_use]
    pub fn config(&self) -> &StudyConfig {
        &self.cfg
    }

    /// The model store.
    #[must_use]
    pub fn store(&self) -> &ModelStore {
        &self.store
    }

    /// Current round and phase.
    ///
    /// # Panics
    /// If the state lock is poisoned.
    #[must_use]
    pub fn progress(&self) -> (u32, Phase) {
        let st = self.state.lock().expect("state lock");
        (st.round, st.phase.clone())
    }

    /// Round records so far.
    ///
    /// # Panics
    /// If the state lock is poisoned.
    #[must_use]
    pub fn history(&self) -> Vec<RoundResult> {
        self.state.lock().expect("state lock").history.clone()
    }

    /// How the study reads and combines updates.
    pub(super) fn aggregator(&self) -> &dyn RoundAggregator {
        self.aggregator.as_ref()
    }

    /// The model's parameter count.
    pub(super) fn num_parameters(&self) -> u64 {
        self.specs.iter().map(TensorMeta::numel).sum::<usize>() as u64
    }

    pub(super) fn status(&self) -> RoundStatus {
        let st = self.state.lock().expect("state lock");
        RoundStatus {
            study_id: self.cfg.study_id.clone(),
            current_round: st.round,
            total_rounds: self.cfg.rounds,
            phase: st.phase.to_proto() as i32,
            received_from: st.received.keys().cloned().collect(),
            quorum_min: self.cfg.quorums(st.round).0,
            quorum_max: self.cfg.quorums(st.round).1,
            deadline_in_ms: u64::try_from(st.deadline.saturating_duration_since(Instant::now()).as_millis())
                .unwrap_or(u64::MAX),
            message: match &st.phase {
                Phase::Failed(m) => m.clone(),
                Phase::Completed => "the study has completed".into(),
                _ => String::new(),
            },
        }
    }

    /// Waits (at most `wait`) until round `target` is open or the study is over.
    pub(super) async fn wait_for_round(&self, target: u32, wait: Duration) {
        let mut rx = self.changes.subscribe();
        let _ = tokio::time::timeout(wait, async {
            loop {
                let (round, phase) = *rx.borrow_and_update();
                if round >= target || phase >= 2 {
                    break;
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
    }

    /// The model served in `round`, which must be the open round of a running study.
    pub(super) fn served_for(&self, round: u32) -> Result<Arc<Served>, Status> {
        let st = self.state.lock().expect("state lock");
        if let Phase::Failed(m) = &st.phase {
            return Err(Status::failed_precondition(format!("study has failed: {m}")));
        }
        if st.phase == Phase::Completed {
            return Err(Status::failed_precondition("the study has completed"));
        }
        if round != st.round {
            return Err(Status::failed_precondition(format!(
                "round {round} requested but round {} is being served",
                st.round
            )));
        }
        Ok(st.served.clone())
    }

    /// Admits `hospital`'s upload for `round` (from its header): returns the open round, whether it is
    /// the final evaluation, and the hospital's upload slot, held until the upload ends.
    pub(super) fn begin_upload(
        &self,
        hospital: &str,
        round: u32,
    ) -> Result<(u32, bool, UploadSlot<'_>), Status> {
        let mut st = self.state.lock().expect("state lock");
        match &st.phase {
            Phase::Completed => {
                return Err(Status::failed_precondition(format!(
                    "study {:?} has completed; no more updates are taken",
                    self.cfg.study_id
                )));
            }
            Phase::Failed(m) => {
                return Err(Status::failed_precondition(format!("study has failed: {m}")));
            }
            _ => {}
        }
        if round != st.round {
            return Err(Status::failed_precondition(format!(
                "update for round {round} but round {} is open",
                st.round
            )));
        }
        if !st.accepting {
            return Err(Status::failed_precondition(format!(
                "round {} is closed and being aggregated",
                st.round
            )));
        }
        if st.received.contains_key(hospital) {
            return Err(Status::already_exists(format!(
                "{hospital} already submitted an update for round {}",
                st.round
            )));
        }
        if st.in_flight.contains(hospital) {
            return Err(Status::already_exists(format!(
                "{hospital} is already uploading an update for round {}",
                st.round
            )));
        }
        if st.received_count() >= self.cfg.quorums(st.round).1 {
            return Err(Status::failed_precondition(format!(
                "round {} already has its {} updates",
                st.round,
                self.cfg.quorums(st.round).1
            )));
        }
        st.in_flight.insert(hospital.to_string());
        let eval_only = st.phase == Phase::FinalEvaluation;
        Ok((
            st.round,
            eval_only,
            UploadSlot {
                study: self,
                hospital: hospital.to_string(),
            },
        ))
    }

    /// Records `hospital`'s complete update for `round` unless the round closed meanwhile; returns the
    /// number of updates the round has.
    pub(super) fn accept(&self, hospital: &str, round: u32, received: Received) -> Result<u32, Status> {
        let count = {
            let mut st = self.state.lock().expect("state lock");
            if st.round != round || !st.accepting || st.phase.is_over() {
                return Err(Status::failed_precondition(format!(
                    "round {round} closed while the update was uploading"
                )));
            }
            if st.received_count() >= self.cfg.quorums(round).1 {
                return Err(Status::failed_precondition(format!(
                    "round {round} already has its {} updates",
                    self.cfg.quorums(round).1
                )));
            }
            st.received.insert(hospital.to_string(), received);
            st.received_count()
        };
        tracing::info!(%hospital, round, received = count, "update accepted");
        self.arrivals.notify_one();
        Ok(count)
    }

    fn notify_change(&self, st: &State) {
        self.changes.send_replace((st.round, st.phase.code()));
    }

    /// Runs rounds until the study completes (Ok) or fails (Err with the reason). Emits one JSON line per
    /// closed round on stdout.
    ///
    /// # Errors
    /// The reason the study failed (a missed quorum, an aggregation error).
    ///
    /// # Panics
    /// If the state lock is poisoned.
    pub async fn run_rounds(self: &Arc<Self>) -> Result<(), String> {
        loop {
            let action = {
                let st = self.state.lock().expect("state lock");
                match &st.phase {
                    Phase::Completed => return Ok(()),
                    Phase::Failed(m) => return Err(m.clone()),
                    _ => {}
                }
                let n = st.received_count();
                let (quorum_min, quorum_max) = self.cfg.quorums(st.round);
                if n >= quorum_max {
                    Some(true)
                } else if Instant::now() >= st.deadline {
                    Some(n >= quorum_min)
                } else {
                    None
                }
            };
            match action {
                Some(true) => self.close_round().await?,
                Some(false) => {
                    let mut st = self.state.lock().expect("state lock");
                    let msg = format!(
                        "round {} missed its quorum: {} of the required {} updates arrived before the {}s deadline (from: {})",
                        st.round,
                        st.received.len(),
                        self.cfg.quorum_min,
                        self.cfg.round_deadline.as_secs(),
                        if st.received.is_empty() {
                            "nobody".to_string()
                        } else {
                            st.received.keys().cloned().collect::<Vec<_>>().join(", ")
                        }
                    );
                    st.phase = Phase::Failed(msg.clone());
                    self.notify_change(&st);
                    return Err(msg);
                }
                None => {
                    let deadline = self.state.lock().expect("state lock").deadline;
                    tokio::select! {
                        () = self.arrivals.notified() => {}
                        () = tokio::time::sleep_until(deadline.into()) => {}
                    }
                }
            }
        }
    }

    async fn close_round(self: &Arc<Self>) -> Result<(), String> {
        let (round, phase, received, served, fairfed_prev) = {
            let mut st = self.state.lock().expect("state lock");
            st.accepting = false;
            (
                st.round,
                st.phase.clone(),
                std::mem::take(&mut st.received),
                st.served.clone(),
                st.fairfed_weights.clone(),
            )
        };
        let started = Instant::now();
        let opened_at = self.state.lock().expect("state lock").opened_at;
        let this = self.clone();
        let span = tracing::info_span!(
            "aggregate round",
            caduceus.study = %self.cfg.study_id,
            caduceus.round = round,
            participants = received.len(),
            evaluation_only = phase == Phase::FinalEvaluation
        );
        let outcome = tokio::task::spawn_blocking(move || {
            span.in_scope(|| this.aggregate_round(round, &phase, &received, &served, fairfed_prev))
        })
        .await
        .map_err(|e| format!("aggregation task failed: {e}"))?;
        let (record, next) = match outcome {
            Ok(x) => x,
            Err(e) => {
                let mut st = self.state.lock().expect("state lock");
                let msg = format!("round {round} could not be aggregated: {e}");
                st.phase = Phase::Failed(msg.clone());
                self.notify_change(&st);
                return Err(msg);
            }
        };
        let mut line = serde_json::json!({"event": "round_closed"});
        line["result"] = serde_json::to_value(&record).unwrap_or_default();
        line["round_seconds"] = serde_json::json!(opened_at.elapsed().as_secs_f64());
        line["aggregation_seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
        println!("{line}");
        let mut st = self.state.lock().expect("state lock");
        st.history.push(record);
        match next {
            Some((served, weights)) => {
                st.round = served.header.round;
                st.phase = if st.round < self.cfg.rounds {
                    Phase::Training
                } else {
                    Phase::FinalEvaluation
                };
                st.served = Arc::new(served);
                st.fairfed_weights = weights;
                if st.round == self.cfg.rounds && !self.cfg.final_evaluation {
                    st.phase = Phase::Completed;
                }
            }
            None => st.phase = Phase::Completed,
        }
        let now = Instant::now();
        st.opened_at = now;
        st.deadline = now + self.cfg.round_deadline;
        st.accepting = true;
        self.notify_change(&st);
        Ok(())
    }

    /// Aggregates a closed round (blocking work): returns its record and, for a training round, the next
    /// round's model and `FairFed` weights (already checkpointed).
    fn aggregate_round(
        &self,
        round: u32,
        phase: &Phase,
        received: &BTreeMap<String, Received>,
        served: &Served,
        mut fairfed: BTreeMap<String, f64>,
    ) -> Result<(RoundResult, Option<NextRound>), String> {
        let mut record = record::round_record(&self.cfg, round, received);
        if *phase == Phase::FinalEvaluation {
            record
                .extra
                .insert("evaluation_only".into(), serde_json::json!(true));
            self.store
                .write_json(&checkpoint::record_name(round), &record)
                .map_err(|e| e.to_string())?;
            return Ok((record, None));
        }
        let weights = record::fairfed_weights(&self.cfg, received, &mut fairfed, &mut record)?;
        let closed = ClosedRound {
            round,
            store: &self.store,
            received,
            served,
            weights: weights.as_deref(),
        };
        let combined = self.aggregator.aggregate(&closed, &mut record)?;
        // The record first, then the checkpoint: a crash in between redoes the round.
        self.store
            .write_json(&checkpoint::record_name(round), &record)
            .map_err(|e| e.to_string())?;
        let next_round = round + 1;
        let participants: Vec<&String> = received.keys().collect();
        let mut extra = serde_json::json!({
            "closed_round": round,
            "participants": participants,
            "fairfed_weights": fairfed,
        });
        if let Some((key, value)) = combined.checkpoint_extra {
            extra[key] = value;
        }
        let RoundModel {
            params,
            control,
            aggregates,
        } = combined.model;
        let ckpt = Checkpoint {
            meta: checkpoint::meta(&self.cfg, &self.specs, next_round, extra),
            params,
            control,
        };
        self.store.save(&ckpt).map_err(|e| e.to_string())?;
        let next_phase = if next_round < self.cfg.rounds {
            Phase::Training
        } else {
            Phase::FinalEvaluation
        };
        let model = RoundModel {
            params: ckpt.params,
            control: ckpt.control,
            aggregates,
        };
        let served = Served::new(
            &self.cfg,
            &self.specs,
            self.aggregator.header_info(),
            next_round,
            &next_phase,
            model,
        );
        Ok((record, Some((served, fairfed))))
    }

    /// The summary written at exit.
    ///
    /// # Panics
    /// If the state lock is poisoned.
    #[must_use]
    pub fn summary(&self, outcome: &Result<(), String>) -> Summary {
        let st = self.state.lock().expect("state lock");
        let last = st.history.last();
        let mut summary = Summary {
            study_id: self.cfg.study_id.clone(),
            status: if outcome.is_ok() { "succeeded" } else { "failed" },
            message: match outcome {
                Ok(()) => format!("{} rounds completed", self.cfg.rounds),
                Err(e) => e.clone(),
            },
            strategy: self.cfg.strategy.name().to_string(),
            rounds: self.cfg.rounds,
            rounds_completed: st.round.min(self.cfg.rounds),
            final_accuracy: last.and_then(|r| r.accuracy),
            final_loss: last.and_then(|r| r.loss),
            participants: st.history.iter().map(|r| r.participants.clone()).collect(),
            model_path: None,
            resumed_from_round: self.resumed_from,
            encrypted_model: None,
        };
        let path = self.store.path_for(st.round).display().to_string();
        self.aggregator.describe_model(&mut summary, path);
        summary
    }
}

/// A hospital's upload slot: removes it from the in-flight set when its upload ends, however it ends.
pub(super) struct UploadSlot<'a> {
    study: &'a Study,
    hospital: String,
}

impl Drop for UploadSlot<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.study.state.lock() {
            st.in_flight.remove(&self.hospital);
        }
    }
}
