//! DP-SGD settings of the trainer and its own privacy ledger.
//!
//! With `--dp-noise-multiplier` the trainer trains with DP-SGD ([`caduceus_models::train_local_dp`])
//! and reports what it ran (σ, q, steps, C) in the update's `PrivacySpend`. With
//! `--dp-epsilon-budget` it also keeps a ledger of its own spending (`--privacy-ledger`, default
//! `<state-dir>/privacy-ledger.json`, else in memory) and, before each round, reserves the round's
//! planned mechanism: if the projected ε would exceed the budget it trains no more and leaves the
//! study. The hospital enforces its own budget; the runner's plan (`caduceus simulate`) is a
//! second, matching check, not the only one.
//!
//! Under DP the evaluation counts the trainer sends every round are released through a Gaussian
//! mechanism too (`--dp-eval-noise-multiplier` z, required with `--dp-noise-multiplier`; see
//! [`caduceus_privacy::evaluation`]): each round reserves and commits that release,
//! `SubsampledGaussian { z, 1.0, 1 }`, beside the round's DP-SGD steps (alone in the
//! evaluation-only final round), so the ledger and the budget include them.
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use caduceus_models::DpConfig;
use caduceus_privacy::ledger::{LedgerError, PrivacyBudget, PrivacyLedger, RoundKey};
use caduceus_privacy::{AccountantKind, SubsampledGaussian};
use clap::Args;

/// DP-SGD flags (also environment variables).
#[derive(Args, Debug, Clone)]
pub struct DpArgs {
    /// Train with DP-SGD at this noise multiplier σ (noise standard deviation σ·C). DP is off
    /// without it.
    #[arg(long, env = "CADUCEUS_DP_NOISE_MULTIPLIER")]
    pub dp_noise_multiplier: Option<f64>,
    /// DP-SGD per-example clip norm C.
    #[arg(long, env = "CADUCEUS_DP_CLIP_NORM", default_value_t = 1.0)]
    pub dp_clip_norm: f64,
    /// DP-SGD Poisson sampling rate q (default: batch size / training examples).
    #[arg(long, env = "CADUCEUS_DP_SAMPLE_RATE")]
    pub dp_sample_rate: Option<f64>,
    /// This hospital's privacy budget ε: no round is trained whose projected ε exceeds it.
    #[arg(long, env = "CADUCEUS_DP_EPSILON_BUDGET")]
    pub dp_epsilon_budget: Option<f64>,
    /// δ of the budget and of the ε reported per round.
    #[arg(long, env = "CADUCEUS_DP_DELTA", default_value_t = 1e-5)]
    pub dp_delta: f64,
    /// Where this hospital's privacy ledger is kept (JSON; default <state-dir>/privacy-ledger.json).
    #[arg(long, env = "CADUCEUS_PRIVACY_LEDGER")]
    pub privacy_ledger: Option<PathBuf>,
    /// Noise multiplier z of the evaluation counts under DP: every released count gets discrete
    /// Gaussian noise of standard deviation z·√tables (one table per sensitive attribute, their
    /// intersection, the overall counts, and the correct count of a multi-class task), and each
    /// round's release is counted in the ledger as a Gaussian mechanism at z. Required with
    /// --dp-noise-multiplier: the trainer never sends exact counts under DP.
    #[arg(long, env = "CADUCEUS_DP_EVAL_NOISE_MULTIPLIER")]
    pub dp_eval_noise_multiplier: Option<f64>,
}

impl DpArgs {
    /// Checks the values, naming the flag that is wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(s) = self.dp_noise_multiplier
            && !(s.is_finite() && s > 0.0)
        {
            bail!("--dp-noise-multiplier must be a positive number, got {s}");
        }
        if !(self.dp_clip_norm.is_finite() && self.dp_clip_norm > 0.0) {
            bail!(
                "--dp-clip-norm must be a positive number, got {}",
                self.dp_clip_norm
            );
        }
        if let Some(q) = self.dp_sample_rate
            && !(q > 0.0 && q <= 1.0)
        {
            bail!("--dp-sample-rate must be in (0, 1], got {q}");
        }
        if let Some(e) = self.dp_epsilon_budget
            && !(e.is_finite() && e > 0.0)
        {
            bail!("--dp-epsilon-budget must be a positive number, got {e}");
        }
        if !(self.dp_delta > 0.0 && self.dp_delta < 1.0) {
            bail!("--dp-delta must be in (0, 1), got {}", self.dp_delta);
        }
        if self.dp_noise_multiplier.is_none()
            && (self.dp_sample_rate.is_some() || self.dp_epsilon_budget.is_some())
        {
            bail!("--dp-sample-rate and --dp-epsilon-budget need --dp-noise-multiplier (DP-SGD is off)");
        }
        match (self.dp_noise_multiplier, self.dp_eval_noise_multiplier) {
            (Some(_), None) => bail!(
                "--dp-noise-multiplier needs --dp-eval-noise-multiplier (CADUCEUS_DP_EVAL_NOISE_MULTIPLIER): \
                 under DP the evaluation counts are released through a Gaussian mechanism whose noise \
                 multiplier must be given; the trainer never sends exact counts under DP"
            ),
            (None, Some(_)) => {
                bail!("--dp-eval-noise-multiplier needs --dp-noise-multiplier (DP-SGD is off)")
            }
            (Some(_), Some(z)) if !(z.is_finite() && z > 0.0) => {
                bail!("--dp-eval-noise-multiplier must be a positive number, got {z}")
            }
            _ => {}
        }
        Ok(())
    }

    /// The evaluation release of one round under DP, `SubsampledGaussian { z, 1.0, 1 }`, or `None`
    /// when DP is off.
    pub fn evaluation_mechanism(&self) -> anyhow::Result<Option<SubsampledGaussian>> {
        match (self.dp_noise_multiplier, self.dp_eval_noise_multiplier) {
            (Some(_), Some(z)) => Ok(Some(
                caduceus_privacy::evaluation_mechanism(z, 1).context("--dp-eval-noise-multiplier")?,
            )),
            (Some(_), None) => bail!("--dp-noise-multiplier needs --dp-eval-noise-multiplier"),
            _ => Ok(None),
        }
    }

    /// The DP-SGD settings for `train_examples` local examples and `batch_size`, if DP is on.
    pub fn config(&self, batch_size: usize, train_examples: usize) -> anyhow::Result<Option<DpConfig>> {
        let Some(sigma) = self.dp_noise_multiplier else {
            return Ok(None);
        };
        let q = match self.dp_sample_rate {
            Some(q) => q,
            None => (batch_size as f64 / train_examples.max(1) as f64).min(1.0),
        };
        let cfg = DpConfig {
            noise_multiplier: sigma,
            clip_norm: self.dp_clip_norm,
            sample_rate: q,
        };
        cfg.validate().context("--dp-sample-rate")?;
        Ok(Some(cfg))
    }
}

/// Left the study: the next round would exceed the privacy budget.
#[derive(Debug)]
pub struct BudgetExhausted(pub String);

impl std::fmt::Display for BudgetExhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BudgetExhausted {}

/// The trainer's ledger and budget.
pub struct Accounting {
    ledger: PrivacyLedger,
    path: Option<PathBuf>,
    budget: Option<PrivacyBudget>,
    delta: f64,
    /// The key reserved for the round being trained.
    current: Option<(u32, RoundKey)>,
    /// Evaluation releases this process committed, with their noise multiplier.
    evaluation_releases: Vec<SubsampledGaussian>,
}

impl Accounting {
    /// Loads the ledger (if a path is known and the file exists).
    pub fn open(args: &DpArgs, state_dir: Option<&Path>) -> anyhow::Result<Self> {
        let path = args
            .privacy_ledger
            .clone()
            .or_else(|| state_dir.map(|d| d.join("privacy-ledger.json")));
        let ledger = match &path {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("--privacy-ledger {}", p.display()))?;
                serde_json::from_str(&text).with_context(|| format!("--privacy-ledger {}", p.display()))?
            }
            _ => PrivacyLedger::new(),
        };
        let budget = match args.dp_epsilon_budget {
            Some(e) => Some(
                PrivacyBudget::new(e, args.dp_delta, AccountantKind::Pld).context("--dp-epsilon-budget")?,
            ),
            None => None,
        };
        Ok(Accounting {
            ledger,
            path,
            budget,
            delta: args.dp_delta,
            current: None,
            evaluation_releases: Vec::new(),
        })
    }

    fn save(&self) -> anyhow::Result<()> {
        if let Some(p) = &self.path {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("--privacy-ledger {}", p.display()))?;
            }
            let json = serde_json::to_vec_pretty(&self.ledger)?;
            caduceus_aggregation::checkpoint::write_atomic(p, &json)
                .map_err(|e| anyhow::anyhow!("--privacy-ledger {}: {e}", p.display()))?;
        }
        Ok(())
    }

    /// Before `round`: reserves the planned mechanisms, the DP-SGD steps and the evaluation
    /// release (persisted before any data is touched). Fails with [`BudgetExhausted`] when the
    /// projected ε exceeds the budget.
    pub fn reserve(&mut self, study: &str, round: u32, plan: &[SubsampledGaussian]) -> anyhow::Result<()> {
        // A round trained again (after a restart) releases a freshly noised update: a second
        // release, so it gets a key of its own (`study#retryN`) and counts again.
        let mut key = RoundKey::new(study, u64::from(round));
        let mut attempt = 0;
        while self.ledger.status(&key) != caduceus_privacy::ledger::RoundStatus::Unknown {
            attempt += 1;
            key = RoundKey::new(format!("{study}#retry{attempt}"), u64::from(round));
        }
        self.current = Some((round, key.clone()));
        let budget = match &self.budget {
            Some(b) => *b,
            // No budget: record only (an infinite budget).
            None => PrivacyBudget::new(f64::MAX, self.delta, AccountantKind::Pld)?,
        };
        match self.ledger.reserve(key, plan, &budget) {
            Ok(_) => self.save(),
            Err(LedgerError::BudgetExceeded {
                spent_epsilon,
                projected_epsilon,
                budget_epsilon,
                delta,
                ..
            }) => Err(BudgetExhausted(format!(
                "privacy budget: round {round} would bring ε from {spent_epsilon:.3} to {projected_epsilon:.3} \
                 (δ={delta:e}), over the budget of {budget_epsilon}; leaving the study"
            ))
            .into()),
            Err(e) => Err(anyhow::anyhow!("privacy ledger: {e}")),
        }
    }

    /// After `round`: commits what actually ran (the DP-SGD steps and the evaluation release);
    /// returns ε spent so far.
    pub fn commit(&mut self, study: &str, round: u32, actual: &[SubsampledGaussian]) -> anyhow::Result<f64> {
        let key = match &self.current {
            Some((r, k)) if *r == round => k.clone(),
            _ => RoundKey::new(study, u64::from(round)),
        };
        self.ledger
            .commit(&key, Some(actual))
            .map_err(|e| anyhow::anyhow!("privacy ledger: {e}"))?;
        self.save()?;
        Ok(self.ledger.epsilon(self.delta, AccountantKind::Pld)?)
    }

    /// Notes an evaluation release committed by this process; returns how many it made and their ε
    /// on their own (PLD, at δ).
    fn note_evaluation(&mut self, release: SubsampledGaussian) -> anyhow::Result<(u64, f64)> {
        self.evaluation_releases.push(release);
        let eps = AccountantKind::Pld.epsilon(&self.evaluation_releases, self.delta)?;
        Ok((self.evaluation_releases.len() as u64, eps))
    }

    /// The hospital's whole ledger.
    pub fn ledger(&self) -> &PrivacyLedger {
        &self.ledger
    }
}

/// The mechanism a round will run: σ, q and the steps `train_local_dp` will take.
pub fn planned(args: &crate::TrainerArgs, dp: &DpConfig) -> anyhow::Result<SubsampledGaussian> {
    let cfg = caduceus_models::TrainConfig {
        epochs: args.epochs,
        max_steps: args.max_steps,
        batch_size: args.batch_size,
        ..Default::default()
    };
    let steps = caduceus_models::dpsgd::dp_steps(&cfg, dp.sample_rate);
    Ok(SubsampledGaussian::new(
        dp.noise_multiplier,
        dp.sample_rate,
        steps as u64,
    )?)
}

/// What a DP round ran, in the trainer's JSON summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundPrivacy {
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub steps: usize,
    pub clip_norm: f64,
    /// Standard deviation of the noise actually added to the clipped sum (≥ σ·C).
    pub noise_std: f64,
    pub mean_batch: f64,
    /// Unclipped per-example gradient norms against C (not private: never sent to the aggregator).
    pub clipping: caduceus_models::ClipStats,
    /// ε spent by this hospital so far (PLD accountant) at `delta`.
    pub epsilon_spent: f64,
    pub delta: f64,
}

/// What an evaluation release under DP cost, in the trainer's JSON summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvaluationPrivacyReport {
    /// z: noise standard deviation of every count over the release's L2 sensitivity.
    pub noise_multiplier: f64,
    /// L2 sensitivity √tables of the release.
    pub sensitivity: f64,
    /// Standard deviation of the noise added to every count (before clamping at 0).
    pub noise_std: f64,
    /// What the aggregator received: the noised example count and the accuracy it gives.
    pub released_examples: u64,
    pub released_accuracy: Option<f64>,
    /// Evaluation releases this trainer process made so far, and their ε on their own (PLD, δ).
    pub releases: u64,
    pub epsilon_evaluation: f64,
    /// ε spent by this hospital so far, everything on its ledger (DP-SGD and evaluation), at δ.
    pub epsilon_spent: f64,
    pub delta: f64,
}

/// Commits an evaluation-only round's release; returns the summary entry.
pub fn record_evaluation(
    acc: &mut Accounting,
    args: &crate::TrainerArgs,
    round: u32,
    release: SubsampledGaussian,
    released: &caduceus_proto::Evaluation,
) -> anyhow::Result<EvaluationPrivacyReport> {
    let epsilon_spent = acc.commit(&args.study_id, round, &[release])?;
    evaluation_report(acc, args, release, released, epsilon_spent)
}

fn evaluation_report(
    acc: &mut Accounting,
    args: &crate::TrainerArgs,
    release: SubsampledGaussian,
    released: &caduceus_proto::Evaluation,
    epsilon_spent: f64,
) -> anyhow::Result<EvaluationPrivacyReport> {
    let (releases, epsilon_evaluation) = acc.note_evaluation(release)?;
    let p = released.privacy.unwrap_or_default();
    Ok(EvaluationPrivacyReport {
        noise_multiplier: release.noise_multiplier,
        sensitivity: p.sensitivity,
        noise_std: p.noise_std,
        released_examples: released.examples,
        released_accuracy: released.accuracy(),
        releases,
        epsilon_evaluation,
        epsilon_spent,
        delta: args.dp.dp_delta,
    })
}

/// Commits a training round's actual spending, its DP-SGD steps and (under DP) its evaluation
/// release; returns the `PrivacySpend` to send and the summary entries.
pub fn record_spend(
    acc: &mut Accounting,
    args: &crate::TrainerArgs,
    round: u32,
    spend: &caduceus_models::DpSpend,
    evaluation: Option<(SubsampledGaussian, &caduceus_proto::Evaluation)>,
) -> anyhow::Result<(
    caduceus_proto::PrivacySpend,
    RoundPrivacy,
    Option<EvaluationPrivacyReport>,
)> {
    let actual = SubsampledGaussian::new(spend.noise_multiplier, spend.sample_rate, spend.steps as u64)?;
    let mut used = vec![actual];
    used.extend(evaluation.map(|(m, _)| m));
    let epsilon_spent = acc.commit(&args.study_id, round, &used)?;
    let eval_report = match evaluation {
        Some((m, released)) => Some(evaluation_report(acc, args, m, released, epsilon_spent)?),
        None => None,
    };
    Ok((
        caduceus_proto::PrivacySpend {
            noise_multiplier: spend.noise_multiplier,
            sample_rate: spend.sample_rate,
            steps: spend.steps as u64,
            clip_norm: spend.clip_norm,
        },
        RoundPrivacy {
            noise_multiplier: spend.noise_multiplier,
            sample_rate: spend.sample_rate,
            steps: spend.steps,
            clip_norm: spend.clip_norm,
            noise_std: spend.noise_std,
            mean_batch: spend.mean_batch,
            clipping: spend.clipping,
            epsilon_spent,
            delta: args.dp.dp_delta,
        },
        eval_report,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> DpArgs {
        DpArgs {
            dp_noise_multiplier: Some(1.0),
            dp_clip_norm: 1.0,
            dp_sample_rate: Some(0.01),
            dp_epsilon_budget: Some(0.8),
            dp_delta: 1e-5,
            privacy_ledger: None,
            dp_eval_noise_multiplier: Some(10.0),
        }
    }

    #[test]
    fn bad_values_name_their_flag() {
        type Edit = fn(&mut DpArgs);
        let cases: [(Edit, &str); 9] = [
            (|a| a.dp_noise_multiplier = Some(-1.0), "--dp-noise-multiplier"),
            (|a| a.dp_clip_norm = 0.0, "--dp-clip-norm"),
            (|a| a.dp_sample_rate = Some(1.5), "--dp-sample-rate"),
            (|a| a.dp_epsilon_budget = Some(f64::NAN), "--dp-epsilon-budget"),
            (|a| a.dp_delta = 1.0, "--dp-delta"),
            (|a| a.dp_noise_multiplier = None, "--dp-noise-multiplier"),
            // DP without the evaluation noise would send exact counts: refused, naming the flag.
            (
                |a| a.dp_eval_noise_multiplier = None,
                "--dp-eval-noise-multiplier",
            ),
            (
                |a| a.dp_eval_noise_multiplier = Some(0.0),
                "--dp-eval-noise-multiplier",
            ),
            (
                |a| {
                    a.dp_noise_multiplier = None;
                    a.dp_sample_rate = None;
                    a.dp_epsilon_budget = None;
                },
                "--dp-eval-noise-multiplier needs --dp-noise-multiplier",
            ),
        ];
        for (f, flag) in cases {
            let mut a = args();
            f(&mut a);
            let e = a.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
        assert!(args().validate().is_ok());
    }

    #[test]
    fn default_sample_rate_is_batch_over_examples() {
        let mut a = args();
        a.dp_sample_rate = None;
        assert_eq!(a.config(64, 6400).unwrap().unwrap().sample_rate, 0.01);
        assert_eq!(a.config(64, 10).unwrap().unwrap().sample_rate, 1.0);
        a.dp_noise_multiplier = None;
        assert!(a.config(64, 6400).unwrap().is_none());
    }

    #[test]
    fn the_ledger_refuses_the_round_that_would_exceed_the_budget_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let a = args();
        let mut acc = Accounting::open(&a, Some(dir.path())).unwrap();
        // One round of 100 steps at q = 0.01, σ = 1 costs ε ≈ 0.715 at δ = 1e-5 (PLD).
        let plan = SubsampledGaussian::new(1.0, 0.01, 100).unwrap();
        acc.reserve("s", 0, &[plan]).unwrap();
        let eps = acc.commit("s", 0, &[plan]).unwrap();
        assert!(eps > 0.7 && eps < 0.72, "{eps}");
        // The second round would exceed ε = 0.8.
        let e = acc.reserve("s", 1, &[plan]).unwrap_err();
        assert!(e.downcast_ref::<BudgetExhausted>().is_some(), "{e}");
        // Persisted: a restarted trainer sees round 0 spent.
        let again = Accounting::open(&a, Some(dir.path())).unwrap();
        assert!(again.ledger.epsilon(1e-5, AccountantKind::Pld).unwrap() > 0.7);
        // A smaller round still fits.
        let mut again = again;
        let small = SubsampledGaussian::new(1.0, 0.01, 10).unwrap();
        again.reserve("s", 1, &[small]).unwrap();
        let e1 = again.commit("s", 1, &[small]).unwrap();
        // Training round 1 again (a restart) is a second release: it counts again.
        again.reserve("s", 1, &[small]).unwrap();
        let e2 = again.commit("s", 1, &[small]).unwrap();
        assert!(e2 > e1, "{e1} {e2}");
    }

    #[test]
    fn the_ledger_counts_the_evaluation_releases() {
        let dir = tempfile::tempdir().unwrap();
        let pld = |m: &[SubsampledGaussian]| AccountantKind::Pld.epsilon(m, 1e-5).unwrap();
        let mut a = args();
        let eval = a.evaluation_mechanism().unwrap().expect("DP is on");
        assert_eq!(eval, SubsampledGaussian::new(10.0, 1.0, 1).unwrap());
        let sgd = SubsampledGaussian::new(1.0, 0.01, 100).unwrap();
        // A budget between two rounds of DP-SGD alone and two rounds with their evaluations.
        let (without, with) = (
            pld(&[sgd.with_steps(200)]),
            pld(&[sgd.with_steps(200), eval.with_steps(3)]),
        );
        assert!(with > without + 0.01, "{without} {with}");
        a.dp_epsilon_budget = Some((without + with) / 2.0);
        let mut acc = Accounting::open(&a, Some(dir.path())).unwrap();
        // A training round (DP-SGD and the evaluation of the model it started from), then the
        // evaluation-only final round.
        acc.reserve("s", 0, &[sgd, eval]).unwrap();
        let e0 = acc.commit("s", 0, &[sgd, eval]).unwrap();
        acc.reserve("s", 1, &[eval]).unwrap();
        let e1 = acc.commit("s", 1, &[eval]).unwrap();
        let sgd_alone = pld(&[sgd]);
        assert!((e0 - pld(&[sgd, eval])).abs() < 1e-9, "{e0}");
        assert!((e1 - pld(&[sgd, eval.with_steps(2)])).abs() < 1e-9, "{e1}");
        assert!(e0 > sgd_alone + 0.01 && e1 > e0, "{sgd_alone} {e0} {e1}");
        // The budget counts them too: a second training round no longer fits, although its
        // DP-SGD steps alone would have.
        let e = acc.reserve("s", 2, &[sgd, eval]).unwrap_err();
        assert!(e.downcast_ref::<BudgetExhausted>().is_some(), "{e}");
        // Persisted with the evaluation releases.
        let again = Accounting::open(&a, Some(dir.path())).unwrap();
        assert!((again.ledger().epsilon(1e-5, AccountantKind::Pld).unwrap() - e1).abs() < 1e-12);
    }
}
