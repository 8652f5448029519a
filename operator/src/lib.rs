//! The Caduceus operator: reconciles `FederatedStudy`, `TrainingRound` and `HospitalClient` into
//! rounds of real Jobs.
//!
//! Each controller is a pipeline (read, validate, build the desired objects with pure functions,
//! apply them, write status):
//! - [`study`]: the round state machine of a study — chooses participants, charges their privacy
//!   ledgers, creates each `TrainingRound`, retries failed rounds, and summarises results and
//!   fairness in the study status;
//! - [`round`]: runs one round — the aggregator Job and one trainer Job per hospital, reads the
//!   aggregator's outcome from its termination message, commits the ledgers, records metrics and the
//!   fairness verdict;
//! - [`hospital`]: a hospital's `Ready` condition and ε figures.
//!
//! Pure parts: [`names`] (deterministic names and labels), [`plan`] (validation, DP plan,
//! participant admission, fairness verdicts) and [`build`] (the objects). API helpers: [`secrets`]
//! (study CA, certificates, TFHE key), [`ledger`] (the durable privacy ledger of each hospital),
//! [`signing`] (the signature that proves a `TrainingRound` was made by the study controller).
//! [`telemetry`] serves `/metrics`, `/healthz` and `/readyz`; [`leader`] elects one active replica.

pub mod build;
pub mod context;
pub mod gateway;
pub mod hospital;
pub mod leader;
pub mod ledger;
pub mod names;
pub mod plan;
pub mod round;
pub mod secrets;
pub mod signing;
pub mod site;
pub mod study;
pub mod telemetry;

pub use context::{Context, Error, Result};

/// The field manager of every server-side apply and status write.
pub const FIELD_MANAGER: &str = "caduceus-operator";
/// The finalizer that removes a study's objects in other namespaces.
pub const STUDY_FINALIZER: &str = "fl.caduceus.dev/cleanup";
/// The finalizer that keeps a HospitalClient while its privacy ledger is not empty.
pub const HOSPITAL_FINALIZER: &str = "fl.caduceus.dev/privacy-ledger";
