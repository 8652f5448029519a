//! The site's handler of the coordinator's messages: [`Site`]. Each method takes one message and
//! returns the replies; the network is the agent's ([`super::agent`]).
//!
//! An assignment, once its checks pass ([`super::check`]), is carried out in an order that a crash
//! anywhere only repeats: the study key is stored (TFHE), the round reserved in the site's own
//! ledger, the trainer Job created suspended, its TLS Secret written with a fresh key (owned by the
//! Job), and the record `ACCEPTED` written with the CSR. `Start` writes the certificate, records the
//! start in the ledger, then resumes the Job. A trainer that ends is settled in the ledger (committed:
//! it ran), whether its Job completed, failed or was deleted.

use std::sync::Arc;

use caduceus_crds::HospitalClient;
use caduceus_crds::study::SecureAggregationMode;
use caduceus_privacy::AccountantKind;
use caduceus_proto::v1::{
    Assignment, AssignmentState, Cancel, CoordinatorMessage, KeyRequest, SiteMessage, Start,
    coordinator_message, site_message,
};
use caduceus_secagg::seal::SealKeyPair;
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::check::{self, Facts, Parsed, Refusal};
use super::keys;
use super::state::{self, Phase, Record, Trainer};
use crate::build::{self, Endpoint, Settings};
use crate::context::{Error, Result};
use crate::ledger::{self, DurableLedger};
use crate::names;
use crate::round::observe::{job_failure_message, job_outcome};
use crate::telemetry::Metrics;

/// The annotation on a site's trainer Job that names its assignment.
pub const ANNOTATION_ASSIGNMENT: &str = "fl.caduceus.dev/assignment";

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The TLS Secret of a site's trainer Job (one per Job: a new key each round).
pub fn tls_secret_name(job: &str) -> String {
    format!("{job}-tls")
}

/// The trainer Job a site creates for a parsed assignment (pure): [`build::trainer_job`] with the
/// coordinator's endpoint and hospital id, annotated with the assignment, mounting its own TLS
/// Secret.
pub fn site_trainer_job(a: &Assignment, p: &Parsed, hospital: &HospitalClient, settings: &Settings) -> Job {
    let ep = Endpoint {
        address: a.aggregator_address.clone(),
        server_name: a.server_name.clone(),
        listen_port: 0,
        listen_host: String::new(),
    };
    let mut job = build::trainer_job(
        &p.study,
        &p.round,
        hospital,
        settings,
        &ep,
        p.plan.as_ref(),
        &p.hospital_id,
        Some(&crate::round::traceparent(&p.round, &a.hospital)),
    );
    let job_name = job.name_any();
    job.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(ANNOTATION_ASSIGNMENT.into(), a.id.clone());
    if let Some(vols) = job
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .and_then(|p| p.volumes.as_mut())
    {
        for v in vols.iter_mut().filter(|v| v.name == "tls") {
            if let Some(s) = v.secret.as_mut() {
                s.secret_name = Some(tls_secret_name(&job_name));
            }
        }
    }
    job
}

/// The site's part of the protocol.
pub struct Site {
    pub client: Client,
    pub operator_ns: String,
    pub hospital_ns: String,
    pub hospital: String,
    pub settings: Settings,
    /// The coordinator's name of this site (from enrolment).
    pub me: String,
    pub seal: SealKeyPair,
    pub metrics: Arc<Metrics>,
}

fn state_msg(s: AssignmentState) -> SiteMessage {
    SiteMessage {
        body: Some(site_message::Body::State(s)),
    }
}

impl Site {
    /// Handles one message of the coordinator; the replies to send. An `error` from the coordinator
    /// is returned as an error (the stream ends); so is an API error (the stream ends, the site
    /// reconnects and the coordinator re-sends what has no answer).
    pub async fn handle(&self, msg: CoordinatorMessage) -> Result<Vec<SiteMessage>> {
        match msg.body {
            None => Ok(vec![]),
            Some(coordinator_message::Body::Error(e)) => {
                Err(Error::Other(format!("the coordinator ends the stream: {e}")))
            }
            Some(coordinator_message::Body::Assign(a)) => Ok(vec![state_msg(self.assign(a).await?)]),
            Some(coordinator_message::Body::Start(s)) => Ok(vec![state_msg(self.start(s).await?)]),
            Some(coordinator_message::Body::Cancel(c)) => Ok(vec![state_msg(self.cancel(c).await?)]),
            Some(coordinator_message::Body::KeyRequest(k)) => Ok(vec![SiteMessage {
                body: Some(site_message::Body::SealedKeys(self.key_request(k).await?)),
            }]),
        }
    }

    fn hospitals(&self) -> Api<HospitalClient> {
        Api::namespaced(self.client.clone(), &self.hospital_ns)
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.hospital_ns)
    }

    async fn own_hospital(&self) -> Result<Option<HospitalClient>> {
        Ok(self.hospitals().get_opt(&self.hospital).await?)
    }

    async fn own_ledger(&self) -> Result<Option<DurableLedger>> {
        ledger::load(&self.client, &self.operator_ns, &self.hospital_ns, &self.hospital).await
    }

    /// ε of the site's ledger at its δ (reservations counted).
    pub async fn epsilon(&self) -> Result<Option<f64>> {
        let delta = self
            .own_hospital()
            .await?
            .map_or(1e-5, |h| h.spec.privacy_budget.delta);
        Ok(self.own_ledger().await?.and_then(|dl| {
            dl.ledger
                .epsilon(delta, AccountantKind::Pld)
                .ok()
                .map(|e| (e * 1e6).round() / 1e6)
        }))
    }

    async fn answer(&self, id: &str, r: &Record) -> Result<AssignmentState> {
        let eps = if r.dp() { self.epsilon().await? } else { None };
        Ok(r.to_proto(id, eps))
    }

    async fn put(&self, id: &str, r: &Record) -> Result<()> {
        state::put(&self.client, &self.operator_ns, id, r.clone()).await
    }

    async fn refuse(&self, a: &Assignment, refusal: &Refusal, dp: bool) -> Result<AssignmentState> {
        tracing::warn!(assignment = a.id, reason = refusal.reason(), "refused: {refusal}");
        let mut r = Record::new(Phase::Refused, refusal.message(), a.expires_at, now_unix());
        r.dp = dp;
        self.put(&a.id, &r).await?;
        self.answer(&a.id, &r).await
    }

    /// Checks an assignment and, if it passes, reserves, creates the suspended trainer and answers
    /// `ACCEPTED` with the CSR; otherwise `REFUSED` with the reason. Idempotent by id.
    pub async fn assign(&self, a: Assignment) -> Result<AssignmentState> {
        let st = state::load(&self.client, &self.operator_ns).await?;
        if let Some(r) = st.assignments.get(&a.id) {
            tracing::info!(assignment = a.id, phase = ?r.phase, "assignment repeated: answering its state");
            return self.answer(&a.id, r).await;
        }
        let p = match check::parse(&a, &self.me, &self.settings) {
            Ok(p) => p,
            Err(refusal) => return self.refuse(&a, &refusal, false).await,
        };
        // A well-formed assignment for this site proves that the coordinator reached its round:
        // older ones are stale from now on, whatever this one's fate.
        state::update(&self.client, &self.operator_ns, |s| {
            Ok(s.see(&p.study_uid, p.order()) | s.prune(now_unix()))
        })
        .await?;
        let hospital = self.own_hospital().await?;
        let dl = self.own_ledger().await?;
        let facts = Facts {
            now: now_unix(),
            seen: st.seen(&p.study_uid),
            hospital: hospital.as_ref(),
            ledger: dl.as_ref(),
            settings: &self.settings,
        };
        if let Err(refusal) = check::admit(&a, &p, &facts) {
            return self.refuse(&a, &refusal, p.dp()).await;
        }
        let h = hospital.expect("admit refuses without a HospitalClient");
        match self.accept(&a, &p, &h).await? {
            Ok(r) => {
                tracing::info!(
                    assignment = a.id,
                    study = p.study_ref,
                    round = p.round.spec.round,
                    attempt = p.round.spec.attempt,
                    "accepted: reserved in the site's ledger, trainer Job created suspended"
                );
                self.answer(&a.id, &r).await
            }
            Err(refusal) => self.refuse(&a, &refusal, p.dp()).await,
        }
    }

    async fn accept(
        &self,
        a: &Assignment,
        p: &Parsed,
        h: &HospitalClient,
    ) -> Result<std::result::Result<Record, Refusal>> {
        // 1. The study key (before anything is reserved: a bad key refuses with nothing to undo).
        if p.study.spec.secure_aggregation.mode == SecureAggregationMode::Tfhe {
            let key = if a.sealed_study_key.is_empty() {
                match keys::held(&self.client, &self.operator_ns, &p.study_id).await? {
                    Some(k) if k.fingerprint().to_string() == a.key_fingerprint => k,
                    Some(k) => {
                        return Ok(Err(Refusal::Malformed(format!(
                            "the study key this site holds has fingerprint {}, the assignment names {}",
                            k.fingerprint(),
                            a.key_fingerprint
                        ))));
                    }
                    None => {
                        return Ok(Err(Refusal::Malformed(
                            "the assignment brings no sealed study key and this site holds none".into(),
                        )));
                    }
                }
            } else {
                match keys::open(&a.sealed_study_key, &self.seal, &p.study_id, &a.key_fingerprint) {
                    Ok(k) => keys::store(&self.client, &self.operator_ns, k).await?,
                    Err(e) => {
                        return Ok(Err(Refusal::Malformed(format!(
                            "the sealed study key does not open: {e}"
                        ))));
                    }
                }
            };
            if key.fingerprint().to_string() != a.key_fingerprint {
                return Ok(Err(Refusal::Malformed(format!(
                    "this site already holds another key for {} (fingerprint {})",
                    p.study_id,
                    key.fingerprint()
                ))));
            }
            let bytes = key.to_bytes();
            crate::secrets::ensure_hospital_key(
                &self.client,
                &p.study,
                &self.hospital_ns,
                &self.hospital,
                &bytes,
            )
            .await?;
        }
        // 2. The site's own ledger: the spending counts from now on.
        if let Some(plan) = &p.plan {
            let mechanisms = crate::plan::round_mechanisms(plan);
            let acc = crate::plan::accountant(p.study.spec.privacy.accountant);
            if let Err(m) =
                ledger::reserve(&self.client, &self.operator_ns, h, &p.key, &mechanisms, acc).await?
            {
                return Ok(Err(Refusal::BudgetExceeded(m)));
            }
        }
        // 3. The trainer Job, suspended, and its TLS Secret with a fresh key.
        crate::secrets::ensure_trainer_service_account(&self.client, &self.hospital_ns).await?;
        let want = site_trainer_job(a, p, h, &self.settings);
        let job_name = want.name_any();
        let pp = PostParams {
            field_manager: Some(crate::FIELD_MANAGER.into()),
            ..Default::default()
        };
        let job = match self.jobs().create(&pp, &want).await {
            Ok(j) => j,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let j = self.jobs().get(&job_name).await?;
                if j.annotations().get(ANNOTATION_ASSIGNMENT) != Some(&a.id) {
                    return Err(Error::Other(format!(
                        "Job {}/{job_name} exists but is not the trainer of assignment {}",
                        self.hospital_ns, a.id
                    )));
                }
                j
            }
            Err(e) => return Err(e.into()),
        };
        let (key_pem, csr_pem) = caduceus_pki::site_key_and_csr(&p.hospital_id)?;
        let tls_secret = tls_secret_name(&job_name);
        let mut secret = build::secret(
            &tls_secret,
            &self.hospital_ns,
            names::round_labels(
                &p.study.namespace().unwrap_or_default(),
                &p.study.name_any(),
                "client-certificate",
                p.round.spec.round,
                p.round.spec.attempt,
            ),
            job.controller_owner_ref(&()),
            &[
                ("tls.key", key_pem.as_bytes()),
                ("ca.crt", a.study_ca_pem.as_bytes()),
            ],
        );
        // Owned by the Job, not controlled: deleted with it.
        if let Some(o) = secret.metadata.owner_references.as_mut() {
            for r in o.iter_mut() {
                r.controller = None;
                r.block_owner_deletion = None;
            }
        }
        Api::<Secret>::namespaced(self.client.clone(), &self.hospital_ns)
            .patch(
                &tls_secret,
                &PatchParams::apply(crate::FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?;
        // 4. On record: a repeat is answered from here, and the CSR stays the one sent.
        let mut r = Record::new(Phase::Accepted, "", a.expires_at, now_unix());
        r.csr_pem = csr_pem;
        r.dp = p.dp();
        r.trainer = Some(Trainer {
            job: job_name,
            tls_secret,
            key: p.key.clone(),
            dp: p.dp(),
            hospital_id: p.hospital_id.clone(),
            give_up_at: a.expires_at.max(now_unix()) + build::round_max_life_secs(&p.study),
        });
        self.put(&a.id, &r).await?;
        Ok(Ok(r))
    }

    /// Starts an accepted assignment's trainer with its certificate: the certificate into the TLS
    /// Secret, the start into the ledger, then the Job resumed. Idempotent.
    pub async fn start(&self, s: Start) -> Result<AssignmentState> {
        let st = state::load(&self.client, &self.operator_ns).await?;
        let Some(mut r) = st.assignments.get(&s.assignment_id).cloned() else {
            tracing::warn!(
                assignment = s.assignment_id,
                "Start for an assignment this site does not know"
            );
            return Ok(Record::new(
                Phase::Refused,
                "Unknown: this site has no such assignment",
                0,
                now_unix(),
            )
            .to_proto(&s.assignment_id, None));
        };
        if r.phase != Phase::Accepted {
            return self.answer(&s.assignment_id, &r).await;
        }
        let t = r.trainer.clone().expect("an accepted record has its trainer");
        let id = s.assignment_id.as_str();
        // The certificate must be for this site's trainer.
        let named = caduceus_pki::first_cert_der(&s.cert_pem)
            .and_then(|der| caduceus_pki::hospital_from_cert_der(&der));
        if named.as_deref().ok() != Some(t.hospital_id.as_str()) {
            let why = format!(
                "Malformed: the certificate names {named:?}, the trainer is {}",
                t.hospital_id
            );
            return self.drop_unstarted(id, &mut r, &t, Phase::Refused, why).await;
        }
        let Some(job) = self.jobs().get_opt(&t.job).await? else {
            let why = format!(
                "TrainerJobMissing: Job {}/{} was deleted before it started",
                self.hospital_ns, t.job
            );
            return self.drop_unstarted(id, &mut r, &t, Phase::Refused, why).await;
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.hospital_ns);
        let patch = json!({"data": {"tls.crt": ByteString(s.cert_pem.clone().into_bytes())}});
        secrets
            .patch(&t.tls_secret, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        match ledger::mark_started(
            &self.client,
            &self.operator_ns,
            &self.hospital_ns,
            &self.hospital,
            &t.key,
            t.dp,
        )
        .await
        {
            Ok(_) => {}
            Err(Error::Ledger { message, .. }) => {
                let why = format!("NoReservation: {message}");
                return self.drop_unstarted(id, &mut r, &t, Phase::Refused, why).await;
            }
            Err(e) => return Err(e),
        }
        if job.spec.as_ref().and_then(|s| s.suspend) != Some(false) {
            self.jobs()
                .patch(
                    &t.job,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"spec": {"suspend": false}})),
                )
                .await?;
        }
        r.phase = Phase::Started;
        r.updated_at = now_unix();
        self.put(id, &r).await?;
        tracing::info!(
            assignment = id,
            job = t.job,
            "started: the start is on record in the site's ledger, trainer Job resumed"
        );
        self.answer(id, &r).await
    }

    /// Deletes a trainer that never started and releases its reservation; records `phase`.
    async fn drop_unstarted(
        &self,
        id: &str,
        r: &mut Record,
        t: &Trainer,
        phase: Phase,
        why: String,
    ) -> Result<AssignmentState> {
        match self.jobs().delete(&t.job, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        ledger::cancel(
            &self.client,
            &self.operator_ns,
            &self.hospital_ns,
            &self.hospital,
            &t.key,
        )
        .await?;
        tracing::warn!(assignment = id, phase = ?phase, "trainer Job deleted, reservation released: {why}");
        r.phase = phase;
        r.message = why;
        r.updated_at = now_unix();
        self.put(id, r).await?;
        self.answer(id, r).await
    }

    /// Whether the ledger already records the start of `key` (a crash between `mark_started` and the
    /// record): then the trainer counts as started.
    async fn started_in_ledger(&self, t: &Trainer) -> Result<bool> {
        Ok(self.own_ledger().await?.is_some_and(|dl| {
            dl.started.contains(&t.key)
                || dl.ledger.status(&t.key) == caduceus_privacy::ledger::RoundStatus::Committed
        }))
    }

    /// Cancels an assignment: a trainer that never started is deleted and its reservation released
    /// (`CANCELLED`); a started one keeps running and settles when it ends.
    pub async fn cancel(&self, c: Cancel) -> Result<AssignmentState> {
        let id = c.assignment_id.as_str();
        let st = state::load(&self.client, &self.operator_ns).await?;
        let Some(mut r) = st.assignments.get(id).cloned() else {
            // A tombstone: the assignment, if it comes later, is answered CANCELLED.
            let r = Record::new(
                Phase::Cancelled,
                format!("Cancelled: {}", c.reason),
                0,
                now_unix(),
            );
            self.put(id, &r).await?;
            tracing::info!(assignment = id, "cancelled before it arrived: {}", c.reason);
            return Ok(r.to_proto(id, None));
        };
        if r.phase != Phase::Accepted {
            return self.answer(id, &r).await;
        }
        let t = r.trainer.clone().expect("an accepted record has its trainer");
        if self.started_in_ledger(&t).await? {
            r.phase = Phase::Started;
            r.updated_at = now_unix();
            self.put(id, &r).await?;
            tracing::info!(
                assignment = id,
                "cancel: the trainer had started; it keeps its spending"
            );
            return self.answer(id, &r).await;
        }
        self.drop_unstarted(
            id,
            &mut r,
            &t,
            Phase::Cancelled,
            format!("Cancelled: {}", c.reason),
        )
        .await
    }

    /// Seals the study key (the one held, or a new one) to each recipient.
    pub async fn key_request(&self, k: KeyRequest) -> Result<caduceus_proto::v1::SealedKeys> {
        let key = keys::load_or_generate(&self.client, &self.operator_ns, &k.study_id).await?;
        let sealed = keys::seal_to(&key, &k)?;
        tracing::info!(
            study_id = k.study_id,
            fingerprint = sealed.fingerprint,
            recipients = sealed.keys.len(),
            "sealed the study key to the recipients"
        );
        Ok(sealed)
    }

    /// Settles trainers that ended (and gives up on accepted ones that never started in time). The
    /// changed states.
    pub async fn poll_trainers(&self) -> Result<Vec<AssignmentState>> {
        let st = state::load(&self.client, &self.operator_ns).await?;
        let now = now_unix();
        let mut out = Vec::new();
        for (id, r) in &st.assignments {
            let Some(t) = r.trainer.clone() else { continue };
            let mut r = r.clone();
            match r.phase {
                Phase::Started => {
                    let job = self.jobs().get_opt(&t.job).await?;
                    let (phase, message) = match &job {
                        None => (
                            Phase::Failed,
                            format!(
                                "TrainerJobDeleted: Job {}/{} was deleted after it started; its spending stays",
                                self.hospital_ns, t.job
                            ),
                        ),
                        Some(j) => match job_outcome(j) {
                            Some(true) => (Phase::Succeeded, String::new()),
                            Some(false) => (
                                Phase::Failed,
                                format!("TrainerFailed: {}", job_failure_message(j)),
                            ),
                            None => continue,
                        },
                    };
                    let eps = ledger::settle(
                        &self.client,
                        &self.operator_ns,
                        &self.hospital_ns,
                        &self.hospital,
                        &t.key,
                        t.dp,
                        self.own_hospital()
                            .await?
                            .map_or(1e-5, |h| h.spec.privacy_budget.delta),
                    )
                    .await?;
                    if t.dp
                        && let Some(e) = eps
                    {
                        self.metrics
                            .epsilon_spent
                            .with_label_values(&[&self.hospital_ns, &self.hospital])
                            .set((e * 1e6).round() / 1e6);
                    }
                    r.phase = phase;
                    r.message = message;
                    r.updated_at = now;
                    self.put(id, &r).await?;
                    tracing::info!(
                        assignment = id,
                        job = t.job,
                        phase = ?phase,
                        epsilon_spent = ?eps,
                        "settled in the site's ledger: {}",
                        r.message
                    );
                    out.push(self.answer(id, &r).await?);
                }
                Phase::Accepted if now > t.give_up_at => {
                    if self.started_in_ledger(&t).await? {
                        r.phase = Phase::Started;
                        r.updated_at = now;
                        self.put(id, &r).await?;
                        out.push(self.answer(id, &r).await?);
                    } else {
                        let why = "Cancelled: never started before the round's deadline".to_string();
                        out.push(self.drop_unstarted(id, &mut r, &t, Phase::Cancelled, why).await?);
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Every assignment's state (for `SiteHello`).
    pub async fn states(&self) -> Result<Vec<AssignmentState>> {
        let st = state::load(&self.client, &self.operator_ns).await?;
        let eps = self.epsilon().await?;
        Ok(st
            .assignments
            .iter()
            .map(|(id, r)| r.to_proto(id, if r.dp() { eps } else { None }))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::EndpointMode;

    #[test]
    fn the_site_trainer_dials_the_coordinator_as_the_mirror_id() {
        let settings = Settings {
            operator_namespace: "caduceus-system".into(),
            trainer_image: "caduceus-trainer:test".into(),
            aggregator_image: "caduceus-aggregator:test".into(),
            endpoint_mode: EndpointMode::Service,
            public_host: None,
            watch_namespaces: None,
            telemetry_env: Vec::new(),
        };
        let mut study: caduceus_crds::FederatedStudy = serde_yaml::from_str(
            r#"
apiVersion: fl.caduceus.dev/v1alpha1
kind: FederatedStudy
metadata: {name: gender, namespace: studies, uid: "u-1"}
spec:
  model: {architecture: small-cnn}
  task: {label: gender}
  rounds: {total: 3, minHospitals: 1}
  training: {steps: 5, batchSize: 32}
  privacy: {noiseMultiplier: 1.1, sampleRate: 0.02}
  hospitalSelector: {}
  modelStore: {claimName: store}
"#,
        )
        .unwrap();
        study.metadata.uid = Some("u-1".into());
        let hash = settings.consent_hash(&study);
        let plan = crate::plan::privacy_plan(&study.spec).unwrap();
        let round = build::training_round(&study, 1, 0, vec!["sites/st-mary".into()], &hash, plan);
        let a = Assignment {
            id: names::assignment_id("studies", "gender-r1", "u-1", "sites/st-mary"),
            hospital: "sites/st-mary".into(),
            study_json: serde_json::to_string(&study).unwrap(),
            round_json: serde_json::to_string(&round).unwrap(),
            consent_hash: hash,
            aggregator_address: "127.0.0.1:31000".into(),
            server_name: "gender-aggregator.studies.svc".into(),
            expires_at: i64::MAX,
            ..Default::default()
        };
        let p = check::parse(&a, "sites/st-mary", &settings).unwrap();
        let h: HospitalClient = serde_yaml::from_str(
            r#"
apiVersion: fl.caduceus.dev/v1alpha1
kind: HospitalClient
metadata: {name: st-mary, namespace: north}
spec:
  data: {claimName: faces}
  privacyBudget: {epsilon: 8}
"#,
        )
        .unwrap();
        let job = site_trainer_job(&a, &p, &h, &settings);
        assert_eq!(job.metadata.namespace.as_deref(), Some("north"));
        assert_eq!(
            job.annotations().get(ANNOTATION_ASSIGNMENT),
            Some(&a.id),
            "the Job names its assignment"
        );
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.suspend, Some(true), "resumed only on Start");
        let pod = spec.template.spec.as_ref().unwrap();
        let tls = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "tls")
            .unwrap();
        assert_eq!(
            tls.secret.as_ref().unwrap().secret_name.as_deref(),
            Some(tls_secret_name(&job.name_any()).as_str())
        );
        let env: std::collections::BTreeMap<_, _> = pod.containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(env["CADUCEUS_HOSPITAL"], names::hospital_id("sites", "st-mary"));
        assert_eq!(env["CADUCEUS_AGGREGATOR"], "127.0.0.1:31000");
        assert_eq!(env["CADUCEUS_SERVER_NAME"], "gender-aggregator.studies.svc");
        assert_eq!(env["CADUCEUS_DP_NOISE_MULTIPLIER"], "1.1");
        let labels = job.labels();
        assert_eq!(labels[names::LABEL_COMPONENT], "trainer");
        assert_eq!(
            labels[names::LABEL_HOSPITAL],
            "st-mary",
            "the agent watches these labels"
        );
    }
}
