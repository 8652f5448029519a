//! `caduceus privacy …`: ε of a DP-SGD schedule, and the noise multiplier that meets a target ε.
//!
//! The mechanism is the Poisson-subsampled Gaussian (sampling rate q, noise multiplier σ, T
//! steps) under add/remove-one-record neighbouring; see `docs/privacy.md`.
use anyhow::{Result, bail};
use caduceus_privacy::inverse::noise_multiplier_for_epsilon;
use caduceus_privacy::{AccountantKind, SubsampledGaussian};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum PrivacyCommand {
    /// Print ε of T steps of DP-SGD with noise multiplier σ and sampling rate q.
    Epsilon(EpsilonArgs),
    /// Print the smallest noise multiplier (to 1e-4 relative) whose ε meets a target.
    Noise(NoiseArgs),
}

#[derive(Args, Debug)]
pub struct EpsilonArgs {
    /// σ: noise standard deviation divided by the clipping norm (> 0).
    #[arg(long, allow_negative_numbers = true)]
    noise_multiplier: f64,
    #[command(flatten)]
    schedule: Schedule,
}

#[derive(Args, Debug)]
pub struct NoiseArgs {
    /// The ε to reach (> 0).
    #[arg(long, allow_negative_numbers = true)]
    target_epsilon: f64,
    #[command(flatten)]
    schedule: Schedule,
}

#[derive(Args, Debug)]
struct Schedule {
    /// q: probability that a record is in a batch, in (0, 1] (batch size / dataset size).
    #[arg(long, allow_negative_numbers = true)]
    sample_rate: f64,
    /// T: number of steps (≥ 1).
    #[arg(long, allow_negative_numbers = true)]
    steps: i64,
    /// δ, in (0, 1).
    #[arg(long, allow_negative_numbers = true)]
    delta: f64,
    /// pld: tight privacy-loss distribution (upper bound); rdp: Rényi DP (looser).
    #[arg(long, value_enum, default_value_t = Accountant::Pld)]
    accountant: Accountant,
    /// Print a JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Accountant {
    Pld,
    Rdp,
}

impl From<Accountant> for AccountantKind {
    fn from(a: Accountant) -> Self {
        match a {
            Accountant::Pld => AccountantKind::Pld,
            Accountant::Rdp => AccountantKind::Rdp,
        }
    }
}

impl Schedule {
    /// Checks q, T and δ, naming the flag at fault; returns T.
    fn validate(&self) -> Result<u64> {
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            bail!("--sample-rate must be in (0, 1], got {}", self.sample_rate);
        }
        if self.steps < 1 {
            bail!("--steps must be at least 1, got {}", self.steps);
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            bail!("--delta must be in (0, 1), got {}", self.delta);
        }
        Ok(self.steps as u64)
    }
}

pub fn run(cmd: PrivacyCommand) -> Result<()> {
    match cmd {
        PrivacyCommand::Epsilon(a) => epsilon(a),
        PrivacyCommand::Noise(a) => noise(a),
    }
}

fn epsilon(a: EpsilonArgs) -> Result<()> {
    if !(a.noise_multiplier > 0.0 && a.noise_multiplier.is_finite()) {
        bail!("--noise-multiplier must be > 0, got {}", a.noise_multiplier);
    }
    let s = &a.schedule;
    let steps = s.validate()?;
    let kind = AccountantKind::from(s.accountant);
    let mechanism = SubsampledGaussian::new(a.noise_multiplier, s.sample_rate, steps)?;
    let eps = kind.epsilon(&[mechanism], s.delta)?;
    if !eps.is_finite() {
        bail!(
            "no finite epsilon at --delta {}: the {kind} accountant's delta floor for this schedule \
             is above it (raise --delta or --noise-multiplier)",
            s.delta
        );
    }
    if s.json {
        let out = json!({
            "epsilon": eps,
            "delta": s.delta,
            "accountant": kind.as_str(),
            "noise_multiplier": a.noise_multiplier,
            "sample_rate": s.sample_rate,
            "steps": steps,
        });
        println!("{out}");
    } else {
        println!(
            "epsilon = {eps:.6} at delta = {:e} ({kind} accountant; noise multiplier {}, sample \
             rate {}, {steps} steps; add/remove neighbours)",
            s.delta, a.noise_multiplier, s.sample_rate
        );
    }
    Ok(())
}

fn noise(a: NoiseArgs) -> Result<()> {
    if !(a.target_epsilon > 0.0 && a.target_epsilon.is_finite()) {
        bail!("--target-epsilon must be > 0, got {}", a.target_epsilon);
    }
    let s = &a.schedule;
    let steps = s.validate()?;
    let kind = AccountantKind::from(s.accountant);
    let r = noise_multiplier_for_epsilon(kind, a.target_epsilon, s.delta, s.sample_rate, steps)?;
    if s.json {
        let out = json!({
            "noise_multiplier": r.noise_multiplier,
            "epsilon": r.epsilon,
            "target_epsilon": a.target_epsilon,
            "delta": s.delta,
            "accountant": kind.as_str(),
            "sample_rate": s.sample_rate,
            "steps": steps,
        });
        println!("{out}");
    } else {
        println!(
            "noise_multiplier = {:.6} (epsilon = {:.6} <= {} at delta = {:e}; {kind} accountant; \
             sample rate {}, {steps} steps)",
            r.noise_multiplier, r.epsilon, a.target_epsilon, s.delta, s.sample_rate
        );
    }
    Ok(())
}
