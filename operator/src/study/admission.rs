//! Which hospitals a study admits (the decisions are pure, in [`crate::plan`]), and recording them
//! in each hospital's `status.admissions` and the study's `HospitalsAdmitted` condition.

use caduceus_crds::conditions::{ConditionExt, status as cstatus, types};
use caduceus_crds::hospital::StudyAdmission;
use caduceus_crds::study::PrivacyPlan;
use caduceus_crds::{FederatedStudy, FederatedStudyStatus, HospitalClient, set_condition};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::core::{Selector, SelectorExt};

use crate::context::{Context, Result};
use crate::ledger;
use crate::names;
use crate::plan::{self, Candidate, Exclusion};

/// A hospital with its admission decision for this study.
pub struct Decision {
    pub hospital: HospitalClient,
    pub candidate: Candidate,
    pub admitted: std::result::Result<(), Exclusion>,
}

/// Every HospitalClient as a candidate of this study, with its admission decision.
pub async fn decide(
    ctx: &Context,
    study: &FederatedStudy,
    selector: &Selector,
    hash: &str,
    privacy: Option<&PrivacyPlan>,
) -> Result<Vec<Decision>> {
    let ns = study.namespace().unwrap_or_default();
    let study_ref = format!("{ns}/{}", study.name_any());
    let acc = plan::accountant(study.spec.privacy.accountant);
    let (trainer_image, _) = ctx.settings.images(study);
    let hospitals: Vec<HospitalClient> = Api::<HospitalClient>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let ledgers = ledger::load_all(&ctx.client, &ctx.settings.operator_namespace).await?;
    Ok(hospitals
        .into_iter()
        .map(|h| {
            let hns = h.namespace().unwrap_or_default();
            let reference = names::hospital_ref(&hns, &h.name_any());
            let st = h.status.clone().unwrap_or_default();
            let ledger = match ledgers.get(&reference) {
                Some(Some(dl)) => Some(dl.ledger.clone()),
                Some(None) => None,
                // Never charged through the durable ledger yet: what the status mirror holds.
                None => Some(st.ledger.clone().unwrap_or_default()),
            };
            let candidate = Candidate {
                reference,
                ready: st.conditions.is_true(types::READY),
                consent: match h.spec.consent_for(&study_ref) {
                    None => plan::Consent::None,
                    Some(None) => plan::Consent::Unbound,
                    Some(Some(given)) => plan::Consent::Hash(given.to_string()),
                },
                selected: selector.matches(h.labels()),
                trainer_image: trainer_image.to_string(),
                image_allowed: h
                    .spec
                    .allows_trainer_image(trainer_image, &ctx.settings.trainer_image),
                allows_non_private: h.spec.allow_non_private_studies,
                served: ctx.settings.serves(&hns),
                deleting: h.metadata.deletion_timestamp.is_some(),
                budget_epsilon: h.spec.privacy_budget.epsilon,
                budget_delta: h.spec.privacy_budget.delta,
                ledger,
            };
            let admitted = plan::admit(&candidate, privacy, acc, hash);
            Decision {
                hospital: h,
                candidate,
                admitted,
            }
        })
        .collect())
}

/// Writes each selected hospital's admission into its status (only when it changed), and the
/// study's `HospitalsAdmitted` condition.
pub async fn record_admissions(
    ctx: &Context,
    study: &FederatedStudy,
    hash: &str,
    decisions: &[Decision],
    status: &mut FederatedStudyStatus,
) -> Result<()> {
    let study_ref = format!("{}/{}", study.namespace().unwrap_or_default(), study.name_any());
    let mut excluded = Vec::new();
    let mut selected = 0;
    for d in decisions.iter().filter(|d| d.candidate.selected) {
        selected += 1;
        let (admitted, reason, message) = match &d.admitted {
            Ok(()) => (true, "Admitted".to_string(), format!("takes part in {study_ref}")),
            Err(e) => {
                excluded.push(format!("{} ({})", d.candidate.reference, e.reason()));
                (false, e.reason().to_string(), e.message(&study_ref, hash))
            }
        };
        let want = StudyAdmission {
            study: study_ref.clone(),
            admitted,
            reason,
            message,
            consent_hash: Some(hash.to_string()),
        };
        let current = d
            .hospital
            .status
            .as_ref()
            .and_then(|s| s.admissions.iter().find(|a| a.study == study_ref));
        if current == Some(&want) || d.hospital.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if !want.admitted && current.is_none_or(|c| c.reason != want.reason) {
            ctx.event(
                &d.hospital,
                true,
                &want.reason,
                "Admit",
                format!("left out of {study_ref}: {}", want.message),
            )
            .await;
        }
        let hapi: Api<HospitalClient> =
            Api::namespaced(ctx.client.clone(), &d.hospital.namespace().unwrap_or_default());
        ledger::update_status(&hapi, &d.hospital.name_any(), |s, _| {
            match s.admissions.iter_mut().find(|a| a.study == want.study) {
                Some(a) if *a == want => return Ok(false),
                Some(a) => *a = want.clone(),
                None => s.admissions.push(want.clone()),
            }
            Ok(true)
        })
        .await?;
    }
    let generation = study.metadata.generation;
    if excluded.is_empty() {
        set_condition(
            &mut status.conditions,
            types::HOSPITALS_ADMITTED,
            cstatus::TRUE,
            "AllAdmitted",
            format!("all {selected} selected hospitals are admitted (consent hash {hash})"),
            generation,
        );
    } else {
        set_condition(
            &mut status.conditions,
            types::HOSPITALS_ADMITTED,
            cstatus::FALSE,
            "HospitalsExcluded",
            format!(
                "{} of {selected} selected hospitals are left out: {}; each HospitalClient's status.admissions says why (consent is given as {study_ref}@{hash})",
                excluded.len(),
                excluded.join(", ")
            ),
            generation,
        );
    }
    Ok(())
}
