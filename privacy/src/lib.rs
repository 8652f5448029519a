//! DP accountants (PLD, RDP) and the per-hospital privacy ledger.
//!
//! - [`accountant`]: ε(δ) and δ(ε) of compositions of Poisson-subsampled Gaussian mechanisms
//!   ([`SubsampledGaussian`]), by a pessimistic PLD accountant ([`PldAccountant`]) or an RDP
//!   accountant ([`RdpAccountant`]);
//! - [`inverse`]: the noise multiplier needed for a target ε;
//! - [`ledger`]: a hospital's spending across rounds and studies, idempotent and budget-checked;
//! - [`noise`]: exact discrete Gaussian noise from a CSPRNG for DP-SGD;
//! - [`evaluation`]: the Gaussian mechanism of the evaluation counts trainers release each round
//!   (its noise, its mechanism for the ledger, and how many releases a trainer makes).
//!
//! The neighbouring relation throughout is add/remove one record. See `docs/privacy.md`.
//!
//! ```
//! use caduceus_privacy::ledger::{PrivacyBudget, PrivacyLedger, RoundKey};
//! use caduceus_privacy::{AccountantKind, SubsampledGaussian};
//!
//! // One round of the demo: 100 DP-SGD steps at q = 0.01, σ = 1.
//! let round = SubsampledGaussian::new(1.0, 0.01, 100)?;
//! let eps = AccountantKind::Pld.epsilon(&[round], 1e-5)?;
//! assert!(eps > 0.71 && eps < 0.72);
//!
//! // A hospital's ledger: reserve (and persist) before training, commit what actually ran.
//! let budget = PrivacyBudget::new(8.0, 1e-5, AccountantKind::Pld)?;
//! let mut ledger = PrivacyLedger::new();
//! let key = RoundKey::new("demo", 0);
//! ledger.reserve(key.clone(), &[round], &budget)?;
//! ledger.commit(&key, Some(&[round]))?;
//! assert_eq!(ledger.epsilon(1e-5, AccountantKind::Pld)?, eps);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
pub mod accountant;
mod error;
pub mod evaluation;
pub mod inverse;
pub mod ledger;
mod math;
pub mod mechanism;
pub mod noise;

pub use accountant::{AccountantKind, PldAccountant, PldConfig, RdpAccountant};
pub use error::PrivacyError;
pub use evaluation::{evaluation_mechanism, evaluation_releases};
pub use inverse::noise_multiplier_for_epsilon;
pub use mechanism::SubsampledGaussian;
