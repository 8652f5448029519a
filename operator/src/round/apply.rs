//! Carries out the machine's [`Action`]s against the API server, in order: Jobs, Secrets, the
//! durable ledgers, the status (server-side apply under the operator's field manager), events and
//! metrics.

use std::time::Duration;

use caduceus_crds::study::SecureAggregationMode;
use caduceus_crds::{TrainingRound, TrainingRoundStatus};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::machine::{Action, Observations, RoundResults, RoundState, Settlement};
use super::observe::World;
use crate::context::{Context, Error, Result};
use crate::secrets::{self, StudyTrust};
use crate::{build, gateway, ledger, names};
use caduceus_proto::v1::{Assignment, AssignmentPhase, AssignmentState};

/// The study's secrets, made once per reconcile when an action first needs them.
struct StudySecrets {
    trust: StudyTrust,
    /// The TFHE key and its fingerprint, with TFHE in one cluster.
    key: Option<(Vec<u8>, String)>,
    /// The key's fingerprint with TFHE (in sites mode the coordinator knows only this).
    fingerprint: Option<String>,
}

/// Applies actions for one round within one reconcile.
pub struct Applier<'a> {
    ctx: &'a Context,
    round: &'a TrainingRound,
    world: &'a World,
    secrets: Option<StudySecrets>,
}

fn missing(what: &str) -> Error {
    Error::Other(format!(
        "the round machine asked for an action that needs {what}, which was not observed"
    ))
}

impl<'a> Applier<'a> {
    pub fn new(ctx: &'a Context, round: &'a TrainingRound, world: &'a World) -> Self {
        Self {
            ctx,
            round,
            world,
            secrets: None,
        }
    }

    fn ns(&self) -> String {
        self.round.namespace().unwrap_or_default()
    }

    /// Applies `actions` (the step that produced `state`); the ledgers' answer to a settlement goes
    /// into `obs`. Returns the requeue the step asked for.
    ///
    /// # Errors
    /// The first action that fails (an API error, a ledger that refuses a start); the ones after it
    /// are not applied, and the next reconcile steps again from what was written.
    pub async fn apply(
        &mut self,
        state: &RoundState,
        obs: &mut Observations,
        actions: Vec<Action>,
    ) -> Result<Option<Duration>> {
        let mut requeue = None;
        for action in actions {
            match action {
                Action::EnsureStudySecrets => {
                    self.study_secrets().await?;
                }
                Action::CreateAggregatorJob => self.create_aggregator().await?,
                Action::DeleteAggregatorJob => {
                    let jobs: Api<Job> = Api::namespaced(self.ctx.client.clone(), &self.ns());
                    delete_job(&jobs, &names::aggregator_job(&self.round.name_any())).await?;
                }
                Action::CreateTrainerJob(i) if self.site(i).is_some() => self.assign_site(i).await?,
                Action::CreateTrainerJob(i) => self.create_trainer(i).await?,
                // A site's start is recorded once the site has accepted (reserved in its own ledger).
                Action::MarkStarted(i) if self.site(i).is_some() && !self.site_accepted(i) => {}
                Action::MarkStarted(i) => {
                    let (hns, hname) = self.participant(i);
                    ledger::mark_started(
                        &self.ctx.client,
                        &self.ctx.settings.operator_namespace,
                        hns,
                        hname,
                        &super::ledger_key(self.round),
                        self.round.spec.privacy.is_some(),
                    )
                    .await?;
                }
                Action::ResumeTrainerJob(i) if self.site(i).is_some() => self.start_site(i).await?,
                Action::ResumeTrainerJob(i) => {
                    let (hns, hname) = self.participant(i);
                    Api::<Job>::namespaced(self.ctx.client.clone(), hns)
                        .patch(
                            &self.trainer_job(hname),
                            &PatchParams::default(),
                            &Patch::Merge(&json!({"spec": {"suspend": false}})),
                        )
                        .await?;
                }
                Action::DeleteTrainerJob(i) if self.site(i).is_some() => {
                    if let Some((gw, site)) = self.site(i) {
                        gw.cancel(
                            site,
                            &self.assignment_id(i),
                            "the round ended before this trainer started",
                        );
                    }
                }
                Action::DeleteTrainerJob(i) => {
                    let (hns, hname) = self.participant(i);
                    let jobs: Api<Job> = Api::namespaced(self.ctx.client.clone(), hns);
                    delete_job(&jobs, &self.trainer_job(hname)).await?;
                }
                Action::Settle => {
                    obs.settled = Some(self.settle().await?);
                    self.cancel_unstarted_sites();
                }
                Action::WriteStatus => write_status(self.ctx, self.round, &state.status).await?,
                Action::Event {
                    warning,
                    reason,
                    action,
                    message,
                } => {
                    self.ctx
                        .event(self.round, warning, &reason, action, message)
                        .await
                }
                Action::CountRound(outcome) => {
                    self.ctx
                        .metrics
                        .rounds
                        .with_label_values(&[&self.ns(), &self.round.spec.study, outcome])
                        .inc();
                }
                Action::RecordResults(r) => self.record_results(&r),
                Action::Requeue(d) => requeue = Some(d),
            }
        }
        Ok(requeue)
    }

    fn participant(&self, i: usize) -> (&'a str, &'a str) {
        let r = &self.round.spec.participants[i];
        r.split_once('/').unwrap_or(("", r.as_str()))
    }

    fn trainer_job(&self, hospital: &str) -> String {
        names::trainer_job(&self.ns(), &self.round.name_any(), hospital)
    }

    async fn study_secrets(&mut self) -> Result<&StudySecrets> {
        if self.secrets.is_none() {
            let study = self.world.study.as_ref().ok_or_else(|| missing("the study"))?;
            let client = &self.ctx.client;
            let operator_ns = &self.ctx.settings.operator_namespace;
            let trust = secrets::ensure_ca(client, operator_ns, study).await?;
            secrets::ensure_aggregator_tls(client, study, &trust).await?;
            let tfhe = study.spec.secure_aggregation.mode == SecureAggregationMode::Tfhe;
            let sites: Vec<String> = (0..self.round.spec.participants.len())
                .filter_map(|i| self.site(i).map(|(_, s)| s.to_string()))
                .collect();
            let (key, fingerprint) = match (&self.ctx.gateway, tfhe) {
                (_, false) => (None, None),
                // Sites mode: the sites make and seal the key; the coordinator relays and never holds it.
                (Some(gw), true) if !sites.is_empty() => {
                    let id = names::study_id(&self.ns(), &study.name_any());
                    // A connected site answers a key request within milliseconds: wait a little
                    // rather than fail the reconcile (and back off for seconds).
                    let mut fp = None;
                    for _ in 0..20 {
                        fp = gateway::keys::ensure(gw, client, operator_ns, &id, &sites).await?;
                        if fp.is_some() {
                            break;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
                    }
                    let Some(fp) = fp else {
                        return Err(Error::Key(format!(
                            "waiting for a site to seal study {id}'s key to every participant ({})",
                            sites.join(", ")
                        )));
                    };
                    (None, Some(fp))
                }
                _ => {
                    let (bytes, fp) = secrets::ensure_master_key(client, operator_ns, study).await?;
                    (Some((bytes, fp.clone())), Some(fp))
                }
            };
            self.secrets = Some(StudySecrets {
                trust,
                key,
                fingerprint,
            });
        }
        Ok(self.secrets.as_ref().expect("set above"))
    }

    /// The aggregator admits every participant of the round: one whose `HospitalClient` disappeared
    /// simply does not report, and the quorum stays what the round says.
    async fn create_aggregator(&mut self) -> Result<()> {
        let (ctx, round, world) = (self.ctx, self.round, self.world);
        let study = world.study.as_ref().ok_or_else(|| missing("the study"))?;
        let ep = world.endpoint.as_ref().ok_or_else(|| missing("the endpoint"))?;
        let ids: Vec<String> = round
            .spec
            .participants
            .iter()
            .map(|r| {
                let (hns, hname) = r.split_once('/').unwrap_or(("", r));
                names::hospital_id(hns, hname)
            })
            .collect();
        let fingerprint = self.study_secrets().await?.fingerprint.clone();
        let want = build::aggregator_job(
            study,
            round,
            &ctx.settings,
            ep,
            &ids,
            fingerprint.as_deref(),
            Some(&super::traceparent(round, "aggregator")),
        );
        create_job(&Api::namespaced(ctx.client.clone(), &self.ns()), &want).await
    }

    async fn create_trainer(&mut self, i: usize) -> Result<()> {
        let (ctx, round, world) = (self.ctx, self.round, self.world);
        let study = world.study.as_ref().ok_or_else(|| missing("the study"))?;
        let ep = world.endpoint.as_ref().ok_or_else(|| missing("the endpoint"))?;
        let h = world.hospitals[i]
            .as_ref()
            .ok_or_else(|| missing("the HospitalClient"))?;
        let (hns, hname) = self.participant(i);
        let s = self.study_secrets().await?;
        secrets::ensure_hospital_tls(&ctx.client, study, &s.trust, hns, hname).await?;
        if let Some((bytes, _)) = &s.key {
            secrets::ensure_hospital_key(&ctx.client, study, hns, hname, bytes).await?;
        }
        secrets::ensure_trainer_service_account(&ctx.client, hns).await?;
        let want = build::trainer_job(
            study,
            round,
            h,
            &ctx.settings,
            ep,
            round.spec.privacy.as_ref(),
            &names::hospital_id(hns, hname),
            Some(&super::traceparent(round, &round.spec.participants[i])),
        );
        create_job(&Api::namespaced(ctx.client.clone(), hns), &want).await
    }

    /// The gateway and site name of participant `i`, when it is a site (coordinator role).
    fn site(&self, i: usize) -> Option<(&'a gateway::Gateway, &'a str)> {
        let gw = self.ctx.gateway.as_deref()?;
        gw.site_of(&self.round.spec.participants[i]).map(|s| (gw, s))
    }

    fn assignment_id(&self, i: usize) -> String {
        names::assignment_id(
            &self.ns(),
            &self.round.name_any(),
            self.round.spec.study_uid.as_deref().unwrap_or_default(),
            &self.round.spec.participants[i],
        )
    }

    fn site_state(&self, i: usize) -> Option<AssignmentState> {
        self.site(i).and_then(|(gw, _)| gw.state(&self.assignment_id(i)))
    }

    fn site_accepted(&self, i: usize) -> bool {
        self.site_state(i)
            .is_some_and(|s| s.phase() == AssignmentPhase::Accepted)
    }

    /// Sends participant `i`'s site its assignment: copies of the study and the (signed) round,
    /// where to dial, the study CA, and the study key sealed to it.
    async fn assign_site(&mut self, i: usize) -> Result<()> {
        let (ctx, round, world) = (self.ctx, self.round, self.world);
        let Some((gw, site)) = self.site(i) else {
            return Ok(());
        };
        let study = world.study.as_ref().ok_or_else(|| missing("the study"))?;
        let ep = world.endpoint.as_ref().ok_or_else(|| missing("the endpoint"))?;
        let tfhe = study.spec.secure_aggregation.mode == SecureAggregationMode::Tfhe;
        let bundle = self.study_secrets().await?.trust.bundle.clone();
        let fingerprint = self
            .study_secrets()
            .await?
            .fingerprint
            .clone()
            .unwrap_or_default();
        let sealed = if tfhe {
            let id = names::study_id(&self.ns(), &study.name_any());
            let set = gateway::keys::load(&ctx.client, &ctx.settings.operator_namespace, &id).await?;
            if set.holders.iter().any(|h| h == site) {
                Vec::new()
            } else {
                set.blobs
                    .get(site)
                    .cloned()
                    .ok_or_else(|| Error::Key(format!("no study key sealed to site {site} yet")))?
            }
        } else {
            Vec::new()
        };
        let mut study_copy = study.clone();
        study_copy.metadata.managed_fields = None;
        let mut round_copy = round.clone();
        round_copy.metadata.managed_fields = None;
        let created = round.metadata.creation_timestamp.as_ref().map_or_else(
            || k8s_openapi::jiff::Timestamp::now().as_second(),
            |t| t.0.as_second(),
        );
        let a = Assignment {
            id: self.assignment_id(i),
            hospital: round.spec.participants[i].clone(),
            study_json: serde_json::to_string(&study_copy).map_err(|e| Error::Other(e.to_string()))?,
            round_json: serde_json::to_string(&round_copy).map_err(|e| Error::Other(e.to_string()))?,
            consent_hash: round.spec.consent_hash.clone().unwrap_or_default(),
            aggregator_address: ep.address.clone(),
            server_name: ep.server_name.clone(),
            study_ca_pem: bundle,
            sealed_study_key: sealed,
            key_fingerprint: fingerprint,
            issued_at: k8s_openapi::jiff::Timestamp::now().as_second(),
            expires_at: created + build::round_max_life_secs(study),
        };
        gw.assign(site, a);
        Ok(())
    }

    /// Starts an accepted site trainer whose start is on record: signs the CSR it sent with the
    /// study CA, as the participant's hospital id (what the aggregator admits).
    async fn start_site(&mut self, i: usize) -> Result<()> {
        let Some((gw, site)) = self.site(i) else {
            return Ok(());
        };
        let Some(state) = self
            .site_state(i)
            .filter(|s| s.phase() == AssignmentPhase::Accepted)
        else {
            return Ok(());
        };
        let (hns, hname) = self.participant(i);
        let started = ledger::load(
            &self.ctx.client,
            &self.ctx.settings.operator_namespace,
            hns,
            hname,
        )
        .await?
        .is_some_and(|d| d.started.contains(&super::ledger_key(self.round)));
        if !started {
            return Ok(());
        }
        let trust = &self.study_secrets().await?.trust;
        let cert = trust
            .ca
            .sign_csr(
                &state.csr_pem,
                &names::hospital_id(hns, hname),
                secrets::LEAF_LIFETIME,
            )
            .map_err(|e| Error::Other(format!("site {site}'s trainer certificate request: {e}")))?;
        gw.start(site, &self.assignment_id(i), cert);
        Ok(())
    }

    /// After settlement: every site assignment that never started is cancelled at its site.
    fn cancel_unstarted_sites(&self) {
        for i in 0..self.round.spec.participants.len() {
            let Some((gw, site)) = self.site(i) else { continue };
            let phase = self.site_state(i).map(|s| s.phase());
            if matches!(
                phase,
                None | Some(AssignmentPhase::Accepted | AssignmentPhase::Unspecified)
            ) {
                gw.cancel(
                    site,
                    &self.assignment_id(i),
                    "the round ended before this trainer started",
                );
            }
        }
    }

    /// Settles every participant's ledger for the round; ε after it per participant (DP only).
    async fn settle(&self) -> Result<Settlement> {
        let ctx = self.ctx;
        let key = super::ledger_key(self.round);
        let dp = self.round.spec.privacy.is_some();
        let mut settlement = Settlement::default();
        for (i, r) in self.round.spec.participants.iter().enumerate() {
            let (hns, hname) = self.participant(i);
            let delta = self.world.hospitals[i]
                .as_ref()
                .map_or(1e-5, |h| h.spec.privacy_budget.delta);
            let eps = ledger::settle(
                &ctx.client,
                &ctx.settings.operator_namespace,
                hns,
                hname,
                &key,
                dp,
                delta,
            )
            .await?;
            if dp && let Some(eps) = eps {
                let eps = (eps * 1e6).round() / 1e6;
                settlement.epsilon_spent.insert(r.clone(), eps);
                ctx.metrics
                    .epsilon_spent
                    .with_label_values(&[hns, hname])
                    .set(eps);
            }
        }
        Ok(settlement)
    }

    fn record_results(&self, r: &RoundResults) {
        let m = &self.ctx.metrics;
        let (ns, study) = (self.ns(), self.round.spec.study.clone());
        let labels = [ns.as_str(), study.as_str()];
        #[allow(clippy::cast_precision_loss)] // a count of hospitals
        m.participants
            .with_label_values(&labels)
            .set(r.participants as f64);
        if let Some(a) = r.accuracy {
            m.accuracy.with_label_values(&labels).set(a);
        }
        if let Some(a) = r.worst_group_accuracy {
            m.worst_group_accuracy.with_label_values(&labels).set(a);
        }
        for (metric, threshold, gap) in [
            (
                "demographic_parity_difference",
                r.max_demographic_parity_difference,
                r.demographic_parity_difference,
            ),
            (
                "equalized_odds_difference",
                r.max_equalized_odds_difference,
                r.equalized_odds_difference,
            ),
        ] {
            m.fairness_threshold
                .with_label_values(&[&ns, &study, metric])
                .set(threshold);
            if let Some(g) = gap {
                m.fairness_gap.with_label_values(&[&ns, &study, metric]).set(g);
            }
        }
    }
}

/// Creates a Job; one that exists already (a retried reconcile) is left as it is.
async fn create_job(jobs: &Api<Job>, want: &Job) -> Result<()> {
    let pp = PostParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..Default::default()
    };
    match jobs.create(&pp, want).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a Job and its pods; one that is gone already is fine.
async fn delete_job(jobs: &Api<Job>, name: &str) -> Result<()> {
    match jobs.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn write_status(ctx: &Context, round: &TrainingRound, status: &TrainingRoundStatus) -> Result<()> {
    let api: Api<TrainingRound> = Api::namespaced(ctx.client.clone(), &round.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": TrainingRound::api_version(&()),
        "kind": TrainingRound::kind(&()),
        "status": status,
    });
    api.patch_status(
        &round.name_any(),
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
