//! DP-SGD in `caduceus simulate`: per-hospital DP plans and budgets, the runner's privacy ledgers,
//! and ε per hospital per round (the `--dp-*` options themselves are in `args`).
//!
//! Before the study starts the runner plans each hospital's rounds: σ (given, or from
//! `--dp-target-epsilon` with `privacy::inverse` for the whole schedule), its sampling rate
//! q = batch / local training examples and the steps per round. A hospital with a budget takes
//! part in as many rounds as fit its budget (projected ε of the next round checked with the PLD
//! accountant before it is planned); the runner passes that last round to the trainer
//! (`--rounds 0-L`) and to the aggregator (`--hospital-last-round`, so that later rounds close
//! without waiting for it). Each trainer also enforces its budget itself with its own ledger
//! (`--dp-epsilon-budget`), so a hospital never trains past its budget even if the plan were
//! wrong. After each round the runner records what the trainers reported (the `PrivacySpend` the
//! aggregator passes on in `round_closed`) in one ledger per hospital, prints ε per hospital, and
//! writes it into `rounds.json` (`epsilon`, `delta`).
//!
//! The evaluation counts the trainers send every round are released under DP as well
//! (`--dp-eval-noise-multiplier` z, see `caduceus_privacy::evaluation`): every plan, budget and ε
//! here includes them. A hospital that takes part in k of R rounds releases
//! `evaluation_releases(k, k == R)` evaluations (the final evaluation only when it stays to the
//! end), and `--dp-target-epsilon` calibrates each hospital's DP-SGD σ on top of the fixed cost of
//! its R + 1 evaluation releases.
use std::collections::BTreeMap;

use anyhow::{Context, bail};
use caduceus_fairness::RoundResult;
use caduceus_privacy::evaluation::{evaluation_mechanism, evaluation_releases};
use caduceus_privacy::inverse::{PlannedPhase, noise_multiplier_for_budget};
use caduceus_privacy::ledger::{PrivacyBudget, PrivacyLedger, RoundKey};
use caduceus_privacy::{AccountantKind, SubsampledGaussian};

use super::args::DpSimArgs;

/// One hospital's DP plan.
#[derive(Debug, Clone)]
pub struct HospitalPlan {
    pub name: String,
    pub sample_rate: f64,
    pub steps_per_round: u64,
    pub budget: Option<f64>,
    /// σ of its DP-SGD (its own with --dp-target-epsilon; the given one with
    /// --dp-noise-multiplier).
    pub noise_multiplier: f64,
    /// Last training round it takes part in (`None`: all rounds and the final evaluation).
    pub last_round: Option<u32>,
    /// Evaluation releases it will make: one per round it takes part in, plus the final
    /// evaluation when it stays to the end.
    pub evaluation_releases: u64,
}

impl HospitalPlan {
    /// Everything the hospital releases if it takes part in the first `k` of `rounds` rounds:
    /// its DP-SGD steps and its evaluation releases.
    fn schedule(&self, k: u32, rounds: u32, eval_z: f64) -> anyhow::Result<Vec<SubsampledGaussian>> {
        let mut m = vec![evaluation_mechanism(eval_z, evaluation_releases(k, k == rounds))?];
        if k > 0 {
            m.push(SubsampledGaussian::new(
                self.noise_multiplier,
                self.sample_rate,
                self.steps_per_round * u64::from(k),
            )?);
        }
        Ok(m)
    }
}

/// The runner's DP plan and ledgers.
#[derive(Debug)]
pub struct DpPlan {
    pub clip_norm: f64,
    pub delta: f64,
    /// z of the evaluation counts.
    pub eval_noise_multiplier: f64,
    /// Count tables of one evaluation release (its L2 sensitivity is √tables).
    pub eval_tables: u32,
    pub hospitals: Vec<HospitalPlan>,
    ledgers: BTreeMap<String, PrivacyLedger>,
    study: String,
}

const ACCOUNTANT: AccountantKind = AccountantKind::Pld;

impl DpPlan {
    /// Plans `rounds` rounds for hospitals with `train_examples[i]` local training examples,
    /// `batch_size`, and `local_epochs` / `steps_cap` as the trainers will use them, and
    /// evaluation releases of `eval_tables` count tables.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dp: &DpSimArgs,
        study: &str,
        rounds: u32,
        train_examples: &[usize],
        batch_size: usize,
        local_epochs: usize,
        steps_cap: Option<usize>,
        eval_tables: u32,
    ) -> anyhow::Result<Self> {
        let budgets = dp.validate(train_examples.len())?;
        let cfg = caduceus_models::TrainConfig {
            epochs: local_epochs,
            max_steps: steps_cap,
            batch_size,
            ..Default::default()
        };
        let eval_z = dp.dp_eval_noise_multiplier;
        // The evaluation releases of a hospital that stays to the end: every round and the final
        // evaluation. Their cost is fixed by z; --dp-target-epsilon calibrates DP-SGD on top of it.
        let all_evaluations = evaluation_mechanism(eval_z, evaluation_releases(rounds, true))
            .context("--dp-eval-noise-multiplier")?;
        let mut hospitals = Vec::new();
        for (i, &n) in train_examples.iter().enumerate() {
            let q = (batch_size as f64 / n.max(1) as f64).min(1.0);
            let steps = caduceus_models::dpsgd::dp_steps(&cfg, q) as u64;
            let name = format!("hospital-{i}");
            let noise_multiplier = match (dp.dp_noise_multiplier, dp.dp_target_epsilon) {
                (Some(s), _) => s,
                // This hospital's own σ for its whole schedule, on top of the fixed cost of its
                // evaluation releases: a hospital with more data (a smaller sample rate) needs
                // less noise for the same ε.
                (None, Some(target)) => {
                    let eval_alone = ACCOUNTANT.epsilon(&[all_evaluations], dp.dp_delta)?;
                    if eval_alone >= target {
                        bail!(
                            "--dp-target-epsilon {target}: the {} evaluation releases at \
                             --dp-eval-noise-multiplier {eval_z} alone cost ε={eval_alone:.3} (δ={}); \
                             raise --dp-eval-noise-multiplier or the target",
                            all_evaluations.steps,
                            dp.dp_delta
                        );
                    }
                    noise_multiplier_for_budget(
                        ACCOUNTANT,
                        target,
                        dp.dp_delta,
                        &[all_evaluations],
                        &[PlannedPhase {
                            sample_rate: q,
                            steps: steps * u64::from(rounds),
                        }],
                    )
                    .with_context(|| format!("--dp-target-epsilon {target} for {name}"))?
                    .noise_multiplier
                }
                (None, None) => bail!("DP is off"),
            };
            hospitals.push(HospitalPlan {
                budget: budgets.get(&name).copied(),
                name,
                sample_rate: q,
                steps_per_round: steps,
                noise_multiplier,
                last_round: None,
                evaluation_releases: evaluation_releases(rounds, true),
            });
        }
        // Rounds each budget allows: add rounds while the projected ε (DP-SGD and evaluations,
        // the final evaluation included when the hospital stays to the end) fits. The trainer's
        // own ledger reserves the same mechanisms round by round.
        for h in &mut hospitals {
            let Some(eps) = h.budget else { continue };
            let budget = PrivacyBudget::new(eps, dp.dp_delta, ACCOUNTANT)?;
            let ledger = PrivacyLedger::new();
            let mut affordable = 0;
            while affordable < rounds {
                let plan = h.schedule(affordable + 1, rounds, eval_z)?;
                if ledger.check(&plan, &budget).is_err() {
                    break;
                }
                affordable += 1;
            }
            if affordable == 0 {
                bail!(
                    "{}'s budget ε={eps} does not cover a single round (ε={:.3} at δ={}, its evaluation \
                     included); raise the budget or the noise",
                    h.name,
                    ACCOUNTANT.epsilon(&h.schedule(1, rounds, eval_z)?, dp.dp_delta)?,
                    dp.dp_delta
                );
            }
            if affordable < rounds {
                h.last_round = Some(affordable - 1);
            }
            h.evaluation_releases = evaluation_releases(affordable, affordable == rounds);
        }
        if hospitals.iter().all(|h| h.last_round.is_some()) {
            let most = hospitals.iter().filter_map(|h| h.last_round).max().unwrap_or(0) + 1;
            bail!(
                "no hospital's budget covers all {rounds} rounds (at most {most}); use --rounds {most} or larger budgets"
            );
        }
        Ok(DpPlan {
            clip_norm: dp.dp_clip_norm,
            delta: dp.dp_delta,
            eval_noise_multiplier: eval_z,
            eval_tables,
            ledgers: hospitals
                .iter()
                .map(|h| (h.name.clone(), PrivacyLedger::new()))
                .collect(),
            hospitals,
            study: study.to_string(),
        })
    }

    /// Extra trainer arguments of hospital `i`.
    pub fn trainer_args(&self, i: usize) -> Vec<String> {
        let h = &self.hospitals[i];
        let mut a = vec![
            "--dp-noise-multiplier".to_string(),
            h.noise_multiplier.to_string(),
            "--dp-clip-norm".into(),
            self.clip_norm.to_string(),
            "--dp-sample-rate".into(),
            h.sample_rate.to_string(),
            "--dp-delta".into(),
            self.delta.to_string(),
            "--dp-eval-noise-multiplier".into(),
            self.eval_noise_multiplier.to_string(),
        ];
        if let Some(b) = h.budget {
            a.extend(["--dp-epsilon-budget".into(), b.to_string()]);
        }
        if let Some(last) = h.last_round {
            a.extend(["--rounds".into(), format!("0-{last}")]);
        }
        a
    }

    /// Extra aggregator arguments.
    pub fn aggregator_args(&self) -> Vec<String> {
        let leaving: Vec<String> = self
            .hospitals
            .iter()
            .filter_map(|h| h.last_round.map(|r| format!("{}={r}", h.name)))
            .collect();
        if leaving.is_empty() {
            Vec::new()
        } else {
            vec!["--hospital-last-round".into(), leaving.join(",")]
        }
    }

    /// One line per hospital describing the plan.
    pub fn describe(&self, rounds: u32) -> String {
        let mut s = format!(
            "DP-SGD: C={}, δ={:e} (PLD accountant)",
            self.clip_norm, self.delta
        );
        let z = self.eval_noise_multiplier;
        let one = evaluation_mechanism(z, 1)
            .and_then(|m| ACCOUNTANT.epsilon(&[m], self.delta))
            .map_or("?".into(), |e| format!("{e:.3}"));
        s.push_str(&format!(
            "\n  evaluation counts: z={z}, noise sd {:.1} per count ({} tables), ε={one} per round's release alone",
            z * f64::from(self.eval_tables).sqrt(),
            self.eval_tables,
        ));
        for h in &self.hospitals {
            let r = h.last_round.map_or(rounds, |l| l + 1);
            s.push_str(&format!(
                "\n  {}: σ={:.4}, q={:.4}, {} steps/round, budget {}, {} round(s), {} evaluation releases{}",
                h.name,
                h.noise_multiplier,
                h.sample_rate,
                h.steps_per_round,
                h.budget.map_or("none".into(), |b| format!("ε={b}")),
                r,
                h.evaluation_releases,
                if r < rounds {
                    " (its next round would exceed the budget)"
                } else {
                    ""
                }
            ));
        }
        s
    }

    /// Records the spending the trainers reported in a closed round (`r.extra["hospitals"][h]
    /// ["privacy"]` for DP-SGD, `["evaluation_privacy"]` for the evaluation counts), fills
    /// `r.epsilon` (ε spent so far by every hospital) and `r.delta`, and returns the line to print.
    pub fn record_round(&mut self, r: &mut RoundResult) -> anyhow::Result<String> {
        if let Some(hs) = r.extra.get("hospitals").and_then(|v| v.as_object()) {
            for (name, v) in hs {
                let mut used = Vec::new();
                let p = &v["privacy"];
                if let (Some(sigma), Some(q), Some(steps)) = (
                    p["noise_multiplier"].as_f64(),
                    p["sample_rate"].as_f64(),
                    p["steps"].as_u64(),
                ) && sigma > 0.0
                    && steps > 0
                {
                    used.push(SubsampledGaussian::new(sigma, q, steps)?);
                }
                // One evaluation release per update that carried noised counts.
                if let Some(z) = v["evaluation_privacy"]["noise_multiplier"].as_f64()
                    && z > 0.0
                {
                    used.push(evaluation_mechanism(z, 1)?);
                }
                if used.is_empty() {
                    continue;
                }
                let ledger = self.ledgers.entry(name.clone()).or_default();
                let key = RoundKey::new(self.study.clone(), u64::from(r.round));
                let unlimited = PrivacyBudget::new(f64::MAX, self.delta, ACCOUNTANT)?;
                ledger
                    .reserve(key.clone(), &used, &unlimited)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                ledger.commit(&key, None).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        let mut parts = Vec::new();
        for h in &self.hospitals {
            let eps = self.ledgers[&h.name].epsilon(self.delta, ACCOUNTANT)?;
            r.epsilon.insert(h.name.clone(), eps);
            let budget = h.budget.map_or(String::new(), |b| format!("/{b}"));
            let left = if h.last_round.is_some_and(|l| r.round > l) {
                " (left)"
            } else {
                ""
            };
            parts.push(format!("{} {eps:.3}{budget}{left}", h.name));
        }
        r.delta = Some(self.delta);
        Ok(format!(
            "  ε spent so far (δ={:e}): {}",
            self.delta,
            parts.join("  ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dp() -> DpSimArgs {
        DpSimArgs {
            dp_noise_multiplier: Some(1.0),
            dp_clip_norm: 1.0,
            dp_target_epsilon: None,
            dp_delta: 1e-5,
            epsilon_budget: None,
            hospital_budget: Vec::new(),
            dp_eval_noise_multiplier: 10.0,
        }
    }

    fn eval(releases: u64) -> SubsampledGaussian {
        evaluation_mechanism(10.0, releases).unwrap()
    }

    #[test]
    fn a_hospital_stops_before_the_round_that_would_exceed_its_budget() {
        let mut a = dp();
        // 100 examples, batch 10: q = 0.1, 10 steps per round (one epoch).
        a.hospital_budget = vec!["hospital-1=5".into()];
        let plan = DpPlan::new(&a, "s", 10, &[100, 100], 10, 1, None, 4).unwrap();
        assert_eq!(plan.hospitals[0].last_round, None);
        assert_eq!(
            plan.hospitals[0].evaluation_releases, 11,
            "10 rounds and the final evaluation"
        );
        let h = &plan.hospitals[1];
        assert_eq!(h.steps_per_round, 10);
        let last = h.last_round.expect("hospital-1 leaves");
        assert_eq!(h.evaluation_releases, u64::from(last) + 1);
        // DP-SGD and one evaluation release per round taken part in.
        let eps = |rounds: u64| {
            ACCOUNTANT
                .epsilon(
                    &[
                        SubsampledGaussian::new(1.0, 0.1, 10 * rounds).unwrap(),
                        eval(rounds),
                    ],
                    1e-5,
                )
                .unwrap()
        };
        // Its rounds 0..=last fit the budget; one more would not.
        let done = u64::from(last) + 1;
        assert!(
            eps(done) <= 5.0 && eps(done + 1) > 5.0,
            "{} {}",
            eps(done),
            eps(done + 1)
        );
        assert_eq!(
            plan.aggregator_args(),
            vec!["--hospital-last-round", &format!("hospital-1={last}")]
        );
        assert!(
            plan.trainer_args(1)
                .windows(2)
                .any(|w| w[0] == "--rounds" && w[1] == format!("0-{last}"))
        );
        assert!(plan.trainer_args(1).contains(&"--dp-epsilon-budget".to_string()));
        assert!(
            plan.trainer_args(0)
                .windows(2)
                .any(|w| w[0] == "--dp-eval-noise-multiplier" && w[1] == "10")
        );
    }

    #[test]
    fn the_final_evaluation_counts_against_a_budget_that_covers_every_round() {
        // A budget just above all 3 rounds of DP-SGD with their 3 evaluations, but below the
        // fourth (final) evaluation: the hospital cannot stay to the end.
        let sgd = |r: u64| SubsampledGaussian::new(1.0, 0.1, 10 * r).unwrap();
        let three = ACCOUNTANT.epsilon(&[sgd(3), eval(3)], 1e-5).unwrap();
        let with_final = ACCOUNTANT.epsilon(&[sgd(3), eval(4)], 1e-5).unwrap();
        assert!(with_final > three + 1e-3, "{three} {with_final}");
        let mut a = dp();
        a.hospital_budget = vec![format!("hospital-0={}", (three + with_final) / 2.0)];
        let plan = DpPlan::new(&a, "s", 3, &[100, 100], 10, 1, None, 4).unwrap();
        assert_eq!(plan.hospitals[0].last_round, Some(1));
        assert_eq!(plan.hospitals[0].evaluation_releases, 2);
    }

    #[test]
    fn a_budget_below_one_round_is_refused_with_the_cost_of_a_round() {
        let mut a = dp();
        a.epsilon_budget = Some(1.0);
        let e = DpPlan::new(&a, "s", 3, &[100], 10, 1, None, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not cover a single round"), "{e}");
    }

    #[test]
    fn target_epsilon_gives_each_hospital_the_sigma_that_reaches_it() {
        let mut a = dp();
        a.dp_noise_multiplier = None;
        a.dp_target_epsilon = Some(3.0);
        let plan = DpPlan::new(&a, "s", 5, &[200, 100], 10, 1, Some(8), 4).unwrap();
        for h in &plan.hospitals {
            // The whole schedule: 5 rounds of DP-SGD and 6 evaluation releases.
            let eps = |sigma: f64| {
                let m = SubsampledGaussian::new(sigma, h.sample_rate, h.steps_per_round * 5).unwrap();
                ACCOUNTANT.epsilon(&[m, eval(6)], 1e-5).unwrap()
            };
            // Within the target, and not by a wide margin: 2 % less noise would exceed it.
            assert!(eps(h.noise_multiplier) <= 3.0 + 1e-9, "{h:?}");
            assert!(eps(h.noise_multiplier * 0.98) > 3.0, "{h:?}");
        }
        // The hospital with twice the data samples at half the rate and needs less noise.
        assert!(plan.hospitals[0].noise_multiplier < plan.hospitals[1].noise_multiplier);
        // Evaluations that alone exceed the target are refused, naming the option.
        a.dp_eval_noise_multiplier = 0.5;
        let e = DpPlan::new(&a, "s", 5, &[200, 100], 10, 1, Some(8), 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--dp-eval-noise-multiplier"), "{e}");
    }

    #[test]
    fn the_runner_ledger_records_reported_spending_once_per_round() {
        let plan_args = dp();
        let mut plan = DpPlan::new(&plan_args, "s", 3, &[100], 10, 1, None, 4).unwrap();
        let mut r = RoundResult {
            round: 0,
            ..Default::default()
        };
        r.extra.insert(
            "hospitals".into(),
            serde_json::json!({"hospital-0": {
                "privacy": {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "clip_norm": 1.0},
                "evaluation_privacy": {"noise_multiplier": 10.0, "noise_std": 20.0, "sensitivity": 2.0},
            }}),
        );
        let line = plan.record_round(&mut r.clone()).unwrap();
        assert!(line.contains("hospital-0"), "{line}");
        // Recording the same round again (a re-sent event) counts once.
        plan.record_round(&mut r).unwrap();
        let once = ACCOUNTANT
            .epsilon(&[SubsampledGaussian::new(1.0, 0.1, 10).unwrap(), eval(1)], 1e-5)
            .unwrap();
        assert!((r.epsilon["hospital-0"] - once).abs() < 1e-9);
        assert_eq!(r.delta, Some(1e-5));
        // The final evaluation round: its evaluation release alone counts.
        let mut fin = RoundResult {
            round: 3,
            ..Default::default()
        };
        fin.extra.insert(
            "hospitals".into(),
            serde_json::json!({"hospital-0": {"privacy": null, "evaluation_privacy": {"noise_multiplier": 10.0}}}),
        );
        plan.record_round(&mut fin).unwrap();
        let both = ACCOUNTANT
            .epsilon(&[SubsampledGaussian::new(1.0, 0.1, 10).unwrap(), eval(2)], 1e-5)
            .unwrap();
        assert!((fin.epsilon["hospital-0"] - both).abs() < 1e-9);
    }

    #[test]
    fn bad_values_name_their_option() {
        for (f, flag) in [
            (
                (|a: &mut DpSimArgs| a.dp_noise_multiplier = Some(0.0)) as fn(&mut DpSimArgs),
                "--dp-noise-multiplier",
            ),
            (|a| a.dp_clip_norm = -1.0, "--dp-clip-norm"),
            (|a| a.dp_delta = 0.0, "--dp-delta"),
            (|a| a.dp_eval_noise_multiplier = 0.0, "--dp-eval-noise-multiplier"),
            (|a| a.epsilon_budget = Some(-3.0), "--epsilon-budget"),
            (
                |a| a.hospital_budget = vec!["hospital-9=1".into()],
                "--hospital-budget",
            ),
            (
                |a| a.hospital_budget = vec!["hospital-0".into()],
                "--hospital-budget",
            ),
        ] {
            let mut a = dp();
            f(&mut a);
            let e = a.validate(2).unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
    }
}
