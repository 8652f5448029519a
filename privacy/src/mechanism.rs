//! The mechanism every accountant in this crate understands: the Poisson-subsampled Gaussian.
//!
//! One DP-SGD step samples every record independently with probability `sample_rate` (q), sums
//! the per-example gradients clipped to L2 norm C and adds N(0, (σ·C)²) noise, σ being the
//! `noise_multiplier`. Neighbouring datasets differ by adding or removing one record
//! ("add/remove" adjacency); see `docs/privacy.md`.
use serde::{Deserialize, Serialize};

use crate::error::{PrivacyError, check};

/// `steps` applications of the Poisson-subsampled Gaussian mechanism with noise multiplier σ and
/// sampling rate q.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubsampledGaussian {
    /// σ: noise standard deviation divided by the L2 sensitivity (clip norm). Must be > 0.
    pub noise_multiplier: f64,
    /// q: probability that a record is in a given batch. Must be in (0, 1].
    pub sample_rate: f64,
    /// Number of steps (compositions). Must be ≥ 1.
    pub steps: u64,
}

impl SubsampledGaussian {
    /// A validated mechanism; the error names the offending parameter.
    pub fn new(noise_multiplier: f64, sample_rate: f64, steps: u64) -> Result<Self, PrivacyError> {
        let m = Self {
            noise_multiplier,
            sample_rate,
            steps,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks σ > 0, q ∈ (0, 1] and steps ≥ 1.
    pub fn validate(&self) -> Result<(), PrivacyError> {
        check(
            "noise_multiplier",
            self.noise_multiplier,
            "> 0",
            self.noise_multiplier > 0.0,
        )?;
        check(
            "sample_rate",
            self.sample_rate,
            "in (0, 1]",
            self.sample_rate > 0.0 && self.sample_rate <= 1.0,
        )?;
        check("steps", self.steps as f64, ">= 1", self.steps >= 1)?;
        Ok(())
    }

    /// Same mechanism, different number of steps.
    pub fn with_steps(self, steps: u64) -> Self {
        Self { steps, ..self }
    }

    /// True when both have the same σ and q (bit for bit), i.e. they may be merged by adding steps.
    pub fn same_mechanism(&self, other: &Self) -> bool {
        self.noise_multiplier.to_bits() == other.noise_multiplier.to_bits()
            && self.sample_rate.to_bits() == other.sample_rate.to_bits()
    }
}

/// Validates every mechanism of a composition.
pub(crate) fn validate_all(mechanisms: &[SubsampledGaussian]) -> Result<(), PrivacyError> {
    mechanisms.iter().try_for_each(SubsampledGaussian::validate)
}

/// Merges runs of identical (σ, q) by summing their steps; order is irrelevant to composition.
pub fn group_identical(mechanisms: &[SubsampledGaussian]) -> Vec<SubsampledGaussian> {
    let mut out: Vec<SubsampledGaussian> = Vec::new();
    for m in mechanisms {
        match out.iter_mut().find(|g| g.same_mechanism(m)) {
            Some(g) => g.steps = g.steps.saturating_add(m.steps),
            None => out.push(*m),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_parameter() {
        let e = SubsampledGaussian::new(0.0, 0.1, 10).unwrap_err();
        assert!(e.to_string().contains("noise_multiplier"), "{e}");
        let e = SubsampledGaussian::new(1.0, 1.5, 10).unwrap_err();
        assert!(e.to_string().contains("sample_rate"), "{e}");
        let e = SubsampledGaussian::new(1.0, 0.0, 10).unwrap_err();
        assert!(e.to_string().contains("sample_rate"), "{e}");
        let e = SubsampledGaussian::new(1.0, 0.5, 0).unwrap_err();
        assert!(e.to_string().contains("steps"), "{e}");
        let e = SubsampledGaussian::new(f64::NAN, 0.5, 1).unwrap_err();
        assert!(e.to_string().contains("noise_multiplier"), "{e}");
        assert!(SubsampledGaussian::new(1.0, 1.0, 1).is_ok());
    }

    #[test]
    fn grouping_sums_steps_of_identical_mechanisms() {
        let a = SubsampledGaussian::new(1.0, 0.01, 100).unwrap();
        let b = SubsampledGaussian::new(2.0, 0.01, 5).unwrap();
        let g = group_identical(&[a, b, a, a.with_steps(1)]);
        assert_eq!(g, vec![a.with_steps(201), b]);
    }
}
