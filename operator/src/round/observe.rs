//! Reads a round's world from the API server into the machine's [`Observations`] (and the objects
//! the actions need), without changing anything.

use caduceus_crds::{FederatedStudy, HospitalClient, TrainingRound};
use caduceus_fairness::RoundOutcome;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::machine::{HospitalView, JobView, Observations, RoundFacts, StudyFacts, StudyView, TrainerView};
use crate::build;
use crate::context::{Context, Result};
use crate::ledger;
use crate::names;

/// The objects behind the observations, for the actions that build Jobs and settle ledgers.
pub struct World {
    pub study: Option<FederatedStudy>,
    /// One per participant, in the round's order (`None`: gone, or not read).
    pub hospitals: Vec<Option<HospitalClient>>,
    pub endpoint: Option<build::Endpoint>,
}

/// `Complete` / `Failed` of a Job, if it ended.
pub fn job_outcome(job: &Job) -> Option<bool> {
    let conds = job.status.as_ref()?.conditions.as_ref()?;
    for c in conds {
        if c.status == "True" && c.type_ == "Complete" {
            return Some(true);
        }
        if c.status == "True" && c.type_ == "Failed" {
            return Some(false);
        }
    }
    None
}

/// `reason: message` of a Job's `Failed` condition.
pub fn job_failure_message(job: &Job) -> String {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Failed" && c.status == "True"))
        .map_or_else(
            || "failed".into(),
            |c| {
                format!(
                    "{}: {}",
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default()
                )
            },
        )
}

/// What the machine sees of a Job.
pub fn job_view(job: Option<&Job>) -> JobView {
    let Some(job) = job else { return JobView::Absent };
    match job_outcome(job) {
        Some(true) => JobView::Complete,
        Some(false) => JobView::Failed(job_failure_message(job)),
        None if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) => JobView::Suspended,
        None => JobView::Active,
    }
}

/// The termination messages of a Job's pods, newest last.
async fn termination_messages(ctx: &Context, ns: &str, job: &str) -> Result<Vec<(i32, String)>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut list = pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await?
        .items;
    list.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
    let mut out = Vec::new();
    for p in list {
        for cs in p.status.and_then(|s| s.container_statuses).unwrap_or_default() {
            if let Some(t) = cs.state.and_then(|s| s.terminated) {
                out.push((t.exit_code, t.message.unwrap_or_default()));
            }
        }
    }
    Ok(out)
}

/// Reads what the machine needs. A round whose study is missing, being deleted or refuses it is
/// not read further: its participants are reported as not observed (gone, no Job).
///
/// # Errors
/// An API read that fails.
pub async fn observe(ctx: &Context, round: &TrainingRound) -> Result<(Observations, World)> {
    let ns = round.namespace().unwrap_or_default();
    let agg_name = names::aggregator_job(&round.name_any());
    let mut obs = Observations {
        round: RoundFacts {
            generation: round.metadata.generation,
            round: round.spec.round,
            min_participants: round.spec.min_participants,
            created: round
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or_else(|| Timestamp::now().as_second(), |t| t.0.as_second()),
            consent_hash: round.spec.consent_hash.clone(),
            deleting: round.metadata.deletion_timestamp.is_some(),
            aggregator_job: format!("{ns}/{agg_name}"),
        },
        study: StudyView::Deleting,
        endpoint_ready: false,
        aggregator: JobView::Absent,
        outcome: None,
        trainers: round
            .spec
            .participants
            .iter()
            .map(|r| TrainerView {
                reference: r.clone(),
                hospital: HospitalView::Gone,
                job: JobView::Absent,
                started: false,
            })
            .collect(),
        poll: ctx.poll,
        settled: None,
    };
    let mut world = World {
        study: None,
        hospitals: vec![None; round.spec.participants.len()],
        endpoint: None,
    };

    let studies: Api<FederatedStudy> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(study) = studies.get_opt(&round.spec.study).await? else {
        obs.study = StudyView::Missing(format!("{ns}/{}", round.spec.study));
        return Ok((obs, world));
    };
    if study.metadata.deletion_timestamp.is_some() {
        return Ok((obs, world));
    }
    let key = ctx.signing_key().await?;
    if let Some(msg) = super::refusal(round, &study, key) {
        obs.study = StudyView::Refused(msg);
        return Ok((obs, world));
    }
    let hash = ctx.settings.consent_hash(&study);
    obs.study = StudyView::Present(StudyFacts {
        consent_hash: hash.clone(),
        max_life_secs: build::round_max_life_secs(&study),
        fairness: study.spec.fairness.clone(),
    });

    // The endpoint (in loopback mode, the Service's node port).
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(svc) = services.get_opt(&names::service(&study.name_any())).await? {
        let node_port = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|p| p.first())
            .and_then(|p| p.node_port);
        world.endpoint = build::endpoint(&study, &ctx.settings, node_port);
    }
    obs.endpoint_ready = world.endpoint.is_some();

    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let agg = jobs.get_opt(&agg_name).await?;
    obs.aggregator = job_view(agg.as_ref());
    if matches!(obs.aggregator, JobView::Complete | JobView::Failed(_)) {
        obs.outcome = termination_messages(ctx, &ns, &agg_name)
            .await?
            .iter()
            .rev()
            .find_map(|(_, m)| RoundOutcome::parse(m).ok());
    }

    let lkey = super::ledger_key(round);
    let study_ref = format!("{ns}/{}", study.name_any());
    let (trainer_image, _) = ctx.settings.images(&study);
    for (i, r) in round.spec.participants.iter().enumerate() {
        let (hns, hname) = r.split_once('/').unwrap_or(("", r));
        let Some(h) = Api::<HospitalClient>::namespaced(ctx.client.clone(), hns)
            .get_opt(hname)
            .await?
        else {
            continue;
        };
        let t = &mut obs.trainers[i];
        t.hospital = if h.spec.consents_to(&study_ref, &hash)
            && h.spec
                .allows_trainer_image(trainer_image, &ctx.settings.trainer_image)
            && h.metadata.deletion_timestamp.is_none()
        {
            HospitalView::Admitted
        } else {
            HospitalView::Withdrawn
        };
        if let Some(gw) = ctx.gateway.as_ref().filter(|g| g.site_of(r).is_some()) {
            // A site's trainer runs in its own cluster: what the site last reported stands for its Job.
            let id = names::assignment_id(
                &ns,
                &round.name_any(),
                round.spec.study_uid.as_deref().unwrap_or_default(),
                r,
            );
            t.job = crate::gateway::job_view(gw.state(&id).as_ref());
        } else {
            let tname = names::trainer_job(&ns, &round.name_any(), hname);
            let job = Api::<Job>::namespaced(ctx.client.clone(), hns)
                .get_opt(&tname)
                .await?;
            t.job = job_view(job.as_ref());
        }
        if t.job == JobView::Absent && t.hospital == HospitalView::Admitted {
            t.started = ledger::load(&ctx.client, &ctx.settings.operator_namespace, hns, hname)
                .await?
                .is_some_and(|d| d.started.contains(&lkey));
        }
        world.hospitals[i] = Some(h);
    }
    world.study = Some(study);
    Ok((obs, world))
}
