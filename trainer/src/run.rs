//! The trainer's main loop.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use caduceus_dataset::{Attribute, ImageSet, LoaderConfig, ShardManifests};
use caduceus_models::{Arch, ClientStrategy, Model, TrainConfig, train_local};
use caduceus_proto::{
    ClientError, ClientTls, Evaluation, FederationClient, GlobalModel, RoundStatus, StudyPhase, UpdateHeader,
    evaluation_to_proto,
};
use serde::Serialize;
use tracing::Instrument;

use crate::config::{RoundSpec, TrainerArgs};
use crate::eval::evaluate_counts;

/// What the trainer did in one round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub evaluation_only: bool,
    pub val_examples: u64,
    pub val_accuracy: Option<f64>,
    pub val_loss: Option<f64>,
    pub train_examples: usize,
    pub local_steps: usize,
    pub train_loss: Option<f32>,
    pub train_seconds: f64,
    pub images_per_second: Option<f64>,
    pub round_seconds: f64,
    /// DP-SGD only: what this round ran (σ, q, steps, C) and ε spent so far (δ = --dp-delta).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::dp::RoundPrivacy>,
    /// Under DP: the evaluation counts' release this round (z, noise, what was released, ε of the
    /// evaluation releases so far and ε spent in all). `val_*` above are the exact local figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluation_privacy: Option<crate::dp::EvaluationPrivacyReport>,
}

/// The one-line JSON summary.
#[derive(Debug, Clone, Serialize)]
pub struct TrainerSummary {
    pub hospital: String,
    pub study_id: String,
    pub status: &'static str,
    pub message: String,
    pub rounds: Vec<RoundReport>,
}

/// An update kept until the aggregator confirms the next round (it is resent if the aggregator
/// restarted and lost it).
struct Pending {
    round: u32,
    header: UpdateHeader,
    delta: Vec<f32>,
    control_delta: Option<Vec<f32>>,
    /// Secure aggregation: the encrypted delta (sent instead of `delta`, which stays empty).
    encrypted: Option<Vec<Vec<u8>>>,
}

struct Trainer<'r> {
    args: TrainerArgs,
    client: FederationClient,
    train: Arc<ImageSet>,
    val: Arc<ImageSet>,
    local_control: Option<Vec<f32>>,
    reports: &'r mut Vec<RoundReport>,
    accounting: crate::dp::Accounting,
    /// Secure aggregation (TFHE): key and the newest rebuilt model.
    secure: Option<crate::secure::SecureSession>,
}

fn load_set(
    dir: &Path,
    part: &str,
    image_root: Option<&Path>,
    task: Attribute,
    threads: usize,
) -> anyhow::Result<ImageSet> {
    let shard = ShardManifests::read(dir).with_context(|| format!("--shard {}", dir.display()))?;
    let mut manifest = if part == "train" { shard.train } else { shard.val };
    if let Some(root) = image_root {
        manifest.image_root = root.to_path_buf();
    }
    let cfg = LoaderConfig {
        threads,
        ..LoaderConfig::default()
    };
    ImageSet::load(&manifest, task, &cfg).with_context(|| format!("loading {part} images"))
}

fn control_path(dir: &Path) -> PathBuf {
    dir.join("scaffold-local-control.f32")
}

fn load_control(dir: Option<&Path>, n: usize) -> anyhow::Result<Option<Vec<f32>>> {
    let Some(dir) = dir else { return Ok(None) };
    let p = control_path(dir);
    match std::fs::read(&p) {
        Ok(b) if b.len() == n * 4 => Ok(Some(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )),
        Ok(b) => bail!(
            "{}: {} bytes, expected {} for a {n}-parameter control variate",
            p.display(),
            b.len(),
            n * 4
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("{}: {e}", p.display())),
    }
}

fn save_control(dir: &Path, c: &[f32]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--state-dir {}", dir.display()))?;
    let bytes: Vec<u8> = c.iter().flat_map(|v| v.to_le_bytes()).collect();
    caduceus_aggregation::checkpoint::write_atomic(&control_path(dir), &bytes).map_err(|e| anyhow!("{e}"))
}

impl Trainer<'_> {
    async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut(FederationClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let start = Instant::now();
        let window = Duration::from_secs(self.args.retry_secs);
        let mut backoff = Duration::from_millis(200);
        loop {
            match f(self.client.clone()).await {
                Ok(x) => return Ok(x),
                Err(e) if e.is_transient() && start.elapsed() < window => {
                    tracing::warn!("{what}: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until round `round` is open (or the study is over), resending `pending` if the aggregator
    /// lost it in a restart.
    async fn wait_for_round(&mut self, round: u32, pending: Option<&Pending>) -> anyhow::Result<RoundStatus> {
        loop {
            let st = self
                .retry("round status", |mut c| async move {
                    c.status(Some(round), Duration::from_secs(20)).await
                })
                .await
                .context("asking the aggregator for the round status")?;
            let phase = StudyPhase::try_from(st.phase).unwrap_or(StudyPhase::Unspecified);
            if phase == StudyPhase::Failed {
                bail!("the study failed: {}", st.message);
            }
            if phase == StudyPhase::Completed || st.current_round >= round {
                return Ok(st);
            }
            if let Some(p) = pending
                && st.current_round == p.round
                && !st.received_from.contains(&self.args.hospital)
            {
                tracing::warn!(
                    round = p.round,
                    "the aggregator does not have our update (it restarted?); sending it again"
                );
                self.send(p).await?;
            }
        }
    }

    async fn send(&self, p: &Pending) -> anyhow::Result<()> {
        let span = tracing::info_span!(
            "upload",
            caduceus.round = p.round,
            encrypted = p.encrypted.is_some()
        );
        self.send_update(p).instrument(span).await
    }

    async fn send_update(&self, p: &Pending) -> anyhow::Result<()> {
        let r = self
            .retry("submit update", |mut c| {
                let h = p.header.clone();
                async move {
                    match &p.encrypted {
                        Some(msgs) => c.submit_encrypted(h, msgs).await,
                        None => c.submit(h, Some(&p.delta), p.control_delta.as_deref()).await,
                    }
                }
            })
            .await;
        match r {
            Ok(resp) => {
                tracing::info!(round = resp.round, received = resp.received, "update accepted");
                Ok(())
            }
            Err(e) if e.code() == Some(caduceus_proto::Code::AlreadyExists) => {
                tracing::info!(round = p.round, "the aggregator already has our update");
                Ok(())
            }
            Err(e) => Err(anyhow!(e)).with_context(|| format!("sending the update for round {}", p.round)),
        }
    }

    async fn fetch(&mut self, round: u32) -> anyhow::Result<GlobalModel> {
        let span = tracing::info_span!("fetch global model", caduceus.round = round);
        self.fetch_model(round).instrument(span).await
    }

    async fn fetch_model(&mut self, round: u32) -> anyhow::Result<GlobalModel> {
        if self.secure.is_some() {
            return self.fetch_secure(round).await;
        }
        self.retry(
            "fetch global model",
            |mut c| async move { c.fetch_model(round).await },
        )
        .await
        .with_context(|| format!("fetching the global model of round {round}"))
    }

    /// Secure aggregation: fetches the encrypted aggregates this hospital lacks and rebuilds the model.
    async fn fetch_secure(&mut self, round: u32) -> anyhow::Result<GlobalModel> {
        let have = self.secure.as_ref().and_then(|s| s.have_round());
        let sgm = self
            .retry("fetch global model", |mut c| async move {
                c.fetch_secure_model(round, have).await
            })
            .await
            .with_context(|| format!("fetching the encrypted aggregates of round {round}"))?;
        let mut sec = self.secure.take().expect("secure session");
        let (sec, out) = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let r = sec.model_for(&sgm).map(|p| (sgm.header, p));
            tracing::info!(
                round,
                aggregates = sgm.aggregates.len(),
                seconds = t.elapsed().as_secs_f64(),
                "decrypted"
            );
            (sec, r)
        })
        .await
        .context("decryption task panicked")?;
        self.secure = Some(sec);
        let (header, params) = out?;
        Ok(GlobalModel {
            header,
            params,
            control: None,
        })
    }

    /// One round: evaluate, then (unless evaluation-only) train and send. Returns the pending update.
    async fn round(&mut self, round: u32) -> anyhow::Result<Option<Pending>> {
        let t0 = Instant::now();
        let gm = self.fetch(round).await?;
        let header = gm.header.clone();
        if self.local_control.is_none()
            && let Some(dir) = &self.args.state_dir
        {
            // Resume SCAFFOLD's local control variate after a restart.
            self.local_control = load_control(Some(dir), gm.params.len())?;
        }
        let arch: Arch = header
            .arch
            .parse()
            .map_err(|e: String| anyhow!("the aggregator serves an unknown model: {e}"))?;
        let classes = self.args.task.num_classes();
        let strategy = caduceus_proto::Strategy::try_from(header.strategy)
            .unwrap_or(caduceus_proto::Strategy::Unspecified);
        let args = self.args.clone();
        let (train, val) = (self.train.clone(), self.val.clone());
        let local_control = self.local_control.clone();
        let eval_only = header.evaluation_only;
        let mu = header.proximal_mu;
        // DP: reserve the round's planned spending (persisted) before touching the data: its DP-SGD
        // steps (training rounds) and the release of its evaluation counts (every round).
        let dp = self.args.dp.config(self.args.batch_size, self.train.len())?;
        let eval_release = self.args.dp.evaluation_mechanism()?;
        if let (Some(dp), Some(eval_release)) = (&dp, eval_release) {
            let mut plan = Vec::new();
            if !eval_only {
                plan.push(crate::dp::planned(&self.args, dp)?);
            }
            plan.push(eval_release);
            self.accounting.reserve(&self.args.study_id, round, &plan)?;
        }
        let eval_noise = match eval_release {
            Some(m) => Some(
                caduceus_privacy::evaluation::CountNoise::new(
                    m.noise_multiplier,
                    crate::eval::released_tables(&self.args.sensitive, self.args.task),
                )
                .context("--dp-eval-noise-multiplier")?,
            ),
            None => None,
        };
        // Candle work is blocking: run it off the async threads (in the round's span).
        let round_span = tracing::Span::current();
        let out = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let _round = round_span.enter();
            let mut model = Model::from_flat(arch, classes, &gm.params)
                .with_context(|| format!("the global model does not fit {arch} with {classes} classes"))?;
            let eval = tracing::info_span!("local evaluation", caduceus.round = round, examples = val.len())
                .in_scope(|| {
                    evaluate_counts(
                        &model,
                        &val,
                        &args.sensitive,
                        args.positive_class,
                        args.eval_batch_size,
                    )
                })
                .context("evaluating the global model on local validation data")?;
            // Under DP what leaves the hospital is the noised release of the counts.
            let released = match eval_noise {
                Some(mut noise) => Some(
                    crate::eval::release_counts(&eval, &args.sensitive, args.task, &mut noise)
                        .context("releasing the evaluation counts under DP")?,
                ),
                None => None,
            };
            if eval_only {
                return Ok((eval, released, None));
            }
            let cfg = TrainConfig {
                epochs: args.epochs,
                max_steps: args.max_steps,
                batch_size: args.batch_size,
                optimizer: args.optimizer(),
                seed: args.seed ^ (u64::from(round) << 32) ^ 0x5eed,
                augment: args.augment,
            };
            let zeros;
            let client_strategy = match strategy {
                caduceus_proto::Strategy::Fedprox => ClientStrategy::FedProx { mu },
                caduceus_proto::Strategy::Scaffold => {
                    let global = gm
                        .control
                        .as_deref()
                        .ok_or_else(|| anyhow!("SCAFFOLD model without a server control variate"))?;
                    zeros = vec![0.0; gm.params.len()];
                    ClientStrategy::Scaffold {
                        global_control: global,
                        local_control: local_control.as_deref().unwrap_or(&zeros),
                    }
                }
                _ => ClientStrategy::FedAvg,
            };
            let training = tracing::info_span!(
                "local training",
                caduceus.round = round,
                dp_sgd = dp.is_some(),
                examples = train.len(),
                steps = tracing::field::Empty
            );
            let outcome = training.in_scope(|| -> anyhow::Result<_> {
                let outcome = match &dp {
                    Some(dp) => {
                        caduceus_models::train_local_dp(&mut model, &train, &cfg, client_strategy, dp)
                            .context("local training (DP-SGD)")?
                    }
                    None => {
                        train_local(&mut model, &train, &cfg, client_strategy).context("local training")?
                    }
                };
                tracing::Span::current().record("steps", outcome.steps);
                Ok(outcome)
            })?;
            let delta: Vec<f32> = outcome
                .params
                .iter()
                .zip(&gm.params)
                .map(|(y, x)| y - x)
                .collect();
            Ok((eval, released, Some((outcome, delta))))
        })
        .await
        .context("training task panicked")??;
        let (eval, released, trained): (Evaluation, Option<Evaluation>, _) = out;
        let mut report = RoundReport {
            round,
            evaluation_only: eval_only,
            val_examples: eval.examples,
            val_accuracy: eval.accuracy(),
            val_loss: eval.mean_loss(),
            train_examples: 0,
            local_steps: 0,
            train_loss: None,
            train_seconds: 0.0,
            images_per_second: None,
            round_seconds: 0.0,
            privacy: None,
            evaluation_privacy: None,
        };
        let mut uh = UpdateHeader {
            round,
            hospital: self.args.hospital.clone(),
            evaluation: Some(evaluation_to_proto(released.as_ref().unwrap_or(&eval))),
            evaluation_only: eval_only,
            ..Default::default()
        };
        // The evaluation release to commit (under DP) and what was released.
        let eval_commit = eval_release.zip(released.as_ref());
        let pending = match trained {
            None => {
                if let Some((m, r)) = eval_commit {
                    report.evaluation_privacy = Some(crate::dp::record_evaluation(
                        &mut self.accounting,
                        &self.args,
                        round,
                        m,
                        r,
                    )?);
                }
                self.send(&Pending {
                    round,
                    header: uh,
                    delta: Vec::new(),
                    control_delta: None,
                    encrypted: None,
                })
                .await?;
                None
            }
            Some((outcome, delta)) => {
                uh.num_examples = outcome.num_examples as u64;
                uh.local_steps = outcome.steps as u64;
                uh.train_loss = outcome.mean_loss as f64;
                report.train_examples = outcome.num_examples;
                report.local_steps = outcome.steps;
                report.train_loss = Some(outcome.mean_loss);
                report.train_seconds = outcome.seconds;
                report.images_per_second = Some(outcome.images_per_second());
                match &outcome.privacy {
                    Some(spend) => {
                        let (proto, rp, ep) = crate::dp::record_spend(
                            &mut self.accounting,
                            &self.args,
                            round,
                            spend,
                            eval_commit,
                        )?;
                        uh.privacy = Some(proto);
                        // The training loss is not noised: it stays in the local summary only.
                        uh.train_loss = 0.0;
                        report.privacy = Some(rp);
                        report.evaluation_privacy = ep;
                    }
                    None => {
                        if let Some((m, r)) = eval_commit {
                            report.evaluation_privacy = Some(crate::dp::record_evaluation(
                                &mut self.accounting,
                                &self.args,
                                round,
                                m,
                                r,
                            )?);
                        }
                    }
                }
                let control_delta = outcome.control.as_ref().map(|c| c.delta.clone());
                let mut p = Pending {
                    round,
                    header: uh,
                    delta,
                    control_delta,
                    encrypted: None,
                };
                if let Some(sec) = &self.secure {
                    encrypt_pending(sec, &mut p)?;
                }
                self.send(&p).await?;
                if let Some(c) = outcome.control {
                    if let Some(dir) = &self.args.state_dir {
                        save_control(dir, &c.local_control)?;
                    }
                    self.local_control = Some(c.local_control);
                }
                Some(p)
            }
        };
        report.round_seconds = t0.elapsed().as_secs_f64();
        tracing::info!(
            round,
            val_accuracy = ?report.val_accuracy,
            released_accuracy = ?report.evaluation_privacy.as_ref().and_then(|e| e.released_accuracy),
            train_loss = ?report.train_loss,
            clipped_fraction = ?report.privacy.as_ref().map(|p| p.clipping.clipped_fraction),
            grad_norm_median = ?report.privacy.as_ref().map(|p| p.clipping.norm_median),
            seconds = report.round_seconds,
            "round done"
        );
        self.reports.push(report);
        Ok(pending)
    }
}

async fn run_inner(args: TrainerArgs, reports: &mut Vec<RoundReport>) -> anyhow::Result<String> {
    args.validate()?;
    let pem = caduceus_startup::MtlsPem::read(&args.tls_cert, &args.tls_key, &args.tls_ca)?;
    let tls = ClientTls {
        ca_pem: pem.ca,
        cert_pem: pem.cert,
        key_pem: pem.key,
        server_name: args.server_name(),
    };
    let (shard, root, task, threads) = (
        args.shard.clone(),
        args.image_root.clone(),
        args.task,
        args.loader_threads,
    );
    let (train, val) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let train = load_set(&shard, "train", root.as_deref(), task, threads)?;
        let val = load_set(&shard, "val", root.as_deref(), task, threads)?;
        Ok((train, val))
    })
    .await
    .context("data loading task panicked")??;
    if train.is_empty() {
        bail!("the shard's training part is empty");
    }
    if val.is_empty() {
        bail!("the shard's validation part is empty; federated evaluation needs local validation data");
    }
    tracing::info!(train = train.len(), val = val.len(), "shard loaded");

    // Connect, retrying while the aggregator starts.
    let start = Instant::now();
    let client = loop {
        match FederationClient::connect(&args.aggregator, &tls, &args.study_id).await {
            Ok(c) => break c,
            Err(e) if e.is_transient() && start.elapsed() < Duration::from_secs(args.retry_secs) => {
                tracing::warn!("{e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow!(e)),
        }
    };
    let accounting = crate::dp::Accounting::open(&args.dp, args.state_dir.as_deref())?;
    let secure = match (secure_mode(&args), &args.study_key) {
        (true, Some(path)) => Some(crate::secure::SecureSession::open(
            path,
            &args.study_id,
            &args.hospital,
            args.secagg_clip,
            args.secagg_min_contributors,
        )?),
        _ => None,
    };
    let mut t = Trainer {
        accounting,
        secure,
        client,
        train: Arc::new(train),
        val: Arc::new(val),
        local_control: None,
        reports,
        args,
    };
    let (first, last) = match t.args.rounds {
        RoundSpec::Range(a, b) => (a, Some(b)),
        RoundSpec::Follow => {
            let st = t
                .retry("round status", |mut c| async move {
                    c.status(None, Duration::ZERO).await
                })
                .await
                .context("asking the aggregator for the round status")?;
            (st.current_round, None)
        }
    };
    let mut round = first;
    let mut pending: Option<Pending> = None;
    let message = loop {
        if last.is_some_and(|l| round > l) {
            break format!("took part in rounds {first}..={}", round - 1);
        }
        let st = t.wait_for_round(round, pending.as_ref()).await?;
        let phase = StudyPhase::try_from(st.phase).unwrap_or(StudyPhase::Unspecified);
        if phase == StudyPhase::Completed {
            break format!("the study completed after round {}", st.total_rounds);
        }
        if st.current_round > round {
            tracing::warn!(
                missed = round,
                current = st.current_round,
                "round closed without us; joining the current round"
            );
            round = st.current_round;
            if last.is_some_and(|l| round > l) {
                continue;
            }
        }
        let span = tracing::info_span!(
            "trainer round",
            caduceus.study = %t.args.study_id,
            caduceus.round = round,
            caduceus.hospital = %t.args.hospital
        );
        let p = match t.round(round).instrument(span).await {
            Ok(p) => p,
            Err(e) if e.downcast_ref::<crate::dp::BudgetExhausted>().is_some() => break e.to_string(),
            Err(e) => return Err(e),
        };
        let was_eval_only = p.is_none() && t.reports.last().is_some_and(|r| r.evaluation_only);
        pending = p;
        if was_eval_only {
            break format!("evaluated the final model of round {round}");
        }
        round += 1;
    };
    Ok(message)
}

fn secure_mode(args: &TrainerArgs) -> bool {
    args.secure_aggregation == crate::config::SecureAggregationMode::Tfhe
}

/// Replaces the plaintext delta of `p` by its encryption (the plaintext never leaves the hospital).
fn encrypt_pending(sec: &crate::secure::SecureSession, p: &mut Pending) -> anyhow::Result<()> {
    if p.control_delta.is_some() {
        bail!("secure aggregation does not support SCAFFOLD (control variates)");
    }
    let _span =
        tracing::info_span!("encryption", caduceus.round = p.round, parameters = p.delta.len()).entered();
    let t = Instant::now();
    let msgs = sec.encrypt(p.round, &p.delta)?;
    tracing::info!(
        round = p.round,
        bytes = msgs.iter().map(Vec::len).sum::<usize>(),
        seconds = t.elapsed().as_secs_f64(),
        "update encrypted"
    );
    p.header.num_parameters = p.delta.len() as u64;
    p.header.key_fingerprint = sec.fingerprint_hex();
    p.header.secure_aggregation = true;
    p.encrypted = Some(msgs);
    p.delta = Vec::new();
    Ok(())
}

/// Runs the trainer; returns the exit code (0 success, 1 failure) after writing the summary.
pub async fn run(args: TrainerArgs) -> u8 {
    let (hospital, study_id, summary_path) = (
        args.hospital.clone(),
        args.study_id.clone(),
        args.summary_path.clone(),
    );
    let mut reports = Vec::new();
    // The process's span, in the round's trace when the operator passed one (TRACEPARENT).
    let span = tracing::info_span!("trainer", caduceus.study = %study_id, caduceus.hospital = %hospital);
    caduceus_startup::otel::continue_trace(&span, caduceus_startup::otel::env_traceparent().as_deref());
    let result = run_inner(args, &mut reports).instrument(span).await;
    let (status, message, code) = match &result {
        Ok(m) => ("succeeded", m.clone(), 0),
        Err(e) => ("failed", format!("{e:#}"), 1),
    };
    if let Err(e) = &result {
        eprintln!("error: {e:#}");
    }
    let summary = TrainerSummary {
        hospital,
        study_id,
        status,
        message,
        rounds: reports,
    };
    let line = serde_json::to_string(&summary).unwrap_or_else(|_| "{}".into());
    if let Some(p) = summary_path {
        if let Some(parent) = p.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if let Err(e) = std::fs::write(&p, format!("{line}\n")) {
            eprintln!("error: cannot write the summary {}: {e}", p.display());
        }
    }
    code
}
