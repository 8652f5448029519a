//! Privacy accountants for compositions of Poisson-subsampled Gaussian mechanisms.
//!
//! - [`pld`]: the tight privacy-loss-distribution accountant (default), pessimistic so ε is an
//!   upper bound;
//! - [`rdp`]: the Rényi-DP accountant, for comparison and as a fallback.
//!
//! Both compose heterogeneous mechanisms (different σ, q and steps) given as a slice of
//! [`SubsampledGaussian`].
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::PrivacyError;
use crate::mechanism::SubsampledGaussian;

mod convolve;
pub mod pld;
pub mod rdp;

pub use pld::{Estimate, PldAccountant, PldConfig, PrivacyLoss};
pub use rdp::{Conversion, RdpAccountant, RdpEpsilon};

/// Which accountant to use, with its default settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum AccountantKind {
    /// Privacy-loss distribution (tight, pessimistic discretisation).
    #[default]
    Pld,
    /// Rényi DP with Opacus' orders and the Balle et al. 2020 conversion.
    Rdp,
}

impl AccountantKind {
    /// ε at `delta` for the composition of `mechanisms`.
    pub fn epsilon(self, mechanisms: &[SubsampledGaussian], delta: f64) -> Result<f64, PrivacyError> {
        match self {
            Self::Pld => PldAccountant::default().epsilon(mechanisms, delta),
            Self::Rdp => RdpAccountant::default().epsilon(mechanisms, delta),
        }
    }

    /// δ at `epsilon` for the composition of `mechanisms`.
    pub fn delta(self, mechanisms: &[SubsampledGaussian], epsilon: f64) -> Result<f64, PrivacyError> {
        match self {
            Self::Pld => PldAccountant::default().delta(mechanisms, epsilon),
            Self::Rdp => RdpAccountant::default().delta(mechanisms, epsilon),
        }
    }

    /// The lowercase name (`pld` or `rdp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pld => "pld",
            Self::Rdp => "rdp",
        }
    }
}

impl fmt::Display for AccountantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AccountantKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "pld" => Ok(Self::Pld),
            "rdp" => Ok(Self::Rdp),
            other => Err(format!("unknown accountant {other:?} (expected pld or rdp)")),
        }
    }
}
