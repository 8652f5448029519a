//! A hospital's privacy ledger: the composition of every mechanism ever run on its data, across
//! rounds and studies, with budget checks before a round starts.
//!
//! # Keys and idempotency
//! Every round is keyed by ([`RoundKey`]) study and round number. Recording the same key twice
//! counts once, so a retried round never counts twice. That is sound because **a key identifies
//! one release**: a retried round must either not have released anything the first time, or
//! re-send the very same bytes. A round that releases a second, freshly noised result needs a new
//! key.
//!
//! # Crash-safe order of operations: reserve, release, commit
//! 1. [`PrivacyLedger::reserve`] checks the projected ε (committed + reserved + planned) against
//!    the budget and records the planned mechanisms as *reserved*. The caller persists the ledger
//!    (e.g. in the `HospitalClient` status) **before** the trainer starts. A reservation counts in
//!    full towards ε from then on.
//! 2. The trainer runs and releases its noised update. Whatever happens now, its spending is
//!    already on record.
//! 3. [`PrivacyLedger::commit`] replaces the reservation by what the trainer reports it actually
//!    used (steps, sampling rate) and the caller persists again.
//!
//! A crash between 1 and 3 leaves the reservation in place, which over-counts (never
//! under-counts). On restart, `reserve` of the same key is a no-op and `commit` finishes the round.
//! [`PrivacyLedger::cancel`] drops a reservation, only for a round known to have released nothing.
//!
//! # Size
//! Committed mechanisms with the same (σ, q) are merged by adding their steps, and the rounds of
//! each study are kept as ranges of consecutive round numbers, so the serialised ledger stays a few
//! hundred bytes after thousands of rounds (measured in this module's tests and in
//! `docs/privacy.md`).
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::accountant::AccountantKind;
use crate::error::{PrivacyError, check, check_delta};
use crate::mechanism::{SubsampledGaussian, group_identical, validate_all};

/// A study and a round within it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RoundKey {
    /// Study name.
    pub study: String,
    /// Round number within the study.
    pub round: u64,
}

impl RoundKey {
    /// Builds a key.
    pub fn new(study: impl Into<String>, round: u64) -> Self {
        Self {
            study: study.into(),
            round,
        }
    }
}

impl fmt::Display for RoundKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "study {:?} round {}", self.study, self.round)
    }
}

/// A hospital's budget: the (ε, δ) it accepts and the accountant that measures it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct PrivacyBudget {
    /// Largest total ε.
    pub epsilon: f64,
    /// δ at which ε is measured, in (0, 1).
    pub delta: f64,
    /// Accountant used to measure ε (PLD by default).
    #[serde(default)]
    pub accountant: AccountantKind,
}

impl PrivacyBudget {
    /// A validated budget.
    pub fn new(epsilon: f64, delta: f64, accountant: AccountantKind) -> Result<Self, PrivacyError> {
        let b = Self {
            epsilon,
            delta,
            accountant,
        };
        b.validate()?;
        Ok(b)
    }

    /// ε > 0 and δ ∈ (0, 1).
    pub fn validate(&self) -> Result<(), PrivacyError> {
        check("epsilon", self.epsilon, "> 0", self.epsilon > 0.0)?;
        check_delta(self.delta)
    }
}

/// A round whose spending is reserved but not yet committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Reservation {
    /// The round.
    pub key: RoundKey,
    /// The mechanisms planned for it.
    pub mechanisms: Vec<SubsampledGaussian>,
}

/// Errors of ledger operations.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LedgerError {
    /// The round would take the hospital over its budget; nothing was recorded.
    #[error(
        "{key} refused: it would raise epsilon from {spent_epsilon:.4} to {projected_epsilon:.4}, \
         above the budget of {budget_epsilon} at delta {delta:e} ({accountant} accountant)"
    )]
    BudgetExceeded {
        /// The refused round (empty study and round 0 for a bare [`PrivacyLedger::check`]).
        key: RoundKey,
        /// ε already spent (committed and reserved).
        spent_epsilon: f64,
        /// ε if the round ran.
        projected_epsilon: f64,
        /// The budget's ε.
        budget_epsilon: f64,
        /// The budget's δ.
        delta: f64,
        /// The accountant that measured it.
        accountant: AccountantKind,
    },
    /// The key is already reserved with different mechanisms.
    #[error("{key} is already reserved with different mechanisms")]
    Conflict {
        /// The round.
        key: RoundKey,
    },
    /// `commit` or `cancel` of a round that was never reserved.
    #[error("{key} was never reserved")]
    NotReserved {
        /// The round.
        key: RoundKey,
    },
    /// `cancel` of a round that is already committed.
    #[error("{key} is committed and cannot be cancelled")]
    AlreadyCommitted {
        /// The round.
        key: RoundKey,
    },
    /// Invalid mechanism, budget or accounting failure.
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
}

/// What [`PrivacyLedger::reserve`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReserveOutcome {
    /// Newly reserved; ε including it.
    Reserved {
        /// Projected ε with this round.
        projected_epsilon: f64,
    },
    /// The key was already reserved with the same mechanisms: nothing changed.
    AlreadyReserved,
    /// The key was already committed: nothing changed.
    AlreadyCommitted,
}

/// What [`PrivacyLedger::commit`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CommitOutcome {
    /// Committed.
    Committed {
        /// True when the actual mechanisms are not covered by the reservation (more steps, a new
        /// (σ, q)): they were recorded anyway, since the ledger must reflect what ran, and the
        /// caller should not release results that depend on them without checking the budget.
        exceeded_reservation: bool,
    },
    /// The key was already committed: nothing changed.
    AlreadyCommitted,
}

/// Where a round stands in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundStatus {
    /// Never seen.
    Unknown,
    /// Reserved, not committed.
    Reserved,
    /// Committed.
    Committed,
}

/// The ledger. Serialises (camelCase) into a `HospitalClient` status.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct PrivacyLedger {
    /// Committed mechanisms, identical (σ, q) merged by summing steps.
    #[serde(default)]
    pub committed: Vec<SubsampledGaussian>,
    /// Committed rounds per study, as sorted disjoint inclusive ranges `[first, last]`.
    #[serde(default)]
    pub rounds: BTreeMap<String, Vec<[u64; 2]>>,
    /// Rounds reserved but not yet committed.
    #[serde(default)]
    pub reserved: Vec<Reservation>,
}

impl PrivacyLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where `key` stands.
    pub fn status(&self, key: &RoundKey) -> RoundStatus {
        if self.is_committed(key) {
            RoundStatus::Committed
        } else if self.reserved.iter().any(|r| &r.key == key) {
            RoundStatus::Reserved
        } else {
            RoundStatus::Unknown
        }
    }

    /// Every mechanism counted: committed and reserved, merged.
    pub fn spent(&self) -> Vec<SubsampledGaussian> {
        let mut all = self.committed.clone();
        for r in &self.reserved {
            all.extend_from_slice(&r.mechanisms);
        }
        group_identical(&all)
    }

    /// ε spent so far (reservations included) at `delta` under `accountant`.
    pub fn epsilon(&self, delta: f64, accountant: AccountantKind) -> Result<f64, PrivacyError> {
        check_delta(delta)?;
        epsilon_of(&self.spent(), delta, accountant)
    }

    /// ε if `planned` ran on top of everything spent so far.
    pub fn projected_epsilon(
        &self,
        planned: &[SubsampledGaussian],
        delta: f64,
        accountant: AccountantKind,
    ) -> Result<f64, PrivacyError> {
        check_delta(delta)?;
        validate_all(planned)?;
        let mut all = self.spent();
        all.extend_from_slice(planned);
        epsilon_of(&group_identical(&all), delta, accountant)
    }

    /// Checks `planned` against `budget` without recording anything. Ok carries the projected ε.
    pub fn check(&self, planned: &[SubsampledGaussian], budget: &PrivacyBudget) -> Result<f64, LedgerError> {
        self.check_key(&RoundKey::new("", 0), planned, budget)
    }

    fn check_key(
        &self,
        key: &RoundKey,
        planned: &[SubsampledGaussian],
        budget: &PrivacyBudget,
    ) -> Result<f64, LedgerError> {
        budget.validate()?;
        let projected = self.projected_epsilon(planned, budget.delta, budget.accountant)?;
        if projected > budget.epsilon {
            return Err(LedgerError::BudgetExceeded {
                key: key.clone(),
                spent_epsilon: self.epsilon(budget.delta, budget.accountant)?,
                projected_epsilon: projected,
                budget_epsilon: budget.epsilon,
                delta: budget.delta,
                accountant: budget.accountant,
            });
        }
        Ok(projected)
    }

    /// Phase 1: checks the budget and reserves `planned` for `key`. Idempotent.
    pub fn reserve(
        &mut self,
        key: RoundKey,
        planned: &[SubsampledGaussian],
        budget: &PrivacyBudget,
    ) -> Result<ReserveOutcome, LedgerError> {
        validate_all(planned)?;
        if self.is_committed(&key) {
            return Ok(ReserveOutcome::AlreadyCommitted);
        }
        if let Some(r) = self.reserved.iter().find(|r| r.key == key) {
            return if same_mechanisms(&r.mechanisms, planned) {
                Ok(ReserveOutcome::AlreadyReserved)
            } else {
                Err(LedgerError::Conflict { key })
            };
        }
        let projected_epsilon = self.check_key(&key, planned, budget)?;
        self.reserved.push(Reservation {
            key,
            mechanisms: group_identical(planned),
        });
        Ok(ReserveOutcome::Reserved { projected_epsilon })
    }

    /// Phase 2: commits `key`'s reservation, replaced by `actual` when the trainer reports what it
    /// used. Idempotent.
    pub fn commit(
        &mut self,
        key: &RoundKey,
        actual: Option<&[SubsampledGaussian]>,
    ) -> Result<CommitOutcome, LedgerError> {
        if let Some(a) = actual {
            validate_all(a)?;
        }
        if self.is_committed(key) {
            return Ok(CommitOutcome::AlreadyCommitted);
        }
        let Some(pos) = self.reserved.iter().position(|r| &r.key == key) else {
            return Err(LedgerError::NotReserved { key: key.clone() });
        };
        let reservation = self.reserved.remove(pos);
        let (used, exceeded_reservation) = match actual {
            None => (reservation.mechanisms, false),
            Some(a) => {
                let a = group_identical(a);
                let covered = a.iter().all(|m| {
                    reservation
                        .mechanisms
                        .iter()
                        .any(|r| r.same_mechanism(m) && r.steps >= m.steps)
                });
                (a, !covered)
            }
        };
        self.add_committed(key, &used);
        Ok(CommitOutcome::Committed { exceeded_reservation })
    }

    /// Reserve and commit in one go, without a budget check (e.g. to import history). Returns
    /// false when `key` was already recorded (nothing changed).
    pub fn record(&mut self, key: RoundKey, mechanisms: &[SubsampledGaussian]) -> Result<bool, LedgerError> {
        validate_all(mechanisms)?;
        match self.status(&key) {
            RoundStatus::Committed => Ok(false),
            RoundStatus::Reserved => {
                self.commit(&key, Some(mechanisms))?;
                Ok(true)
            }
            RoundStatus::Unknown => {
                self.add_committed(&key, &group_identical(mechanisms));
                Ok(true)
            }
        }
    }

    /// Drops a reservation. Only for a round known to have released nothing.
    pub fn cancel(&mut self, key: &RoundKey) -> Result<(), LedgerError> {
        if self.is_committed(key) {
            return Err(LedgerError::AlreadyCommitted { key: key.clone() });
        }
        let before = self.reserved.len();
        self.reserved.retain(|r| &r.key != key);
        if self.reserved.len() == before {
            return Err(LedgerError::NotReserved { key: key.clone() });
        }
        Ok(())
    }

    fn is_committed(&self, key: &RoundKey) -> bool {
        self.rounds
            .get(&key.study)
            .is_some_and(|ranges| ranges.iter().any(|[a, b]| (*a..=*b).contains(&key.round)))
    }

    fn add_committed(&mut self, key: &RoundKey, mechanisms: &[SubsampledGaussian]) {
        let mut all = std::mem::take(&mut self.committed);
        all.extend_from_slice(mechanisms);
        self.committed = group_identical(&all);
        insert_round(self.rounds.entry(key.study.clone()).or_default(), key.round);
    }
}

fn epsilon_of(
    mechanisms: &[SubsampledGaussian],
    delta: f64,
    accountant: AccountantKind,
) -> Result<f64, PrivacyError> {
    if mechanisms.is_empty() {
        return Ok(0.0);
    }
    accountant.epsilon(mechanisms, delta)
}

fn same_mechanisms(a: &[SubsampledGaussian], b: &[SubsampledGaussian]) -> bool {
    let (a, b) = (group_identical(a), group_identical(b));
    a.len() == b.len()
        && a.iter()
            .all(|m| b.iter().any(|n| n.same_mechanism(m) && n.steps == m.steps))
}

/// Inserts `round` into sorted disjoint inclusive ranges, merging neighbours.
fn insert_round(ranges: &mut Vec<[u64; 2]>, round: u64) {
    let idx = ranges.partition_point(|r| r[1] < round);
    if idx < ranges.len() && ranges[idx][0] <= round {
        return; // already inside
    }
    let joins_left = idx > 0 && ranges[idx - 1][1] + 1 == round;
    let joins_right = idx < ranges.len() && round + 1 == ranges[idx][0];
    match (joins_left, joins_right) {
        (true, true) => {
            ranges[idx - 1][1] = ranges[idx][1];
            ranges.remove(idx);
        }
        (true, false) => ranges[idx - 1][1] = round,
        (false, true) => ranges[idx][0] = round,
        (false, false) => ranges.insert(idx, [round, round]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> SubsampledGaussian {
        SubsampledGaussian::new(1.0, 0.01, 100).unwrap()
    }

    fn budget(eps: f64, accountant: AccountantKind) -> PrivacyBudget {
        PrivacyBudget::new(eps, 1e-5, accountant).unwrap()
    }

    #[test]
    fn round_ranges_merge() {
        let mut r = Vec::new();
        for x in [5, 7, 6, 1, 2, 9, 0, 3, 4, 8, 8] {
            insert_round(&mut r, x);
        }
        assert_eq!(r, vec![[0, 9]]);
        let mut r = Vec::new();
        for x in [10, 2, 30, 3, 29] {
            insert_round(&mut r, x);
        }
        assert_eq!(r, vec![[2, 3], [10, 10], [29, 30]]);
    }

    #[test]
    fn double_recording_is_idempotent() {
        let b = budget(8.0, AccountantKind::Rdp);
        let mut l = PrivacyLedger::new();
        let k = RoundKey::new("demo", 1);
        assert!(matches!(
            l.reserve(k.clone(), &[demo()], &b).unwrap(),
            ReserveOutcome::Reserved { .. }
        ));
        let once = l.clone();
        assert_eq!(
            l.reserve(k.clone(), &[demo()], &b).unwrap(),
            ReserveOutcome::AlreadyReserved
        );
        assert_eq!(l, once);
        l.commit(&k, None).unwrap();
        let committed = l.clone();
        assert_eq!(l.commit(&k, None).unwrap(), CommitOutcome::AlreadyCommitted);
        assert_eq!(
            l.reserve(k.clone(), &[demo()], &b).unwrap(),
            ReserveOutcome::AlreadyCommitted
        );
        assert!(!l.record(k.clone(), &[demo()]).unwrap());
        assert_eq!(l, committed);
        assert_eq!(l.committed, vec![demo()]);
        let one = AccountantKind::Rdp.epsilon(&[demo()], 1e-5).unwrap();
        assert_eq!(l.epsilon(1e-5, AccountantKind::Rdp).unwrap(), one);
    }

    #[test]
    fn conflicting_reservation_is_refused() {
        let b = budget(8.0, AccountantKind::Rdp);
        let mut l = PrivacyLedger::new();
        let k = RoundKey::new("demo", 1);
        l.reserve(k.clone(), &[demo()], &b).unwrap();
        let e = l.reserve(k.clone(), &[demo().with_steps(200)], &b).unwrap_err();
        assert!(matches!(e, LedgerError::Conflict { .. }), "{e}");
    }

    #[test]
    fn round_over_budget_is_refused_with_figures() {
        let b = budget(2.0, AccountantKind::Rdp);
        let mut l = PrivacyLedger::new();
        let mut refused = None;
        for round in 0..100 {
            match l.reserve(RoundKey::new("demo", round), &[demo()], &b) {
                Ok(_) => {
                    l.commit(&RoundKey::new("demo", round), None).unwrap();
                }
                Err(e) => {
                    refused = Some((round, e));
                    break;
                }
            }
        }
        let (round, e) = refused.expect("budget must run out");
        assert!(round > 0);
        let LedgerError::BudgetExceeded {
            spent_epsilon,
            projected_epsilon,
            budget_epsilon,
            ..
        } = e.clone()
        else {
            panic!("{e}")
        };
        assert!(spent_epsilon <= 2.0 && projected_epsilon > 2.0 && budget_epsilon == 2.0);
        let msg = e.to_string();
        assert!(msg.contains("round") && msg.contains("budget of 2"), "{msg}");
        // Nothing was recorded for the refused round.
        assert_eq!(l.status(&RoundKey::new("demo", round)), RoundStatus::Unknown);
        assert!(l.epsilon(1e-5, AccountantKind::Rdp).unwrap() <= 2.0);
        assert!(l.check(&[demo()], &b).is_err());
    }

    #[test]
    fn reservations_count_until_committed_or_cancelled() {
        let b = budget(8.0, AccountantKind::Rdp);
        let mut l = PrivacyLedger::new();
        let k = RoundKey::new("s", 0);
        l.reserve(k.clone(), &[demo()], &b).unwrap();
        assert!(l.epsilon(1e-5, AccountantKind::Rdp).unwrap() > 0.0);
        l.cancel(&k).unwrap();
        assert_eq!(l.epsilon(1e-5, AccountantKind::Rdp).unwrap(), 0.0);
        assert!(matches!(l.cancel(&k), Err(LedgerError::NotReserved { .. })));
        assert!(matches!(l.commit(&k, None), Err(LedgerError::NotReserved { .. })));
    }

    #[test]
    fn commit_records_what_actually_ran() {
        let b = budget(8.0, AccountantKind::Rdp);
        let mut l = PrivacyLedger::new();
        let k = RoundKey::new("s", 0);
        l.reserve(k.clone(), &[demo()], &b).unwrap();
        let fewer = demo().with_steps(60);
        assert_eq!(
            l.commit(&k, Some(&[fewer])).unwrap(),
            CommitOutcome::Committed {
                exceeded_reservation: false
            }
        );
        assert_eq!(l.committed, vec![fewer]);
        let k2 = RoundKey::new("s", 1);
        l.reserve(k2.clone(), &[demo()], &b).unwrap();
        let more = SubsampledGaussian::new(1.0, 0.02, 100).unwrap();
        assert_eq!(
            l.commit(&k2, Some(&[more])).unwrap(),
            CommitOutcome::Committed {
                exceeded_reservation: true
            }
        );
        assert_eq!(l.committed, vec![fewer, more]);
    }

    #[test]
    fn ledger_survives_json() {
        let b = budget(8.0, AccountantKind::Pld);
        let mut l = PrivacyLedger::new();
        l.record(RoundKey::new("a", 0), &[demo()]).unwrap();
        l.reserve(RoundKey::new("b", 3), &[demo().with_steps(7)], &b)
            .unwrap();
        let json = serde_json::to_string(&l).unwrap();
        assert!(json.contains("\"noiseMultiplier\":1.0"), "{json}");
        let back: PrivacyLedger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, l);
    }

    #[test]
    fn thousands_of_rounds_stay_small() {
        // 5000 demo rounds of one study, one mechanism.
        let mut l = PrivacyLedger::new();
        for round in 0..5000 {
            l.record(RoundKey::new("demo-utkface", round), &[demo()]).unwrap();
        }
        let one_study = serde_json::to_string(&l).unwrap().len();
        // Worst realistic case: 5 studies, every other round missing (no merging of ranges),
        // three distinct mechanisms.
        let mut l = PrivacyLedger::new();
        let mechs = [
            demo(),
            SubsampledGaussian::new(1.1, 0.008, 80).unwrap(),
            SubsampledGaussian::new(0.9, 0.012, 120).unwrap(),
        ];
        for round in 0..5000u64 {
            let study = format!("study-{}", round % 5);
            l.record(RoundKey::new(study, round * 2), &[mechs[(round % 3) as usize]])
                .unwrap();
        }
        let scattered = serde_json::to_string(&l).unwrap().len();
        println!("serialised size after 5000 rounds: {one_study} B (1 study), {scattered} B (scattered)");
        assert!(one_study < 300, "{one_study}");
        // etcd's object limit is 1.5 MiB; stay far below even in the scattered case.
        assert!(scattered < 150_000, "{scattered}");
    }
}
