//! What a DP-SGD run spent ([`DpSpend`], with its clipping statistics [`ClipStats`]): the
//! privacy part of a training outcome, defined apart from `dpsgd` so that `train` need not use it.
use serde::{Deserialize, Serialize};

/// What a DP-SGD run spent: the parameters of the subsampled Gaussian mechanism, as the privacy
/// accountant needs them (and as the trainer reports them in `PrivacySpend`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpSpend {
    /// σ as requested (the noise actually added is at least σ·C, see `noise_std`).
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    /// Noisy steps actually taken (each one a release of the mechanism).
    pub steps: usize,
    pub clip_norm: f64,
    /// Standard deviation of the noise added to the sum (≥ σ·C because of the lattice).
    pub noise_std: f64,
    /// Mean Poisson batch size over the steps taken.
    pub mean_batch: f64,
    /// How the clip norm compared with the unclipped per-example gradient norms. Not private
    /// (computed from the examples without noise): for the hospital's own summary and logs, never
    /// sent to the aggregator.
    pub clipping: ClipStats,
}

/// Unclipped per-example gradient norms of a DP-SGD run against its clip norm C: what to look at
/// when choosing C (`docs/privacy.md`, "Choosing C, the batch and the learning rate").
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct ClipStats {
    /// Fraction of the per-example gradients (over all steps) whose norm exceeded C.
    pub clipped_fraction: f64,
    /// 10th, 50th and 90th percentile of the unclipped norms (nearest rank); 0 with no examples.
    pub norm_p10: f64,
    pub norm_median: f64,
    pub norm_p90: f64,
}

impl ClipStats {
    /// From the unclipped norms and the clip factors `min(1, C/‖g‖)` of every example.
    pub fn from_norms(norms: &mut [f64], clipped: usize) -> ClipStats {
        if norms.is_empty() {
            return ClipStats::default();
        }
        norms.sort_by(f64::total_cmp);
        let at = |q: f64| norms[((norms.len() - 1) as f64 * q).round() as usize];
        ClipStats {
            clipped_fraction: clipped as f64 / norms.len() as f64,
            norm_p10: at(0.1),
            norm_median: at(0.5),
            norm_p90: at(0.9),
        }
    }
}
