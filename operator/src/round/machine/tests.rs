//! The round machine without a cluster: a table of transitions, and a property test that drives
//! it through random worlds, crashes and restarts.

use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, status as cstatus, types};
use caduceus_crds::study::FairnessSpec;
use caduceus_fairness::RoundOutcome;
use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;
use serde_json::json;

use super::*;

const CREATED: i64 = 1_800_000_000;
const MAX_LIFE: i64 = 2_400;
const HASH: &str = "terms-v1";

fn now(offset: i64) -> Timestamp {
    Timestamp::from_second(CREATED + offset).unwrap()
}

fn trainer(i: usize) -> TrainerView {
    TrainerView {
        reference: format!("h{i}/hospital-{i}"),
        hospital: HospitalView::Admitted,
        job: JobView::Absent,
        started: false,
    }
}

fn obs(n: usize) -> Observations {
    Observations {
        round: RoundFacts {
            generation: Some(1),
            round: 3,
            min_participants: 2,
            created: CREATED,
            consent_hash: Some(HASH.into()),
            deleting: false,
            aggregator_job: "study-ns/aggregator-r".into(),
        },
        study: StudyView::Present(StudyFacts {
            consent_hash: HASH.into(),
            max_life_secs: MAX_LIFE,
            fairness: FairnessSpec::default(),
        }),
        endpoint_ready: true,
        aggregator: JobView::Absent,
        outcome: None,
        trainers: (0..n).map(trainer).collect(),
        poll: Duration::from_secs(15),
        settled: None,
    }
}

fn hospital_id(i: usize) -> String {
    crate::names::hospital_id(&format!("h{i}"), &format!("hospital-{i}"))
}

fn outcome(ok: bool, reported: &[usize]) -> RoundOutcome {
    serde_json::from_value(json!({
        "status": if ok { "succeeded" } else { "failed" },
        "message": if ok { "aggregated" } else { "quorum not reached: 1 of 2 updates" },
        "roundsCompleted": 3,
        "participants": reported.iter().map(|i| hospital_id(*i)).collect::<Vec<_>>(),
        "accuracy": 0.81234,
        "loss": 0.5,
        "evaluated": 100,
        "minGroupSize": 5,
        "attributes": {"race": {"demographicParityDifference": 0.05, "equalizedOddsDifference": 0.07, "worstGroupAccuracy": 0.7}},
    }))
    .unwrap()
}

fn running() -> RoundState {
    let mut s = RoundState::default();
    set_condition_at(
        &mut s.status.conditions,
        types::SUCCEEDED,
        cstatus::UNKNOWN,
        RUNNING,
        "running",
        Some(1),
        now(0),
    );
    s
}

fn settling(reason: &str, message: &str) -> RoundState {
    let mut s = RoundState::default();
    set_condition_at(
        &mut s.status.conditions,
        types::SUCCEEDED,
        cstatus::UNKNOWN,
        SETTLING,
        format!("{reason}: {message}"),
        Some(1),
        now(0),
    );
    s
}

fn succeeded(state: &RoundState) -> (String, String, String) {
    let c = state.status.conditions.condition(types::SUCCEEDED).unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn without_events(actions: &[Action]) -> Vec<Action> {
    actions
        .iter()
        .filter(|a| !matches!(a, Action::Event { .. }))
        .cloned()
        .collect()
}

/// Steps as the runtime does within one reconcile (no crash), answering settlements with `eps`.
fn reconcile(state: &RoundState, o: &Observations, at: Timestamp, eps: f64) -> (RoundState, Vec<Action>) {
    let mut o = o.clone();
    let mut state = state.clone();
    let mut all = Vec::new();
    for _ in 0..3 {
        let (next, actions) = step(&state, &o, at);
        let again = steps_again(&state, &next, &actions);
        if actions.contains(&Action::Settle) {
            o.settled = Some(Settlement {
                epsilon_spent: o.trainers.iter().map(|t| (t.reference.clone(), eps)).collect(),
            });
        }
        state = next;
        all.extend(actions);
        if !again {
            break;
        }
    }
    (state, all)
}

// --- the table of transitions -------------------------------------------------------------------

#[test]
fn a_new_round_creates_the_aggregator_and_each_trainer_suspended_then_started() {
    let (next, actions) = step(&RoundState::default(), &obs(2), now(10));
    assert_eq!(
        without_events(&actions),
        vec![
            Action::EnsureStudySecrets,
            Action::CreateAggregatorJob,
            Action::CreateTrainerJob(0),
            Action::MarkStarted(0),
            Action::ResumeTrainerJob(0),
            Action::CreateTrainerJob(1),
            Action::MarkStarted(1),
            Action::ResumeTrainerJob(1),
            Action::WriteStatus,
            Action::Requeue(Duration::from_secs(15)),
        ]
    );
    assert_eq!(next.phase(), Phase::Running);
    assert_eq!(next.status.start_time.as_ref().map(|t| t.0), Some(now(10)));
    assert_eq!(next.status.observed_generation, Some(1));
    assert!(!steps_again(&RoundState::default(), &next, &actions));
}

#[test]
fn a_running_round_with_nothing_new_writes_nothing() {
    let mut o = obs(2);
    o.aggregator = JobView::Active;
    for t in &mut o.trainers {
        t.job = JobView::Active;
    }
    let (first, _) = step(&RoundState::default(), &o, now(10));
    let (second, actions) = step(&first, &o, now(40));
    assert_eq!(
        actions,
        vec![
            Action::EnsureStudySecrets,
            Action::Requeue(Duration::from_secs(15))
        ]
    );
    assert_eq!(second, first, "the start time is kept");
}

#[test]
fn a_suspended_trainer_is_started_without_being_created_again() {
    let mut o = obs(1);
    o.aggregator = JobView::Active;
    o.trainers[0].job = JobView::Suspended;
    let (_, actions) = step(&running(), &o, now(10));
    assert!(!actions.contains(&Action::CreateTrainerJob(0)));
    assert!(actions.contains(&Action::MarkStarted(0)));
    assert!(actions.contains(&Action::ResumeTrainerJob(0)));
}

#[test]
fn a_trainer_job_gone_after_its_start_is_never_created_again() {
    let mut o = obs(2);
    o.aggregator = JobView::Active;
    o.trainers[0].started = true;
    o.trainers[1].job = JobView::Active;
    let (next, actions) = step(&running(), &o, now(10));
    assert!(!actions.iter().any(|a| matches!(
        a,
        Action::CreateTrainerJob(_) | Action::MarkStarted(_) | Action::ResumeTrainerJob(_)
    )));
    let (_, _, msg) = succeeded(&next);
    assert!(
        msg.contains("h0/hospital-0 (its trainer Job is gone and is never created twice"),
        "{msg}"
    );
    assert!(actions.contains(&Action::WriteStatus));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Event { reason, warning: true, .. } if reason == "TrainerFailed"))
    );
}

#[test]
fn a_hospital_that_withdrew_gets_no_trainer_and_a_gone_one_is_reported() {
    let mut o = obs(3);
    o.aggregator = JobView::Active;
    o.trainers[0].hospital = HospitalView::Withdrawn;
    o.trainers[1].hospital = HospitalView::Withdrawn;
    o.trainers[1].job = JobView::Suspended;
    o.trainers[2].hospital = HospitalView::Gone;
    let (next, actions) = step(&running(), &o, now(10));
    assert!(!actions.iter().any(|a| matches!(
        a,
        Action::CreateTrainerJob(_) | Action::MarkStarted(_) | Action::ResumeTrainerJob(_)
    )));
    let (status, reason, msg) = succeeded(&next);
    assert_eq!((status.as_str(), reason.as_str()), (cstatus::UNKNOWN, RUNNING));
    assert!(msg.contains("h0/hospital-0 (no longer consents"), "{msg}");
    assert!(msg.contains("h1/hospital-1 (no longer consents"), "{msg}");
    assert!(msg.ends_with("; HospitalClient gone: h2/hospital-2"), "{msg}");
}

#[test]
fn a_failed_trainer_is_reported_while_the_round_runs() {
    let mut o = obs(2);
    o.aggregator = JobView::Active;
    o.trainers[0].job = JobView::Failed("BackoffLimitExceeded: exit 1".into());
    o.trainers[1].job = JobView::Complete;
    let (next, _) = step(&running(), &o, now(10));
    let (_, _, msg) = succeeded(&next);
    assert_eq!(
        msg,
        "running; trainer Jobs failed: h0/hospital-0 (BackoffLimitExceeded: exit 1)"
    );
}

#[test]
fn without_an_endpoint_the_round_waits_and_creates_nothing() {
    let mut o = obs(2);
    o.endpoint_ready = false;
    let (next, actions) = step(&RoundState::default(), &o, now(10));
    assert_eq!(
        actions,
        vec![
            Action::EnsureStudySecrets,
            Action::Requeue(Duration::from_secs(2))
        ]
    );
    assert_eq!(next.phase(), Phase::Pending);
}

#[test]
fn the_requeue_comes_at_the_deadline_when_that_is_sooner_than_the_poll() {
    let mut o = obs(1);
    o.aggregator = JobView::Active;
    o.trainers[0].job = JobView::Active;
    let (_, actions) = step(&running(), &o, now(MAX_LIFE - 4));
    assert_eq!(actions.last(), Some(&Action::Requeue(Duration::from_secs(4))));
}

#[test]
fn a_round_the_study_did_not_make_ends_at_once_and_touches_no_ledger() {
    for study in [
        StudyView::Missing("ns/s".into()),
        StudyView::Refused("not signed".into()),
    ] {
        for state in [RoundState::default(), running(), settling(STUDY_CHANGED, "x")] {
            let mut o = obs(2);
            o.study = study.clone();
            let (next, actions) = reconcile(&state, &o, now(10), 1.0);
            assert_eq!(
                without_events(&actions),
                vec![Action::DeleteAggregatorJob, Action::WriteStatus],
                "{study:?} {state:?}"
            );
            let (status, reason, _) = succeeded(&next);
            assert_eq!(
                (status.as_str(), reason.as_str()),
                (cstatus::FALSE, NOT_CREATED_BY_OPERATOR)
            );
            assert!(next.status.epsilon_spent.is_empty());
        }
    }
}

#[test]
fn nothing_happens_to_a_finished_or_deleted_round_or_while_the_study_is_deleted() {
    let (done, _) = reconcile(
        &running(),
        &{
            let mut o = obs(1);
            o.aggregator = JobView::Complete;
            o.outcome = Some(outcome(true, &[0]));
            o
        },
        now(10),
        1.0,
    );
    assert_eq!(done.phase(), Phase::Succeeded);
    let mut o = obs(1);
    o.consent_hash_changed_for_test();
    assert_eq!(step(&done, &o, now(MAX_LIFE + 10)), (done.clone(), vec![]));
    let mut o = obs(1);
    o.round.deleting = true;
    assert_eq!(step(&running(), &o, now(10)), (running(), vec![]));
    let mut o = obs(1);
    o.study = StudyView::Deleting;
    assert_eq!(step(&settling(DEADLINE_EXCEEDED, "x"), &o, now(10)).1, vec![]);
}

impl Observations {
    fn consent_hash_changed_for_test(&mut self) {
        if let StudyView::Present(s) = &mut self.study {
            s.consent_hash = "terms-v2".into();
        }
    }
}

#[test]
fn changed_terms_end_the_round_through_settling() {
    let mut o = obs(2);
    o.aggregator = JobView::Active;
    o.trainers[0].job = JobView::Active;
    o.trainers[1].job = JobView::Suspended;
    o.consent_hash_changed_for_test();
    let (next, actions) = step(&running(), &o, now(10));
    assert_eq!(actions, vec![Action::WriteStatus]);
    assert!(matches!(next.phase(), Phase::Settling { ref reason, .. } if reason == STUDY_CHANGED));
    assert!(steps_again(&running(), &next, &actions));

    let (after, actions) = step(&next, &o, now(11));
    assert_eq!(
        actions,
        vec![
            Action::DeleteAggregatorJob,
            Action::DeleteTrainerJob(1),
            Action::Settle
        ]
    );
    assert!(steps_again(&next, &after, &actions));

    o.settled = Some(Settlement {
        epsilon_spent: [
            ("h0/hospital-0".to_string(), 1.5),
            ("h1/hospital-1".to_string(), 0.5),
        ]
        .into(),
    });
    let (done, actions) = step(&after, &o, now(12));
    let (status, reason, msg) = succeeded(&done);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        (cstatus::FALSE, STUDY_CHANGED)
    );
    assert!(msg.contains("consent hash terms-v1 is now terms-v2"), "{msg}");
    assert_eq!(done.status.epsilon_spent_max, Some(1.5));
    assert_eq!(done.status.completion_time.as_ref().map(|t| t.0), Some(now(12)));
    assert_eq!(
        without_events(&actions),
        vec![Action::WriteStatus, Action::CountRound("Failed")]
    );
    assert!(!steps_again(&after, &done, &actions));
}

#[test]
fn a_round_past_its_deadline_is_settled_and_fails() {
    let mut o = obs(1);
    o.aggregator = JobView::Active;
    o.trainers[0].job = JobView::Active;
    let (done, actions) = reconcile(&running(), &o, now(MAX_LIFE + 1), 2.0);
    assert!(actions.contains(&Action::DeleteAggregatorJob));
    assert!(actions.contains(&Action::Settle));
    let (status, reason, _) = succeeded(&done);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        (cstatus::FALSE, DEADLINE_EXCEEDED)
    );
    assert_eq!(done.status.epsilon_spent.get("h0/hospital-0"), Some(&2.0));
}

#[test]
fn a_succeeded_aggregator_gives_the_round_its_results() {
    let mut o = obs(3);
    o.aggregator = JobView::Complete;
    o.outcome = Some(outcome(true, &[0, 2]));
    o.trainers[0].job = JobView::Complete;
    o.trainers[1].job = JobView::Failed("DeadlineExceeded: too slow".into());
    o.trainers[2].job = JobView::Complete;
    o.trainers.push(TrainerView {
        started: true,
        ..trainer(3)
    });
    let (done, actions) = reconcile(&running(), &o, now(100), 0.25);
    assert!(
        !actions.contains(&Action::DeleteAggregatorJob),
        "its pods hold the outcome"
    );
    let (status, reason, msg) = succeeded(&done);
    assert_eq!((status.as_str(), reason.as_str()), (cstatus::TRUE, "Succeeded"));
    assert_eq!(
        msg,
        "round 3 aggregated 2 of 4 hospitals; accuracy 0.8123; trainer Jobs failed: h1/hospital-1 (DeadlineExceeded: too slow); h3/hospital-3 (its trainer Job is gone and is never created twice for one round)"
    );
    let s = &done.status;
    assert_eq!(s.reported, vec!["h0/hospital-0", "h2/hospital-2"]);
    assert_eq!(s.participation.as_deref(), Some("2/4"));
    assert_eq!(s.accuracy, Some(0.8123));
    assert_eq!(s.worst_group_accuracy, Some(0.7));
    assert_eq!(s.equalized_odds_difference, Some(0.07));
    assert_eq!(s.epsilon_spent_max, Some(0.25));
    assert_eq!(
        s.conditions
            .condition(types::QUORUM_REACHED)
            .map(|c| c.status.as_str()),
        Some(cstatus::TRUE)
    );
    assert!(s.conditions.condition(types::FAIRNESS_WITHIN_THRESHOLD).is_some());
    assert!(actions.contains(&Action::CountRound("Succeeded")));
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::RecordResults(r) if r.participants == 2))
    );
}

#[test]
fn a_failed_aggregator_fails_the_round_with_its_reason() {
    let cases = [
        (
            JobView::Failed("BackoffLimitExceeded: exit 1".into()),
            Some(outcome(false, &[0])),
            "QuorumNotReached",
        ),
        (JobView::Complete, None, "AggregatorFailed"),
        (
            JobView::Failed("BackoffLimitExceeded: exit 2".into()),
            None,
            "AggregatorFailed",
        ),
    ];
    for (job, out, want) in cases {
        let mut o = obs(2);
        o.aggregator = job.clone();
        o.outcome = out;
        let (done, actions) = reconcile(&running(), &o, now(100), 0.5);
        let (status, reason, msg) = succeeded(&done);
        assert_eq!(
            (status.as_str(), reason.as_str()),
            (cstatus::FALSE, want),
            "{job:?}"
        );
        assert!(actions.contains(&Action::Settle));
        assert!(actions.contains(&Action::CountRound("Failed")));
        let quorum = done
            .status
            .conditions
            .condition(types::QUORUM_REACHED)
            .map(|c| c.status.clone());
        assert_eq!(
            quorum.as_deref(),
            (want == "QuorumNotReached").then_some(cstatus::FALSE)
        );
        if job == JobView::Failed("BackoffLimitExceeded: exit 2".into()) {
            assert_eq!(
                msg,
                "aggregator Job study-ns/aggregator-r BackoffLimitExceeded: exit 2; no outcome in its termination message"
            );
        }
    }
}

#[test]
fn no_trainer_starts_once_the_aggregator_has_ended() {
    let mut o = obs(2);
    o.aggregator = JobView::Complete;
    o.outcome = Some(outcome(true, &[1]));
    o.trainers[0].job = JobView::Suspended;
    o.trainers[1].job = JobView::Complete;
    let (done, actions) = reconcile(&running(), &o, now(100), 0.5);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::MarkStarted(_) | Action::ResumeTrainerJob(_)))
    );
    assert!(
        actions.contains(&Action::DeleteTrainerJob(0)),
        "the suspended Job never ran"
    );
    assert_eq!(done.phase(), Phase::Succeeded);
}

#[test]
fn a_settling_round_finishes_its_ending_whatever_the_world_says_now() {
    // The terms changed, the decision was written, then the operator crashed; the terms changed
    // back: the round still ends as decided and never starts a trainer again.
    let state = settling(STUDY_CHANGED, "the study's terms changed: x");
    let mut o = obs(1);
    o.aggregator = JobView::Absent;
    let (done, actions) = reconcile(&state, &o, now(10), 0.5);
    assert!(!actions.iter().any(|a| matches!(
        a,
        Action::CreateAggregatorJob | Action::CreateTrainerJob(_) | Action::MarkStarted(_)
    )));
    let (status, reason, msg) = succeeded(&done);
    assert_eq!(
        (status.as_str(), reason.as_str(), msg.as_str()),
        (cstatus::FALSE, STUDY_CHANGED, "the study's terms changed: x")
    );
}

#[test]
fn the_phase_is_read_back_from_the_status_alone() {
    assert_eq!(RoundState::from_status(None).phase(), Phase::Pending);
    assert_eq!(running().phase(), Phase::Running);
    assert_eq!(
        settling(DEADLINE_EXCEEDED, "a: b").phase(),
        Phase::Settling {
            reason: DEADLINE_EXCEEDED.into(),
            message: "a: b".into()
        }
    );
    let mut s = running();
    set_condition_at(
        &mut s.status.conditions,
        types::SUCCEEDED,
        cstatus::TRUE,
        "Succeeded",
        "ok",
        Some(1),
        now(0),
    );
    assert_eq!(s.phase(), Phase::Succeeded);
    assert!(s.phase().is_terminal());
}

// --- the property: any interleaving of world events, crashes and restarts -----------------------

/// One hospital's durable ledger for this round's key, as `ledger.rs` keeps it.
#[derive(Debug, Clone, Default)]
struct Ledger {
    reserved: bool,
    started: bool,
    committed: u32,
    cancelled: bool,
}

#[derive(Debug, Clone)]
struct Trainer {
    hospital: HospitalView,
    job: JobView,
    /// How often its Job went from suspended to running (it released an update each time).
    runs: u32,
    ledger: Ledger,
}

/// The world of one round: what the API server and the ledgers hold. The machine's state is read
/// back from `status` at every reconcile, so every reconcile is also a restart.
#[derive(Debug, Clone)]
struct World {
    dp: bool,
    status: Option<TrainingRoundStatus>,
    aggregator: JobView,
    outcome: Option<RoundOutcome>,
    trainers: Vec<Trainer>,
    consent_hash: String,
    endpoint_ready: bool,
    clock: i64,
}

#[derive(Debug, Clone)]
enum Event {
    /// A reconcile; `Some(n)`: the operator crashes after `n` actions.
    Reconcile(Option<usize>),
    TrainerEnds(usize, bool),
    AggregatorEnds {
        ok: bool,
        succeeded: bool,
    },
    TrainerJobDeleted(usize),
    AggregatorJobDeleted,
    Hospital(usize, HospitalView),
    Terms(bool),
    Endpoint(bool),
    Time(i64),
}

fn event(n: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => proptest::option::of(0usize..12).prop_map(Event::Reconcile),
        2 => (0..n, any::<bool>()).prop_map(|(i, ok)| Event::TrainerEnds(i, ok)),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(ok, succeeded)| Event::AggregatorEnds { ok, succeeded }),
        1 => (0..n).prop_map(Event::TrainerJobDeleted),
        1 => Just(Event::AggregatorJobDeleted),
        1 => (0..n, prop_oneof![Just(HospitalView::Admitted), Just(HospitalView::Withdrawn), Just(HospitalView::Gone)])
            .prop_map(|(i, h)| Event::Hospital(i, h)),
        1 => any::<bool>().prop_map(Event::Terms),
        1 => any::<bool>().prop_map(Event::Endpoint),
        1 => (1i64..900).prop_map(Event::Time),
    ]
}

/// Why applying stopped early.
#[derive(Debug)]
enum Stop {
    Crash,
    #[allow(dead_code)] // read in failure output
    Error(String),
}

impl World {
    fn new(n: usize, dp: bool) -> Self {
        Self {
            dp,
            status: None,
            aggregator: JobView::Absent,
            outcome: None,
            trainers: (0..n)
                .map(|_| Trainer {
                    hospital: HospitalView::Admitted,
                    job: JobView::Absent,
                    runs: 0,
                    // The study controller reserved the round's spending before creating it.
                    ledger: Ledger {
                        reserved: dp,
                        ..Ledger::default()
                    },
                })
                .collect(),
            consent_hash: HASH.into(),
            endpoint_ready: true,
            clock: 0,
        }
    }

    fn observe(&self) -> Observations {
        let mut o = obs(self.trainers.len());
        o.study = StudyView::Present(StudyFacts {
            consent_hash: self.consent_hash.clone(),
            max_life_secs: MAX_LIFE,
            fairness: FairnessSpec::default(),
        });
        o.endpoint_ready = self.endpoint_ready;
        o.aggregator = self.aggregator.clone();
        o.outcome = if o.aggregator.ended() {
            self.outcome.clone()
        } else {
            None
        };
        for (t, w) in o.trainers.iter_mut().zip(&self.trainers) {
            t.hospital = w.hospital;
            if w.hospital != HospitalView::Gone {
                t.job = w.job.clone();
                t.started = w.ledger.started;
            }
        }
        o
    }

    fn apply(&mut self, action: &Action, state: &RoundState, obs: &mut Observations) -> Result<(), String> {
        match action {
            Action::CreateAggregatorJob if self.aggregator == JobView::Absent => {
                self.aggregator = JobView::Active
            }
            Action::DeleteAggregatorJob => self.aggregator = JobView::Absent,
            Action::CreateTrainerJob(i) => {
                let t = &mut self.trainers[*i];
                if t.job == JobView::Absent {
                    t.job = JobView::Suspended;
                }
            }
            Action::MarkStarted(i) => {
                let l = &mut self.trainers[*i].ledger;
                if !(l.started || l.committed > 0) {
                    if self.dp && !l.reserved {
                        return Err(format!("hospital {i}: no reservation"));
                    }
                    l.started = true;
                }
            }
            Action::ResumeTrainerJob(i) => {
                let t = &mut self.trainers[*i];
                match t.job {
                    JobView::Absent => return Err(format!("trainer Job {i} not found")),
                    JobView::Suspended => {
                        assert!(t.ledger.started, "trainer {i} runs without a recorded start");
                        assert!(!self.dp || t.ledger.reserved, "trainer {i} runs on unpaid budget");
                        t.job = JobView::Active;
                        t.runs += 1;
                    }
                    _ => {}
                }
            }
            Action::DeleteTrainerJob(i) => {
                let t = &mut self.trainers[*i];
                if t.job == JobView::Suspended {
                    t.job = JobView::Absent;
                }
            }
            Action::Settle => {
                for (i, t) in self.trainers.iter_mut().enumerate() {
                    let l = &mut t.ledger;
                    let started = std::mem::take(&mut l.started);
                    if !self.dp {
                        continue;
                    }
                    if started || l.committed > 0 {
                        if l.reserved {
                            l.reserved = false;
                            l.committed += 1;
                        } else if l.committed == 0 {
                            return Err(format!("hospital {i}: commit without a reservation"));
                        }
                    } else if l.reserved {
                        l.reserved = false;
                        l.cancelled = true;
                    }
                }
                obs.settled = Some(Settlement {
                    epsilon_spent: if self.dp {
                        obs.trainers
                            .iter()
                            .zip(&self.trainers)
                            .map(|(t, w)| (t.reference.clone(), f64::from(w.ledger.committed)))
                            .collect()
                    } else {
                        Default::default()
                    },
                });
            }
            Action::WriteStatus => self.status = Some(state.status.clone()),
            _ => {}
        }
        Ok(())
    }

    /// One reconcile as `round::reconcile` runs it, crashing after `crash_after` actions.
    fn reconcile(&mut self, crash_after: Option<usize>) -> Result<(), Stop> {
        let mut state = RoundState::from_status(self.status.as_ref());
        if state.phase().is_terminal() {
            return Ok(());
        }
        let mut obs = self.observe();
        let mut applied = 0;
        for _ in 0..3 {
            let (next, actions) = step(&state, &obs, now(self.clock));
            let again = steps_again(&state, &next, &actions);
            state = next;
            for a in &actions {
                if crash_after == Some(applied) {
                    return Err(Stop::Crash);
                }
                self.apply(a, &state, &mut obs).map_err(Stop::Error)?;
                applied += 1;
            }
            if !again {
                break;
            }
        }
        Ok(())
    }

    fn world_event(&mut self, e: &Event) {
        let n = self.trainers.len();
        match e {
            Event::Reconcile(crash) => {
                let _ = self.reconcile(*crash);
            }
            Event::TrainerEnds(i, ok) => {
                let t = &mut self.trainers[*i % n];
                if t.job == JobView::Active {
                    t.job = if *ok {
                        JobView::Complete
                    } else {
                        JobView::Failed("Failed: exit 1".into())
                    };
                }
            }
            Event::AggregatorEnds { ok, succeeded } => {
                if self.aggregator == JobView::Active {
                    self.aggregator = if *ok {
                        JobView::Complete
                    } else {
                        JobView::Failed("Failed: exit 1".into())
                    };
                    let ran: Vec<usize> = (0..n).filter(|i| self.trainers[*i].runs > 0).collect();
                    self.outcome = Some(outcome(*succeeded, &ran));
                }
            }
            Event::TrainerJobDeleted(i) => self.trainers[*i % n].job = JobView::Absent,
            Event::AggregatorJobDeleted => self.aggregator = JobView::Absent,
            Event::Hospital(i, h) => self.trainers[*i % n].hospital = *h,
            Event::Terms(current) => {
                self.consent_hash = if *current { HASH.into() } else { "terms-v2".into() }
            }
            Event::Endpoint(ready) => self.endpoint_ready = *ready,
            Event::Time(s) => self.clock += s,
        }
    }

    fn check(&self, before: Option<&TrainingRoundStatus>) {
        for (i, t) in self.trainers.iter().enumerate() {
            assert!(
                t.runs <= 1,
                "trainer {i} released {} updates in one round",
                t.runs
            );
            assert!(
                t.ledger.committed <= 1,
                "hospital {i} charged {} times for one round",
                t.ledger.committed
            );
        }
        if let Some(before) = before
            && RoundState::from_status(Some(before)).phase().is_terminal()
        {
            assert_eq!(self.status.as_ref(), Some(before), "a finished round changed");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_round_charges_each_hospital_once_and_never_leaves_a_terminal_state(
        n in 1usize..4,
        dp in any::<bool>(),
        events in proptest::collection::vec(event(3), 0..40),
    ) {
        let mut w = World::new(n, dp);
        for e in &events {
            let before = w.status.clone();
            w.world_event(e);
            w.check(before.as_ref());
        }
        // Then the world settles down: the aggregator ends, time passes the deadline, the
        // operator runs without crashing. The round must end, with every ledger settled.
        w.endpoint_ready = true;
        w.world_event(&Event::AggregatorEnds { ok: true, succeeded: true });
        w.clock = w.clock.max(MAX_LIFE + 1);
        for _ in 0..4 {
            let before = w.status.clone();
            let _ = w.reconcile(None);
            w.check(before.as_ref());
        }
        let state = RoundState::from_status(w.status.as_ref());
        prop_assert!(state.phase().is_terminal(), "the round did not end: {:?}", state.phase());
        for (i, t) in w.trainers.iter().enumerate() {
            prop_assert!(!t.ledger.started, "hospital {} still has a started key", i);
            if dp {
                prop_assert!(!t.ledger.reserved, "hospital {}'s reservation was never settled", i);
                // Never under-counted: a trainer that ran is charged.
                prop_assert!(t.runs == 0 || t.ledger.committed == 1, "hospital {} ran uncharged", i);
            }
        }
    }
}
