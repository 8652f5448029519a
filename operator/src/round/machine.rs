//! The round state machine, pure: from a round's status and what one reconcile observed of its
//! world, the next status and the actions that get there. No I/O, no clock (`now` is an argument).
//!
//! The state is the round's status alone ([`RoundState::from_status`]): a restarted operator
//! rebuilds it from the API server and loses nothing. The phases ([`Phase`]):
//!
//! ```text
//!  Pending ──▶ Running ──▶ Settling ──▶ Succeeded | Failed
//!     │           │            ▲
//!     │           └────────────┘  (aggregator ended, terms changed, deadline passed)
//!     └──────────────────────────▶ Failed  (NotCreatedByOperator: nothing scheduled, nothing settled)
//! ```
//!
//! `Settling` is written before anything irreversible happens at the end of a round: once the
//! decision to end is in the status, a crash and restart finish the same ending (delete the
//! aggregator Job, settle the ledgers, write the result) whatever the world looks like afterwards —
//! a study whose terms changed back, say, never restarts the round. The ledger's answer to the
//! settlement ([`Settlement`]) comes back as an observation, and the terminal status carries it.
//!
//! A trainer Job is created (suspended) at most once per hospital and round: a Job that is gone
//! after the ledger recorded its start is never created again, and no trainer starts once the
//! aggregator has ended.

use std::collections::BTreeMap;
use std::time::Duration;

use caduceus_crds::TrainingRoundStatus;
use caduceus_crds::conditions::set_condition_at;
use caduceus_crds::conditions::{ConditionExt, status as cstatus, types};
use caduceus_crds::study::FairnessSpec;
use caduceus_fairness::{Outcome, RoundOutcome};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::plan;

/// The reason of `Succeeded=Unknown` while a round that has ended is being settled.
pub const SETTLING: &str = "Settling";
/// The reason of `Succeeded=Unknown` while a round runs.
pub const RUNNING: &str = "Running";
/// The ending of a round whose aggregator Job ended (its outcome decides the result).
pub const AGGREGATOR_ENDED: &str = "AggregatorEnded";
/// The reason of a round the study controller did not make.
pub const NOT_CREATED_BY_OPERATOR: &str = "NotCreatedByOperator";
/// The reason of a round whose study's terms changed after it started.
pub const STUDY_CHANGED: &str = "StudyChanged";
/// The reason of a round that outlived its deadline.
pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";

/// Where a round stands, read from its `Succeeded` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Nothing written yet.
    Pending,
    /// Jobs scheduled, the aggregator has not ended.
    Running,
    /// The round has ended for `reason` (an abort reason, or [`AGGREGATOR_ENDED`]); its ledgers
    /// are being settled.
    Settling { reason: String, message: String },
    /// `Succeeded=True`.
    Succeeded,
    /// `Succeeded=False`.
    Failed,
}

impl Phase {
    /// Whether the round has its result (it never changes again).
    #[must_use]
    pub fn is_terminal(&self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// The state of a round: its status, which is all that survives a restart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoundState {
    pub status: TrainingRoundStatus,
}

impl RoundState {
    /// The state as read back from the API server.
    #[must_use]
    pub fn from_status(status: Option<&TrainingRoundStatus>) -> Self {
        Self {
            status: status.cloned().unwrap_or_default(),
        }
    }

    #[must_use]
    pub fn phase(&self) -> Phase {
        let Some(c) = self.status.conditions.condition(types::SUCCEEDED) else {
            return Phase::Pending;
        };
        match c.status.as_str() {
            cstatus::TRUE => Phase::Succeeded,
            cstatus::FALSE => Phase::Failed,
            _ if c.reason == SETTLING => {
                let (reason, message) = c.message.split_once(": ").unwrap_or((c.message.as_str(), ""));
                Phase::Settling {
                    reason: reason.to_string(),
                    message: message.to_string(),
                }
            }
            _ => Phase::Running,
        }
    }
}

/// A Job as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobView {
    Absent,
    /// Created suspended: its pods never ran.
    Suspended,
    Active,
    Complete,
    /// `Failed`, with `reason: message` of its condition.
    Failed(String),
}

impl JobView {
    fn ended(&self) -> bool {
        matches!(self, JobView::Complete | JobView::Failed(_))
    }

    fn failure(&self) -> String {
        match self {
            JobView::Failed(m) => m.clone(),
            JobView::Absent => "was deleted".into(),
            _ => "failed".into(),
        }
    }
}

/// A participant's `HospitalClient` as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HospitalView {
    /// Deleted: its trainer does not report; the quorum stays what the round says.
    Gone,
    /// No longer consents to the study's terms, no longer allows its trainer image, or is being
    /// deleted: no trainer starts for it.
    Withdrawn,
    /// Admitted: its trainer may start.
    Admitted,
}

/// One participant as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainerView {
    /// `namespace/name` of the `HospitalClient`.
    pub reference: String,
    pub hospital: HospitalView,
    pub job: JobView,
    /// Whether the durable ledger records this round's trainer as started (read when its Job is
    /// absent).
    pub started: bool,
}

/// The round's study as observed.
#[derive(Debug, Clone, PartialEq)]
pub enum StudyView {
    /// No study of the round's name.
    Missing(String),
    /// Being deleted: the study's finalizer cleans up; the round waits.
    Deleting,
    /// The study exists but did not make this round (why, from [`super::refusal`]).
    Refused(String),
    /// The study that made this round.
    Present(StudyFacts),
}

/// What the machine needs of the study.
#[derive(Debug, Clone, PartialEq)]
pub struct StudyFacts {
    /// The hash of the study's terms now.
    pub consent_hash: String,
    /// The operator-side life of a round, in seconds from its creation.
    pub max_life_secs: i64,
    pub fairness: FairnessSpec,
}

/// What the round itself says.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoundFacts {
    pub generation: Option<i64>,
    pub round: u32,
    pub min_participants: u32,
    /// Creation time, seconds since the epoch.
    pub created: i64,
    /// The consent hash the round was created under.
    pub consent_hash: Option<String>,
    /// Being deleted.
    pub deleting: bool,
    /// The aggregator Job's name (for messages).
    pub aggregator_job: String,
}

/// The ledgers' answer to [`Action::Settle`]: ε spent after the round by each participant
/// (`namespace/name`), empty for a study without DP.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Settlement {
    pub epsilon_spent: BTreeMap<String, f64>,
}

/// Everything one reconcile observed.
#[derive(Debug, Clone, PartialEq)]
pub struct Observations {
    pub round: RoundFacts,
    pub study: StudyView,
    /// Whether the aggregator's endpoint is known (its Service exists and has what the endpoint
    /// mode needs).
    pub endpoint_ready: bool,
    pub aggregator: JobView,
    /// The aggregator's outcome from its termination message (read once it ended).
    pub outcome: Option<RoundOutcome>,
    /// One per participant, in the round's order.
    pub trainers: Vec<TrainerView>,
    /// How often a running round is looked at.
    pub poll: Duration,
    /// The ledgers' answer, once [`Action::Settle`] ran in this reconcile.
    pub settled: Option<Settlement>,
}

/// The figures of a succeeded round, for the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundResults {
    pub participants: usize,
    pub accuracy: Option<f64>,
    pub worst_group_accuracy: Option<f64>,
    pub demographic_parity_difference: Option<f64>,
    pub equalized_odds_difference: Option<f64>,
    pub max_demographic_parity_difference: f64,
    pub max_equalized_odds_difference: f64,
}

/// What the runtime does, in order. Each is idempotent: a crash between two leaves a state from
/// which the next reconcile's [`step`] continues.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// The study's CA, the aggregator's certificate and, with TFHE, the study's key.
    EnsureStudySecrets,
    CreateAggregatorJob,
    DeleteAggregatorJob,
    /// Participant `i`'s certificate, key copy and `ServiceAccount`, and its trainer Job, suspended.
    CreateTrainerJob(usize),
    /// Records in participant `i`'s durable ledger that its trainer starts (an error with DP when
    /// the round's spending is not reserved: no trainer runs on unpaid budget).
    MarkStarted(usize),
    ResumeTrainerJob(usize),
    /// Deletes participant `i`'s suspended trainer Job (it never ran) when the round ends.
    DeleteTrainerJob(usize),
    /// Settles the round in every participant's ledger; the answer comes back as
    /// [`Observations::settled`].
    Settle,
    /// Writes the status of the step's new state (server-side apply).
    WriteStatus,
    Event {
        warning: bool,
        reason: String,
        action: &'static str,
        message: String,
    },
    /// Counts the ended round in the metrics (`Succeeded` or `Failed`).
    CountRound(&'static str),
    RecordResults(RoundResults),
    /// Look again after this long (none: wait for a change).
    Requeue(Duration),
}

impl Action {
    fn event(warning: bool, reason: &str, action: &'static str, message: impl Into<String>) -> Self {
        Action::Event {
            warning,
            reason: reason.to_string(),
            action,
            message: message.into(),
        }
    }
}

/// Whether the runtime takes another step at once after applying `actions`: when the step began
/// an ending (the settlement follows) or asked for the settlement (the result follows).
#[must_use]
pub fn steps_again(before: &RoundState, after: &RoundState, actions: &[Action]) -> bool {
    actions.contains(&Action::Settle)
        || (matches!(after.phase(), Phase::Settling { .. })
            && !matches!(before.phase(), Phase::Settling { .. }))
}

/// One step of the machine. A step that moves the round to `Settling`, or that asked for
/// [`Action::Settle`], is followed by another step in the same reconcile (with the settlement in
/// the observations); every other step waits for the next reconcile.
#[must_use]
pub fn step(state: &RoundState, obs: &Observations, now: Timestamp) -> (RoundState, Vec<Action>) {
    let phase = state.phase();
    if phase.is_terminal() || obs.round.deleting {
        return (state.clone(), Vec::new());
    }
    let mut m = Step {
        status: state.status.clone(),
        actions: Vec::new(),
        obs,
        now,
    };
    m.status.observed_generation = obs.round.generation;
    // Who made the round is checked in every phase: a status written by hand proves nothing.
    match (&obs.study, phase) {
        (StudyView::Missing(name), _) => m.refuse(format!(
            "FederatedStudy {name} does not exist: rounds are created only by the operator's study controller; nothing was scheduled"
        )),
        (StudyView::Refused(msg), _) => m.refuse(msg.clone()),
        (StudyView::Deleting, _) => return (state.clone(), Vec::new()),
        (StudyView::Present(study), Phase::Settling { reason, message }) => m.settle(study, &reason, &message),
        (StudyView::Present(study), _) => m.run(study),
    }
    (RoundState { status: m.status }, m.actions)
}

/// What becomes of one participant's trainer.
enum Trainer {
    /// Its `HospitalClient` is gone: it does not report.
    Gone,
    /// Its Job runs or completed.
    Runs,
    /// It failed, or will never run (why, for the status).
    Failed(String),
    /// Its Job is to be created (if absent) and started.
    Starts,
}

fn trainer(t: &TrainerView) -> Trainer {
    match (&t.job, t.hospital) {
        (_, HospitalView::Gone) => Trainer::Gone,
        (JobView::Failed(m), _) => Trainer::Failed(format!("{} ({m})", t.reference)),
        (JobView::Active | JobView::Complete, _) => Trainer::Runs,
        (JobView::Absent | JobView::Suspended, HospitalView::Withdrawn) => Trainer::Failed(format!(
            "{} (no longer consents to these terms or allows this trainer image: its trainer was not started)",
            t.reference
        )),
        (JobView::Absent, HospitalView::Admitted) if t.started => Trainer::Failed(format!(
            "{} (its trainer Job is gone and is never created twice for one round)",
            t.reference
        )),
        (JobView::Absent | JobView::Suspended, HospitalView::Admitted) => Trainer::Starts,
    }
}

struct Step<'a> {
    status: TrainingRoundStatus,
    actions: Vec<Action>,
    obs: &'a Observations,
    now: Timestamp,
}

impl Step<'_> {
    fn condition(&mut self, type_: &str, status: &str, reason: &str, message: String) -> bool {
        set_condition_at(
            &mut self.status.conditions,
            type_,
            status,
            reason,
            message,
            self.obs.round.generation,
            self.now,
        )
    }

    /// A round that is not (yet) ending.
    fn run(&mut self, study: &StudyFacts) {
        let obs = self.obs;
        if obs.round.consent_hash.as_deref() != Some(study.consent_hash.as_str()) {
            return self.begin_ending(
                STUDY_CHANGED,
                format!(
                    "the study's terms changed after this round started (consent hash {} is now {}): its hospitals consented to the old terms; no new trainer Job starts",
                    obs.round.consent_hash.clone().unwrap_or_default(),
                    study.consent_hash
                ),
            );
        }
        let deadline = obs.round.created + study.max_life_secs;
        if self.now.as_second() > deadline {
            return self.begin_ending(
                DEADLINE_EXCEEDED,
                format!(
                    "the round did not end within {} s of its creation (3 x rounds.deadlineSeconds + 600): its aggregator Job was deleted",
                    study.max_life_secs
                ),
            );
        }
        if obs.aggregator.ended() {
            return self.begin_ending(AGGREGATOR_ENDED, String::new());
        }

        self.actions.push(Action::EnsureStudySecrets);
        if !obs.endpoint_ready {
            // The Service is the study controller's; until it exists, wait.
            self.actions.push(Action::Requeue(Duration::from_secs(2)));
            return;
        }
        if obs.aggregator == JobView::Absent {
            self.actions.push(Action::CreateAggregatorJob);
            self.actions.push(Action::event(
                false,
                "AggregatorJobCreated",
                "CreateJob",
                format!("created aggregator Job {}", obs.round.aggregator_job),
            ));
        }

        let mut failures = Vec::new();
        let mut missing = Vec::new();
        for (i, t) in obs.trainers.iter().enumerate() {
            match trainer(t) {
                Trainer::Gone => missing.push(t.reference.clone()),
                Trainer::Runs => {}
                Trainer::Failed(why) => failures.push(why),
                Trainer::Starts => {
                    if t.job == JobView::Absent {
                        self.actions.push(Action::CreateTrainerJob(i));
                    }
                    self.actions.push(Action::MarkStarted(i));
                    self.actions.push(Action::ResumeTrainerJob(i));
                    self.actions.push(Action::event(
                        false,
                        "TrainerJobCreated",
                        "CreateJob",
                        format!("started the trainer Job for {}", t.reference),
                    ));
                }
            }
        }

        if self.status.start_time.is_none() {
            self.status.start_time = Some(Time(self.now));
        }
        let running = obs.trainers.len() - missing.len();
        let mut msg = if failures.is_empty() {
            format!("aggregator and {running} trainer Jobs running")
        } else {
            format!("running; trainer Jobs failed: {}", failures.join("; "))
        };
        if !missing.is_empty() {
            msg += "; HospitalClient gone: ";
            msg += &missing.join(", ");
        }
        if self.condition(types::SUCCEEDED, cstatus::UNKNOWN, RUNNING, msg) {
            for f in &failures {
                self.actions.push(Action::event(
                    true,
                    "TrainerFailed",
                    "ObserveJob",
                    format!("trainer Job failed: {f}"),
                ));
            }
            self.actions.push(Action::WriteStatus);
        }
        // Come back at the round's deadline at the latest.
        let left = u64::try_from((deadline - self.now.as_second()).max(1)).unwrap_or(1);
        self.actions
            .push(Action::Requeue(obs.poll.min(Duration::from_secs(left))));
    }

    /// Ends a round the study controller did not make: nothing is scheduled, no ledger is touched.
    fn refuse(&mut self, msg: String) {
        self.actions.push(Action::DeleteAggregatorJob);
        self.condition(
            types::SUCCEEDED,
            cstatus::FALSE,
            NOT_CREATED_BY_OPERATOR,
            msg.clone(),
        );
        self.status.completion_time = Some(Time(self.now));
        self.actions.push(Action::WriteStatus);
        self.actions
            .push(Action::event(true, NOT_CREATED_BY_OPERATOR, "Abort", msg));
    }

    /// Records the decision to end before anything irreversible happens.
    fn begin_ending(&mut self, reason: &str, message: String) {
        self.condition(
            types::SUCCEEDED,
            cstatus::UNKNOWN,
            SETTLING,
            format!("{reason}: {message}"),
        );
        self.actions.push(Action::WriteStatus);
    }

    /// Finishes the ending recorded in the status: settle, then the result.
    fn settle(&mut self, study: &StudyFacts, reason: &str, message: &str) {
        let obs = self.obs;
        let Some(settled) = &obs.settled else {
            if reason != AGGREGATOR_ENDED {
                self.actions.push(Action::DeleteAggregatorJob);
            }
            for (i, t) in obs.trainers.iter().enumerate() {
                if t.job == JobView::Suspended {
                    self.actions.push(Action::DeleteTrainerJob(i));
                }
            }
            self.actions.push(Action::Settle);
            return;
        };
        self.status.epsilon_spent = settled.epsilon_spent.clone();
        self.status.epsilon_spent_max = settled.epsilon_spent.values().copied().reduce(f64::max);
        if reason == AGGREGATOR_ENDED {
            self.finish(&study.fairness);
        } else {
            self.fail(reason, message.to_string());
        }
    }

    fn fail(&mut self, reason: &str, msg: String) {
        self.condition(types::SUCCEEDED, cstatus::FALSE, reason, msg.clone());
        self.status.completion_time = Some(Time(self.now));
        self.actions.push(Action::WriteStatus);
        self.actions.push(Action::event(true, reason, "Abort", msg));
        self.actions.push(Action::CountRound("Failed"));
    }

    /// The result of a round whose aggregator ended, from its outcome.
    fn finish(&mut self, fairness: &FairnessSpec) {
        let obs = self.obs;
        let failures: Vec<String> = obs
            .trainers
            .iter()
            .filter_map(|t| match trainer(t) {
                Trainer::Failed(why) => Some(why),
                _ => None,
            })
            .collect();
        let failures =
            (!failures.is_empty()).then(|| format!("; trainer Jobs failed: {}", failures.join("; ")));
        let n = obs.trainers.len();
        self.status.completion_time = Some(Time(self.now));
        match (&obs.outcome, &obs.aggregator) {
            (Some(o), JobView::Complete) if o.status == "succeeded" => {
                let reported: Vec<String> = obs
                    .trainers
                    .iter()
                    .filter(|t| {
                        let (hns, hname) = t.reference.split_once('/').unwrap_or(("", &t.reference));
                        o.participants.contains(&crate::names::hospital_id(hns, hname))
                    })
                    .map(|t| t.reference.clone())
                    .collect();
                let s = &mut self.status;
                s.participation = Some(format!("{}/{n}", reported.len()));
                s.reported = reported;
                s.accuracy = o.accuracy.map(round4);
                s.loss = o.loss.map(round4);
                s.demographic_parity_difference = o.max_gap(|g| g.demographic_parity_difference).map(round4);
                s.equalized_odds_difference = o.max_gap(|g| g.equalized_odds_difference).map(round4);
                s.worst_group_accuracy = o
                    .attributes
                    .values()
                    .filter_map(|g| g.worst_group_accuracy)
                    .reduce(f64::min)
                    .map(round4);
                self.condition(
                    types::QUORUM_REACHED,
                    cstatus::TRUE,
                    "QuorumReached",
                    format!(
                        "{} of {n} hospitals' updates aggregated (quorum {})",
                        o.participants.len(),
                        obs.round.min_participants
                    ),
                );
                let v = plan::round_verdict(fairness, o);
                self.condition(
                    types::FAIRNESS_WITHIN_THRESHOLD,
                    v.outcome.condition_status(),
                    &v.reason,
                    v.message.clone(),
                );
                let msg = format!(
                    "round {} aggregated {} of {n} hospitals; accuracy {}{}",
                    obs.round.round,
                    o.participants.len(),
                    o.accuracy.map_or_else(|| "n/a".into(), |a| format!("{a:.4}")),
                    failures.unwrap_or_default()
                );
                self.condition(types::SUCCEEDED, cstatus::TRUE, "Succeeded", msg.clone());
                self.actions.push(Action::WriteStatus);
                self.actions
                    .push(Action::event(false, "RoundSucceeded", "Aggregate", msg));
                if v.outcome == Outcome::Fail {
                    self.actions
                        .push(Action::event(true, "FairnessViolated", "Evaluate", v.message));
                }
                self.actions.push(Action::CountRound("Succeeded"));
                self.actions.push(Action::RecordResults(RoundResults {
                    participants: o.participants.len(),
                    accuracy: o.accuracy,
                    worst_group_accuracy: self.status.worst_group_accuracy,
                    demographic_parity_difference: self.status.demographic_parity_difference,
                    equalized_odds_difference: self.status.equalized_odds_difference,
                    max_demographic_parity_difference: fairness.max_demographic_parity_difference,
                    max_equalized_odds_difference: fairness.max_equalized_odds_difference,
                }));
            }
            (outcome, job) => {
                let (reason, msg) = match outcome {
                    Some(o) if o.message.contains("quorum") => ("QuorumNotReached", o.message.clone()),
                    Some(o) => ("AggregatorFailed", o.message.clone()),
                    None => (
                        "AggregatorFailed",
                        format!(
                            "aggregator Job {} {}; no outcome in its termination message",
                            obs.round.aggregator_job,
                            job.failure()
                        ),
                    ),
                };
                let msg = format!("{msg}{}", failures.unwrap_or_default());
                if reason == "QuorumNotReached" {
                    self.condition(types::QUORUM_REACHED, cstatus::FALSE, reason, msg.clone());
                }
                self.condition(types::SUCCEEDED, cstatus::FALSE, reason, msg.clone());
                self.actions.push(Action::WriteStatus);
                self.actions.push(Action::event(true, reason, "Aggregate", msg));
                self.actions.push(Action::CountRound("Failed"));
            }
        }
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

#[cfg(test)]
mod tests;
