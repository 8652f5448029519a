//! The study state machine and the gRPC service.
//!
//! Rounds: `0..R` are training rounds; round `R` (when final evaluation is on) is an evaluation-only
//! round in which hospitals evaluate the final model. The model served in round `r` is checkpoint `r`.
//! A round closes as soon as `quorum_max` updates are in, or at its deadline when at least
//! `quorum_min` are in; with fewer at the deadline the study fails.
//!
//! The round record of round `r` ([`RoundResult`]) holds the hospitals' evaluation of model `r` (the
//! model the round started from) summed over participants, so record 0 is the initial model and record
//! `R` the final one.
use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use caduceus_aggregation::{
    Checkpoint, CheckpointMeta, ClientUpdate, GlobalState, ModelStore, Strategy, TensorMeta, aggregate,
    checkpoint::now_unix_ms,
};
use caduceus_fairness::RoundResult;
use caduceus_proto::v1::federation_server::Federation;
use caduceus_proto::{
    ChunkError, DEFAULT_CHUNK_ELEMS, Evaluation, GetGlobalModelRequest, GetRoundStatusRequest, ModelChunk,
    ModelHeader, RoundStatus, StudyPhase, SubmitUpdateResponse, TensorSpec, UpdateChunk, UpdateHeader,
    Vector, VectorAssembler, data_chunk, evaluation_from_proto, f32_chunk, model_chunk, sha256_f32,
    update_chunk,
};
use futures::Stream;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tonic::{Request, Response, Status, Streaming};

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
}

/// The model served in the current round.
#[derive(Debug)]
struct Served {
    header: ModelHeader,
    params: Arc<Vec<f32>>,
    control: Option<Arc<Vec<f32>>>,
    /// Secure aggregation: the encrypted aggregates of rounds `0..header.round` (index = round), and
    /// `params` is the public initial model.
    aggregates: Vec<Arc<Vec<Vec<u8>>>>,
}

/// File (in the model store) of the encrypted aggregate of closed round `round`.
pub fn aggregate_file_name(round: u32) -> String {
    format!("secagg-aggregate-{round:06}.bin")
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

/// Loads the encrypted aggregates of rounds `0..upto` recorded in a checkpoint's metadata.
fn load_aggregates(
    store: &ModelStore,
    extra: &serde_json::Value,
    upto: u32,
) -> anyhow::Result<Vec<Arc<Vec<Vec<u8>>>>> {
    use sha2::Digest;
    let list = extra["secure_aggregation"]["aggregates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for r in 0..upto {
        let entry = list
            .iter()
            .find(|e| e["round"].as_u64() == Some(u64::from(r)))
            .ok_or_else(|| {
                anyhow::anyhow!("the checkpoint does not list the encrypted aggregate of round {r}")
            })?;
        let path = store.dir().join(aggregate_file_name(r));
        let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let digest = hex::encode(sha2::Sha256::digest(&bytes));
        if Some(digest.as_str()) != entry["sha256"].as_str() {
            anyhow::bail!("{} does not match the checkpoint's digest", path.display());
        }
        let chunks =
            caduceus_secagg::decode_bundle(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        out.push(Arc::new(chunks));
    }
    Ok(out)
}

/// A validated update waiting for its round to close.
#[derive(Debug)]
struct Received {
    num_examples: u64,
    delta: Vec<f32>,
    control_delta: Option<Vec<f32>>,
    evaluation: Evaluation,
    local_steps: u64,
    train_loss: f64,
    privacy: Option<caduceus_proto::PrivacySpend>,
    /// Secure aggregation: the hospital's validated ciphertext messages (its delta, encrypted).
    encrypted: Vec<Vec<u8>>,
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

/// Shared state of the running study.
pub struct Study {
    cfg: StudyConfig,
    specs: Vec<TensorMeta>,
    store: ModelStore,
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

fn phase_code(p: &Phase) -> u8 {
    match p {
        Phase::Training => 0,
        Phase::FinalEvaluation => 1,
        Phase::Completed => 2,
        Phase::Failed(_) => 3,
    }
}

/// The metadata of a checkpoint of this study holding the model of `round`.
fn checkpoint_meta(
    cfg: &StudyConfig,
    specs: &[TensorMeta],
    round: u32,
    extra: serde_json::Value,
) -> CheckpointMeta {
    CheckpointMeta {
        format_version: caduceus_aggregation::checkpoint::FORMAT_VERSION,
        study_id: cfg.study_id.clone(),
        round,
        total_rounds: cfg.rounds,
        arch: cfg.arch.name().to_string(),
        strategy: cfg.strategy,
        tensors: specs.to_vec(),
        params_sha256: String::new(),
        control_sha256: None,
        created_unix_ms: now_unix_ms(),
        extra,
    }
}

fn record_name(round: u32) -> String {
    format!("round-{round:06}.json")
}

impl Study {
    /// Opens the model store and resumes from its newest valid checkpoint, or initialises round 0.
    pub fn open(cfg: StudyConfig) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
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
        let mut resumed_from = None;
        let ckpt = match store.load_latest().context("reading the model store")? {
            Some(r) => {
                for s in &r.skipped {
                    tracing::warn!("skipping a checkpoint that does not verify: {s}");
                }
                let c = r.checkpoint;
                if c.meta.study_id != cfg.study_id {
                    anyhow::bail!(
                        "the model store {} belongs to study {:?}, not {:?}",
                        cfg.model_store.display(),
                        c.meta.study_id,
                        cfg.study_id
                    );
                }
                if c.meta.tensors != specs {
                    anyhow::bail!(
                        "checkpoint {} does not match --arch {} with {} classes",
                        r.path.display(),
                        cfg.arch,
                        cfg.num_classes
                    );
                }
                if c.meta.round > cfg.rounds {
                    anyhow::bail!(
                        "checkpoint {} is for round {}, beyond --rounds {}",
                        r.path.display(),
                        c.meta.round,
                        cfg.rounds
                    );
                }
                let stored_fp = c.meta.extra["secure_aggregation"]["key_fingerprint"].as_str();
                match (&cfg.secagg, stored_fp) {
                    (Some(sa), Some(fp)) if fp == sa.key_fingerprint.to_string() => {}
                    (None, None) => {}
                    (Some(sa), found) => anyhow::bail!(
                        "the model store {} was not written by a secure-aggregation study under key {} (found {:?})",
                        cfg.model_store.display(),
                        sa.key_fingerprint,
                        found
                    ),
                    (None, Some(_)) => anyhow::bail!(
                        "the model store {} holds a secure-aggregation study: start the aggregator with \
                         --secure-aggregation tfhe and its --key-fingerprint",
                        cfg.model_store.display()
                    ),
                }
                tracing::info!(round = c.meta.round, path = %r.path.display(), "resuming from checkpoint");
                resumed_from = Some(c.meta.round);
                c
            }
            None => {
                let params = match &cfg.initial_model {
                    Some(p) => {
                        let m = caduceus_models::Model::load(p)
                            .with_context(|| format!("--initial-model {}", p.display()))?;
                        if m.arch() != cfg.arch || m.num_classes() != cfg.num_classes {
                            anyhow::bail!(
                                "--initial-model {} is a {} model with {} classes, not {} with {}",
                                p.display(),
                                m.arch(),
                                m.num_classes(),
                                cfg.arch,
                                cfg.num_classes
                            );
                        }
                        m.flatten()?
                    }
                    None => template.flatten()?,
                };
                let control = cfg.strategy.uses_control().then(|| vec![0.0; params.len()]);
                let c = Checkpoint {
                    meta: checkpoint_meta(
                        &cfg,
                        &specs,
                        0,
                        match &cfg.secagg {
                            Some(sa) => serde_json::json!({"secure_aggregation": {
                                "key_fingerprint": sa.key_fingerprint.to_string(),
                                "params_fingerprint": sa.params.fingerprint().to_string(),
                                "base_round": 0,
                                "aggregates": [],
                            }}),
                            None => serde_json::json!({}),
                        },
                    ),
                    params,
                    control,
                };
                store.save(&c).context("writing the initial checkpoint")?;
                c
            }
        };
        let mut history = Vec::new();
        for r in 0..=ckpt.meta.round.min(cfg.rounds) {
            let path = store.dir().join(record_name(r));
            if let Ok(bytes) = std::fs::read(&path) {
                match serde_json::from_slice::<RoundResult>(&bytes) {
                    Ok(rec) => history.push(rec),
                    Err(e) => tracing::warn!("ignoring unreadable round record {}: {e}", path.display()),
                }
            }
        }
        // Round records of rounds ≥ the checkpoint's are from a round that is being redone.
        history.retain(|r| {
            r.round < ckpt.meta.round || (ckpt.meta.round == cfg.rounds && r.round == cfg.rounds)
        });
        let fairfed_weights: BTreeMap<String, f64> = ckpt
            .meta
            .extra
            .get("fairfed_weights")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default();
        let round = ckpt.meta.round;
        let final_done = history.iter().any(|r| r.round == cfg.rounds);
        let phase = if round < cfg.rounds {
            Phase::Training
        } else if cfg.final_evaluation && !final_done {
            Phase::FinalEvaluation
        } else {
            Phase::Completed
        };
        let aggregates = if cfg.secagg.is_some() {
            load_aggregates(&store, &ckpt.meta.extra, round)?
        } else {
            Vec::new()
        };
        let served = Arc::new(Self::served(
            &cfg,
            &specs,
            round,
            &phase,
            ckpt.params,
            ckpt.control,
            aggregates,
        ));
        let now = Instant::now();
        let (changes, _) = watch::channel((round, phase_code(&phase)));
        Ok(Arc::new(Study {
            specs,
            store,
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

    fn served(
        cfg: &StudyConfig,
        specs: &[TensorMeta],
        round: u32,
        phase: &Phase,
        params: Vec<f32>,
        control: Option<Vec<f32>>,
        aggregates: Vec<Arc<Vec<Vec<u8>>>>,
    ) -> Served {
        let (mu, strategy) = match cfg.strategy {
            Strategy::FedAvg => (0.0, caduceus_proto::Strategy::Fedavg),
            Strategy::FedProx { mu } => (mu, caduceus_proto::Strategy::Fedprox),
            Strategy::Scaffold { .. } => (0.0, caduceus_proto::Strategy::Scaffold),
            Strategy::FairFed { .. } => (0.0, caduceus_proto::Strategy::Fairfed),
        };
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
            secure_aggregation: cfg.secagg.as_ref().map(|sa| caduceus_proto::SecureAggregation {
                key_fingerprint: sa.key_fingerprint.to_string(),
                params_fingerprint: sa.params.fingerprint().to_string(),
                clip: sa.params.clip(),
                base_round: 0,
            }),
        };
        Served {
            header,
            params: Arc::new(params),
            control: control.map(Arc::new),
            aggregates,
        }
    }

    /// The study's settings.
    pub fn config(&self) -> &StudyConfig {
        &self.cfg
    }

    /// The model store.
    pub fn store(&self) -> &ModelStore {
        &self.store
    }

    /// Current round and phase.
    pub fn progress(&self) -> (u32, Phase) {
        let st = self.state.lock().expect("state lock");
        (st.round, st.phase.clone())
    }

    /// Round records so far.
    pub fn history(&self) -> Vec<RoundResult> {
        self.state.lock().expect("state lock").history.clone()
    }

    fn status(&self) -> RoundStatus {
        let st = self.state.lock().expect("state lock");
        RoundStatus {
            study_id: self.cfg.study_id.clone(),
            current_round: st.round,
            total_rounds: self.cfg.rounds,
            phase: st.phase.to_proto() as i32,
            received_from: st.received.keys().cloned().collect(),
            quorum_min: self.cfg.quorums(st.round).0,
            quorum_max: self.cfg.quorums(st.round).1,
            deadline_in_ms: st.deadline.saturating_duration_since(Instant::now()).as_millis() as u64,
            message: match &st.phase {
                Phase::Failed(m) => m.clone(),
                Phase::Completed => "the study has completed".into(),
                _ => String::new(),
            },
        }
    }

    fn notify_change(&self, st: &State) {
        self.changes.send_replace((st.round, phase_code(&st.phase)));
    }

    /// Runs rounds until the study completes (Ok) or fails (Err with the reason). Emits one JSON line per
    /// closed round on stdout.
    pub async fn run_rounds(self: &Arc<Self>) -> Result<(), String> {
        loop {
            let action = {
                let st = self.state.lock().expect("state lock");
                match &st.phase {
                    Phase::Completed => return Ok(()),
                    Phase::Failed(m) => return Err(m.clone()),
                    _ => {}
                }
                let n = st.received.len() as u32;
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
                        _ = self.arrivals.notified() => {}
                        _ = tokio::time::sleep_until(deadline.into()) => {}
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
        let outcome = tokio::task::spawn_blocking(move || {
            this.aggregate_round(round, &phase, received, &served, fairfed_prev)
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
    /// round's model and FairFed weights (already checkpointed).
    #[allow(clippy::type_complexity)]
    fn aggregate_round(
        &self,
        round: u32,
        phase: &Phase,
        received: BTreeMap<String, Received>,
        served: &Served,
        mut fairfed: BTreeMap<String, f64>,
    ) -> Result<(RoundResult, Option<(Served, BTreeMap<String, f64>)>), String> {
        let mut eval = Evaluation::default();
        for r in received.values() {
            eval.merge(&r.evaluation);
        }
        let participants: Vec<String> = received.keys().cloned().collect();
        let mut record = RoundResult {
            round,
            strategy: self.cfg.strategy.name().to_string(),
            participants: participants.clone(),
            accuracy: eval.accuracy(),
            loss: eval.mean_loss(),
            counts: eval.counts.clone(),
            ..Default::default()
        };
        record
            .extra
            .insert("examples".into(), serde_json::json!(eval.examples));
        let local: BTreeMap<&String, serde_json::Value> = received
            .iter()
            .map(|(h, r)| {
                (
                    h,
                    serde_json::json!({
                        "num_examples": r.num_examples,
                        "local_steps": r.local_steps,
                        "train_loss": r.train_loss,
                        "val_examples": r.evaluation.examples,
                        "val_accuracy": r.evaluation.accuracy(),
                        "privacy": r.privacy.as_ref().map(|p| serde_json::json!({
                            "noise_multiplier": p.noise_multiplier,
                            "sample_rate": p.sample_rate,
                            "steps": p.steps,
                            "clip_norm": p.clip_norm,
                        })),
                        // The evaluation counts' own Gaussian mechanism (one release), under DP.
                        "evaluation_privacy": r.evaluation.privacy.as_ref().map(|p| serde_json::json!({
                            "noise_multiplier": p.noise_multiplier,
                            "noise_std": p.noise_std,
                            "sensitivity": p.sensitivity,
                        })),
                    }),
                )
            })
            .collect();
        record.extra.insert("hospitals".into(), serde_json::json!(local));
        // Under DP every summed count carries the noise of each noised hospital's count: report its
        // standard deviation, so that readers of the counts can judge small groups.
        let noise_var: f64 = received
            .values()
            .filter_map(|r| r.evaluation.privacy.as_ref())
            .map(|p| p.noise_std * p.noise_std)
            .sum();
        if noise_var > 0.0 {
            record
                .extra
                .insert("evaluation_noise_std".into(), serde_json::json!(noise_var.sqrt()));
        }

        if *phase == Phase::FinalEvaluation {
            record
                .extra
                .insert("evaluation_only".into(), serde_json::json!(true));
            self.store
                .write_json(&record_name(round), &record)
                .map_err(|e| e.to_string())?;
            return Ok((record, None));
        }

        // Weights: FairFed from the fairness engine, otherwise the strategy's own.
        let weights: Option<Vec<f64>> = match self.cfg.strategy {
            Strategy::FairFed { beta } => {
                let counts: Vec<u64> = received.values().map(|r| r.num_examples).collect();
                let init = caduceus_fairness::fairfed::initial_weights(&counts)
                    .map_err(|e| format!("FairFed: {e}"))?;
                let prev: Vec<f64> = participants
                    .iter()
                    .zip(&init)
                    .map(|(h, w0)| fairfed.get(h).copied().unwrap_or(*w0))
                    .collect();
                let locals: Vec<caduceus_fairness::GroupCounts> =
                    received.values().map(|r| r.evaluation.counts.clone()).collect();
                let (w, gaps) = caduceus_fairness::fairfed::round(
                    &prev,
                    &locals,
                    &self.cfg.fairfed_attribute,
                    self.cfg.fairfed_metric,
                    beta as f64,
                    self.cfg.min_group_size,
                )
                .map_err(|e| format!("FairFed: {e}"))?;
                for (h, wk) in participants.iter().zip(&w) {
                    fairfed.insert(h.clone(), *wk);
                }
                record.extra.insert(
                    "fairfed_gaps".into(),
                    serde_json::json!(participants.iter().zip(&gaps).collect::<BTreeMap<_, _>>()),
                );
                Some(w)
            }
            _ => None,
        };
        if let Some(sa) = &self.cfg.secagg {
            return self.aggregate_encrypted(sa, round, record, received, served, fairfed, weights);
        }
        let mut state = GlobalState {
            params: served.params.as_ref().clone(),
            control: served.control.as_ref().map(|c| c.as_ref().clone()),
        };
        let updates: Vec<ClientUpdate<'_>> = received
            .iter()
            .map(|(h, r)| ClientUpdate {
                hospital: h,
                num_examples: r.num_examples,
                delta: &r.delta,
                control_delta: r.control_delta.as_deref(),
            })
            .collect();
        let report = aggregate(
            &self.cfg.strategy,
            &mut state,
            &updates,
            self.cfg.hospitals.len(),
            weights.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        record.weights = participants
            .iter()
            .cloned()
            .zip(report.weights.iter().copied())
            .collect();
        record
            .extra
            .insert("train_examples".into(), serde_json::json!(report.total_examples));
        if let Some(i) = state.params.iter().position(|v| !v.is_finite()) {
            return Err(format!("the aggregated model has a non-finite value at {i}"));
        }
        // The record first, then the checkpoint: a crash in between redoes the round.
        self.store
            .write_json(&record_name(round), &record)
            .map_err(|e| e.to_string())?;
        let next_round = round + 1;
        let ckpt = Checkpoint {
            meta: checkpoint_meta(
                &self.cfg,
                &self.specs,
                next_round,
                serde_json::json!({
                    "closed_round": round,
                    "participants": participants,
                    "fairfed_weights": fairfed,
                }),
            ),
            params: state.params,
            control: state.control,
        };
        self.store.save(&ckpt).map_err(|e| e.to_string())?;
        let next_phase = if next_round < self.cfg.rounds {
            Phase::Training
        } else {
            Phase::FinalEvaluation
        };
        let served = Self::served(
            &self.cfg,
            &self.specs,
            next_round,
            &next_phase,
            ckpt.params,
            ckpt.control,
            Vec::new(),
        );
        Ok((record, Some((served, fairfed))))
    }

    /// Secure aggregation: sums the hospitals' ciphertexts with public integer weights (no key, no
    /// decryption), checkpoints the encrypted aggregate and serves it with the previous ones.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn aggregate_encrypted(
        &self,
        sa: &crate::config::SecAggConfig,
        round: u32,
        mut record: RoundResult,
        received: BTreeMap<String, Received>,
        served: &Served,
        fairfed: BTreeMap<String, f64>,
        weights: Option<Vec<f64>>,
    ) -> Result<(RoundResult, Option<(Served, BTreeMap<String, f64>)>), String> {
        use sha2::Digest;
        let participants: Vec<&String> = received.keys().collect();
        let real: Vec<f64> = match &weights {
            Some(w) => w.clone(),
            None => received.values().map(|r| r.num_examples as f64).collect(),
        };
        let total = sa.params.bounds().max_total_weight;
        let ints = caduceus_secagg::round_weights(&real, total)
            .map_err(|e| format!("secure aggregation weights: {e}"))?;
        let mut agg = caduceus_secagg::Aggregator::new(&sa.params, &self.cfg.study_id, u64::from(round))
            .map_err(|e| e.to_string())?
            .expect_key_fingerprint(sa.key_fingerprint);
        let started = Instant::now();
        for ((h, r), &w) in received.iter().zip(&ints) {
            if w == 0 {
                tracing::warn!(hospital = %h, "weight rounds to 0: left out of the encrypted sum");
                continue;
            }
            for m in &r.encrypted {
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
                "ciphertext_bytes_in": received.values().map(|r| r.encrypted.iter().map(Vec::len).sum::<usize>()).sum::<usize>(),
                "aggregate_bytes": chunks.iter().map(Vec::len).sum::<usize>(),
                "sum_seconds": sum_seconds,
            }),
        );
        // Aggregate file, then the record, then the checkpoint that lists it: a crash in between
        // redoes the round (the file is rewritten atomically).
        let bundle = caduceus_secagg::encode_bundle(&chunks);
        let digest = hex::encode(sha2::Sha256::digest(&bundle));
        caduceus_aggregation::checkpoint::write_atomic(
            &self.store.dir().join(aggregate_file_name(round)),
            &bundle,
        )
        .map_err(|e| e.to_string())?;
        self.store
            .write_json(&record_name(round), &record)
            .map_err(|e| e.to_string())?;
        let next_round = round + 1;
        let mut aggregates = served.aggregates.clone();
        aggregates.push(Arc::new(chunks));
        let listed: Vec<serde_json::Value> = (0..next_round)
            .map(|r| {
                let bytes = if r == round {
                    Ok(bundle.clone())
                } else {
                    std::fs::read(self.store.dir().join(aggregate_file_name(r)))
                };
                bytes.map(|b| {
                    serde_json::json!({
                        "round": r,
                        "file": aggregate_file_name(r),
                        "sha256": hex::encode(sha2::Sha256::digest(&b)),
                    })
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| format!("re-reading an aggregate file: {e}"))?;
        debug_assert_eq!(
            listed.last().and_then(|v| v["sha256"].as_str()),
            Some(digest.as_str())
        );
        let ckpt = Checkpoint {
            meta: checkpoint_meta(
                &self.cfg,
                &self.specs,
                next_round,
                serde_json::json!({
                    "closed_round": round,
                    "participants": participants,
                    "fairfed_weights": fairfed,
                    "secure_aggregation": {
                        "key_fingerprint": sa.key_fingerprint.to_string(),
                        "params_fingerprint": sa.params.fingerprint().to_string(),
                        "clip": sa.params.clip(),
                        "base_round": 0,
                        "note": "params are the public initial model (round 0); the model of this round is \
                                 params plus the decrypted aggregates of rounds 0..round, applied in order",
                        "aggregates": listed,
                    },
                }),
            ),
            params: served.params.as_ref().clone(),
            control: None,
        };
        self.store.save(&ckpt).map_err(|e| e.to_string())?;
        let next_phase = if next_round < self.cfg.rounds {
            Phase::Training
        } else {
            Phase::FinalEvaluation
        };
        let served = Self::served(
            &self.cfg,
            &self.specs,
            next_round,
            &next_phase,
            ckpt.params,
            None,
            aggregates,
        );
        Ok((record, Some((served, fairfed))))
    }

    /// The summary written at exit.
    pub fn summary(&self, outcome: &Result<(), String>) -> Summary {
        let st = self.state.lock().expect("state lock");
        let last = st.history.last();
        let model_round = st.round;
        Summary {
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
            model_path: self
                .cfg
                .secagg
                .is_none()
                .then(|| self.store.path_for(model_round).display().to_string()),
            resumed_from_round: self.resumed_from,
            encrypted_model: self
                .cfg
                .secagg
                .as_ref()
                .map(|_| self.store.path_for(model_round).display().to_string()),
        }
    }
}

/// The hospital named by the verified client certificate of a request.
fn peer_hospital<T>(study: &Study, req: &Request<T>) -> Result<String, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated("no client certificate: the aggregator requires mutual TLS")
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    let hospital = caduceus_pki::hospital_from_cert_der(leaf.as_ref())
        .map_err(|e| Status::permission_denied(format!("client certificate: {e}")))?;
    if !study.cfg.hospitals.contains(&hospital) {
        return Err(Status::permission_denied(format!(
            "hospital {hospital:?} is not a participant of study {:?}",
            study.cfg.study_id
        )));
    }
    Ok(hospital)
}

fn check_study(study: &Study, id: &str) -> Result<(), Status> {
    if id != study.cfg.study_id {
        return Err(Status::permission_denied(format!(
            "this aggregator serves study {:?}, not {id:?}",
            study.cfg.study_id
        )));
    }
    Ok(())
}

/// Removes a hospital from the in-flight set when its upload ends, however it ends.
struct InFlight<'a> {
    study: &'a Study,
    hospital: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.study.state.lock() {
            st.in_flight.remove(&self.hospital);
        }
    }
}

/// Refuses an update's `num_examples` that FedAvg cannot use: 0 in a training update (no weight),
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
/// DEADLINE_EXCEEDED, which frees its upload slot.
struct UploadLimits {
    idle: std::time::Duration,
    total: std::time::Duration,
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

fn chunk_status(e: ChunkError) -> Status {
    match e {
        ChunkError::Encrypted { .. } => Status::unimplemented(format!(
            "{e}; secure aggregation is not enabled on this aggregator"
        )),
        other => Status::invalid_argument(other.to_string()),
    }
}

/// The model stream of a secure-aggregation round: header, the public initial model (unless the hospital
/// holds the model of a later round, `have_round`), then the encrypted aggregates from the base round on.
fn secure_stream(served: &Served, have_round: Option<u32>) -> ModelStream {
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
    let data = params.into_iter().flat_map(|p| {
        let n = p.len();
        (0..n.div_ceil(DEFAULT_CHUNK_ELEMS)).map(move |i| {
            let lo = i * DEFAULT_CHUNK_ELEMS;
            let hi = (lo + DEFAULT_CHUNK_ELEMS).min(n);
            ModelChunk {
                kind: Some(model_chunk::Kind::Data(f32_chunk(
                    Vector::Parameters,
                    lo,
                    &p[lo..hi],
                ))),
            }
        })
    });
    let aggs: Vec<(u32, Arc<Vec<Vec<u8>>>)> = served
        .aggregates
        .iter()
        .enumerate()
        .skip(base as usize)
        .map(|(r, a)| (r as u32, a.clone()))
        .collect();
    let enc = aggs.into_iter().flat_map(|(r, a)| {
        let count = a.len() as u32;
        (0..a.len()).map(move |i| ModelChunk {
            kind: Some(model_chunk::Kind::EncryptedAggregate(
                caduceus_proto::EncryptedAggregate {
                    round: r,
                    chunk_index: i as u32,
                    chunk_count: count,
                    data: a[i].clone(),
                },
            )),
        })
    });
    let all: Vec<ModelChunk> = std::iter::once(first).chain(data).chain(enc).collect();
    Box::pin(futures::stream::iter(all.into_iter().map(Ok)))
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct FederationService {
    study: Arc<Study>,
}

impl FederationService {
    pub fn new(study: Arc<Study>) -> Self {
        Self { study }
    }

    async fn receive(&self, req: Request<Streaming<UpdateChunk>>) -> Result<SubmitUpdateResponse, Status> {
        let study = &*self.study;
        let hospital = peer_hospital(study, &req)?;
        let mut stream = req.into_inner();
        let limits = UploadLimits::start(&study.cfg);
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
        check_study(study, &header.study_id)?;
        if !header.hospital.is_empty() && header.hospital != hospital {
            return Err(Status::permission_denied(format!(
                "the header names hospital {:?} but the client certificate names {hospital:?}",
                header.hospital
            )));
        }
        let expected_len = self.study.specs.iter().map(TensorMeta::numel).sum::<usize>() as u64;
        let (round, evaluation_only, _guard) = {
            let mut st = study.state.lock().expect("state lock");
            match &st.phase {
                Phase::Completed => {
                    return Err(Status::failed_precondition(format!(
                        "study {:?} has completed; no more updates are taken",
                        study.cfg.study_id
                    )));
                }
                Phase::Failed(m) => {
                    return Err(Status::failed_precondition(format!("study has failed: {m}")));
                }
                _ => {}
            }
            if header.round != st.round {
                return Err(Status::failed_precondition(format!(
                    "update for round {} but round {} is open",
                    header.round, st.round
                )));
            }
            if !st.accepting {
                return Err(Status::failed_precondition(format!(
                    "round {} is closed and being aggregated",
                    st.round
                )));
            }
            if st.received.contains_key(&hospital) {
                return Err(Status::already_exists(format!(
                    "{hospital} already submitted an update for round {}",
                    st.round
                )));
            }
            if st.in_flight.contains(&hospital) {
                return Err(Status::already_exists(format!(
                    "{hospital} is already uploading an update for round {}",
                    st.round
                )));
            }
            if st.received.len() as u32 >= study.cfg.quorums(st.round).1 {
                return Err(Status::failed_precondition(format!(
                    "round {} already has its {} updates",
                    st.round,
                    study.cfg.quorums(st.round).1
                )));
            }
            st.in_flight.insert(hospital.clone());
            let eval_only = st.phase == Phase::FinalEvaluation;
            (
                st.round,
                eval_only,
                InFlight {
                    study,
                    hospital: hospital.clone(),
                },
            )
        };
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
        let mut encrypted = Vec::new();
        let (delta, control_delta) = if let (Some(sa), false) = (&study.cfg.secagg, evaluation_only) {
            if !header.secure_aggregation {
                return Err(Status::failed_precondition(
                    "this study runs secure aggregation: plaintext updates are refused (start the trainer \
                     with --secure-aggregation tfhe --study-key PATH)",
                ));
            }
            if header.key_fingerprint != sa.key_fingerprint.to_string() {
                return Err(Status::failed_precondition(format!(
                    "update encrypted under key {:?}, but this study's key fingerprint is {}",
                    header.key_fingerprint, sa.key_fingerprint
                )));
            }
            if header.num_parameters != expected_len {
                return Err(Status::invalid_argument(format!(
                    "update has {} parameters, the {} model has {expected_len}",
                    header.num_parameters, study.cfg.arch
                )));
            }
            encrypted =
                receive_encrypted(study, sa, &hospital, round, expected_len, &mut stream, &limits).await?;
            (Vec::new(), None)
        } else if !evaluation_only && header.secure_aggregation {
            return Err(Status::failed_precondition(
                "encrypted update, but secure aggregation is not enabled on this aggregator",
            ));
        } else if evaluation_only {
            if limits.next(&mut stream).await?.is_some() {
                return Err(Status::invalid_argument(
                    "an evaluation-only update carries no parameter chunks",
                ));
            }
            (Vec::new(), None)
        } else {
            if header.num_parameters != expected_len {
                return Err(Status::invalid_argument(format!(
                    "update has {} parameters, the {} model has {expected_len}",
                    header.num_parameters, study.cfg.arch
                )));
            }
            let wants_control = study.cfg.strategy.uses_control();
            if header.has_control != wants_control {
                return Err(Status::invalid_argument(if wants_control {
                    "SCAFFOLD updates must carry a control-variate delta"
                } else {
                    "this study's strategy takes no control-variate delta"
                }));
            }
            let mut params = VectorAssembler::new(Vector::Parameters, expected_len);
            let mut control = wants_control.then(|| VectorAssembler::new(Vector::Control, expected_len));
            while let Some(msg) = limits.next(&mut stream).await? {
                let Some(update_chunk::Kind::Data(chunk)) = msg.kind else {
                    return Err(Status::invalid_argument("a second header in the update stream"));
                };
                if matches!(chunk.payload, Some(data_chunk::Payload::Encrypted(_))) {
                    return Err(Status::unimplemented(
                        "encrypted (secure-aggregation) payloads are not enabled on this aggregator",
                    ));
                }
                if chunk.vector == Vector::Control as i32 {
                    match control.as_mut() {
                        Some(c) => c.push(&chunk).map_err(chunk_status)?,
                        None => {
                            return Err(Status::invalid_argument(
                                "control-variate chunk in an update without one",
                            ));
                        }
                    }
                } else {
                    params.push(&chunk).map_err(chunk_status)?;
                }
            }
            let delta = params.finish().map_err(chunk_status)?;
            let control_delta = control
                .map(VectorAssembler::finish)
                .transpose()
                .map_err(chunk_status)?;
            (delta, control_delta)
        };
        let received = Received {
            num_examples: header.num_examples,
            delta,
            control_delta,
            evaluation,
            local_steps: header.local_steps,
            train_loss: header.train_loss,
            privacy: header.privacy,
            encrypted,
        };
        let count = {
            let mut st = study.state.lock().expect("state lock");
            if st.round != round || !st.accepting || st.phase.is_over() {
                return Err(Status::failed_precondition(format!(
                    "round {round} closed while the update was uploading"
                )));
            }
            if st.received.len() as u32 >= study.cfg.quorums(round).1 {
                return Err(Status::failed_precondition(format!(
                    "round {round} already has its {} updates",
                    study.cfg.quorums(round).1
                )));
            }
            st.received.insert(hospital.clone(), received);
            st.received.len() as u32
        };
        tracing::info!(%hospital, round, received = count, "update accepted");
        study.arrivals.notify_one();
        Ok(SubmitUpdateResponse {
            round,
            hospital,
            received: count,
        })
    }
}

/// Reads and validates an encrypted update: one caduceus-secagg message per data chunk, bound to this
/// study, round, key and parameters, from the authenticated hospital, complete, of the model's length.
async fn receive_encrypted(
    study: &Study,
    sa: &crate::config::SecAggConfig,
    hospital: &str,
    round: u32,
    expected_len: u64,
    stream: &mut Streaming<UpdateChunk>,
    limits: &UploadLimits,
) -> Result<Vec<Vec<u8>>, Status> {
    let mut check = caduceus_secagg::Aggregator::new(&sa.params, &study.cfg.study_id, u64::from(round))
        .map_err(|e| Status::internal(e.to_string()))?
        .expect_key_fingerprint(sa.key_fingerprint);
    let expected_chunks = sa.params.chunk_count(expected_len);
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut offset = 0u64;
    while let Some(msg) = limits.next(stream).await? {
        let Some(update_chunk::Kind::Data(chunk)) = msg.kind else {
            return Err(Status::invalid_argument("a second header in the update stream"));
        };
        let Some(data_chunk::Payload::Encrypted(bytes)) = chunk.payload else {
            return Err(Status::invalid_argument(
                "plaintext data chunk in an encrypted update (secure aggregation)",
            ));
        };
        if bytes.is_empty() {
            return Err(Status::invalid_argument(format!(
                "encrypted data chunk {} (at byte offset {}) carries no data; empty chunks are refused",
                out.len(),
                chunk.offset
            )));
        }
        if chunk.vector != Vector::Parameters as i32 {
            return Err(Status::invalid_argument(
                "encrypted updates carry only the parameter delta",
            ));
        }
        if chunk.offset != offset {
            return Err(Status::invalid_argument(format!(
                "encrypted chunk at byte offset {}, expected {offset} (chunks must be contiguous)",
                chunk.offset
            )));
        }
        if out.len() as u64 >= expected_chunks {
            return Err(Status::invalid_argument(format!(
                "more than the {expected_chunks} ciphertext chunks a {expected_len}-parameter delta has"
            )));
        }
        let header = caduceus_secagg::wire::decode_hospital_chunk(&sa.params, &bytes)
            .map_err(secagg_status)?
            .header;
        if header.total_values != expected_len {
            return Err(Status::invalid_argument(format!(
                "the ciphertext holds {} values, the {} model has {expected_len}",
                header.total_values, study.cfg.arch
            )));
        }
        check.add_chunk_from(hospital, &bytes, 1).map_err(secagg_status)?;
        offset += bytes.len() as u64;
        out.push(bytes.to_vec());
    }
    check.finish().map_err(secagg_status)?;
    Ok(out)
}

type ModelStream = Pin<Box<dyn Stream<Item = Result<ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for FederationService {
    type GetGlobalModelStream = ModelStream;

    async fn get_global_model(
        &self,
        req: Request<GetGlobalModelRequest>,
    ) -> Result<Response<Self::GetGlobalModelStream>, Status> {
        let study = &*self.study;
        let hospital = peer_hospital(study, &req)?;
        let req = req.into_inner();
        check_study(study, &req.study_id)?;
        let served = {
            let st = study.state.lock().expect("state lock");
            if let Phase::Failed(m) = &st.phase {
                return Err(Status::failed_precondition(format!("study has failed: {m}")));
            }
            if st.phase == Phase::Completed {
                return Err(Status::failed_precondition("the study has completed"));
            }
            if req.round != st.round {
                return Err(Status::failed_precondition(format!(
                    "round {} requested but round {} is being served",
                    req.round, st.round
                )));
            }
            st.served.clone()
        };
        tracing::debug!(%hospital, round = req.round, "serving global model");
        if study.cfg.secagg.is_some() {
            return Ok(Response::new(secure_stream(&served, req.have_round)));
        }
        let header = ModelChunk {
            kind: Some(model_chunk::Kind::Header(served.header.clone())),
        };
        let params = served.params.clone();
        let control = served.control.clone();
        let n = params.len();
        let chunks = n.div_ceil(DEFAULT_CHUNK_ELEMS);
        let data = (0..chunks).map(move |i| {
            let lo = i * DEFAULT_CHUNK_ELEMS;
            let hi = (lo + DEFAULT_CHUNK_ELEMS).min(n);
            Some(ModelChunk {
                kind: Some(model_chunk::Kind::Data(f32_chunk(
                    Vector::Parameters,
                    lo,
                    &params[lo..hi],
                ))),
            })
        });
        let cdata = control.into_iter().flat_map(move |c| {
            let n = c.len();
            (0..n.div_ceil(DEFAULT_CHUNK_ELEMS)).map(move |i| {
                let lo = i * DEFAULT_CHUNK_ELEMS;
                let hi = (lo + DEFAULT_CHUNK_ELEMS).min(n);
                Some(ModelChunk {
                    kind: Some(model_chunk::Kind::Data(f32_chunk(
                        Vector::Control,
                        lo,
                        &c[lo..hi],
                    ))),
                })
            })
        });
        let all = std::iter::once(Some(header))
            .chain(data)
            .chain(cdata)
            .flatten()
            .map(Ok);
        let stream: ModelStream = Box::pin(futures::stream::iter(all));
        Ok(Response::new(stream))
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
        peer_hospital(study, &req)?;
        let req = req.into_inner();
        check_study(study, &req.study_id)?;
        if let Some(target) = req.wait_for_round {
            let mut rx = study.changes.subscribe();
            let wait = std::time::Duration::from_millis(req.wait_timeout_ms.min(60_000) as u64);
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
        Ok(Response::new(study.status()))
    }
}
