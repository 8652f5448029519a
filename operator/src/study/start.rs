//! Starting a round: choose its participants, reserve their privacy spending in each durable
//! ledger, then create and sign the `TrainingRound`; every path that creates none cancels the
//! reservations it made.

use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, status as cstatus, types};
use caduceus_crds::{FederatedStudy, FederatedStudyStatus, HospitalClient, TrainingRound, set_condition};
use caduceus_privacy::ledger::RoundKey;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::Action;

use super::Decision;
use crate::build;
use crate::context::{Context, Result};
use crate::ledger;
use crate::plan::{self, Exclusion};
use crate::signing;

/// The round a study is about to start.
pub struct RoundStart<'a> {
    pub study: &'a FederatedStudy,
    pub hash: &'a str,
    pub signing_key: &'a [u8],
    pub round: u32,
    pub attempt: u32,
}

/// Cancels the reservations of `key` that this reconcile made (the round was never created).
async fn cancel_reservations(ctx: &Context, reserved: &[String], key: &RoundKey) -> Result<()> {
    for r in reserved {
        let (hns, h) = r.split_once('/').unwrap_or(("", r));
        ledger::cancel(&ctx.client, &ctx.settings.operator_namespace, hns, h, key).await?;
    }
    Ok(())
}

/// Chooses the participants of a round, reserves their spending and creates the (signed)
/// TrainingRound. On every path that creates no round, the reservations made here are cancelled.
pub async fn start_round(
    ctx: &Context,
    start: &RoundStart<'_>,
    status: &mut FederatedStudyStatus,
    decisions: &[Decision],
) -> Result<Action> {
    let study = start.study;
    let (round, attempt) = (start.round, start.attempt);
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let uid = study.metadata.uid.clone().unwrap_or_default();
    let generation = study.metadata.generation;
    let acc = plan::accountant(study.spec.privacy.accountant);
    let privacy = status.privacy_plan.clone();
    let opns = ctx.settings.operator_namespace.clone();
    let mut admitted = Vec::new();
    let mut exhausted = Vec::new();
    let mut not_ready = Vec::new();
    for d in decisions {
        let h = &d.hospital;
        let hapi: Api<HospitalClient> =
            Api::namespaced(ctx.client.clone(), &h.namespace().unwrap_or_default());
        match &d.admitted {
            Ok(()) => {
                if privacy.is_some()
                    && h.status
                        .as_ref()
                        .is_some_and(|s| s.conditions.is_true(types::PRIVACY_BUDGET_EXHAUSTED))
                {
                    ledger::set_budget_condition(
                        &hapi,
                        &h.name_any(),
                        false,
                        "WithinBudget",
                        "the next round fits the budget",
                    )
                    .await?;
                }
                admitted.push(d.candidate.reference.clone());
            }
            Err(Exclusion::BudgetExhausted { message }) => {
                let already = h
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.condition(types::PRIVACY_BUDGET_EXHAUSTED))
                    .is_some_and(|c| c.status == cstatus::TRUE && c.message == *message);
                if !already && h.metadata.deletion_timestamp.is_none() {
                    ledger::set_budget_condition(&hapi, &h.name_any(), true, "BudgetExceeded", message)
                        .await?;
                }
                exhausted.push(d.candidate.reference.clone());
            }
            Err(Exclusion::NotReady) => not_ready.push(d.candidate.reference.clone()),
            Err(_) => {}
        }
    }
    let chosen = plan::participants(&admitted, study.spec.rounds.max_hospitals);
    let min = study.spec.rounds.min_hospitals as usize;
    if chosen.len() < min {
        let (reason, msg) = if !exhausted.is_empty() && chosen.len() + exhausted.len() >= min {
            (
                "PrivacyBudgetExhausted",
                format!(
                    "stopped before round {round}: only {} hospitals can take part, {min} are needed; the privacy budgets of {} would be overspent",
                    chosen.len(),
                    exhausted.join(", ")
                ),
            )
        } else {
            (
                "WaitingForHospitals",
                format!(
                    "round {round} needs {min} hospitals; {} can take part{}{}",
                    chosen.len(),
                    if not_ready.is_empty() {
                        String::new()
                    } else {
                        format!(", not ready: {}", not_ready.join(", "))
                    },
                    if exhausted.is_empty() {
                        String::new()
                    } else {
                        format!(", budget exhausted: {}", exhausted.join(", "))
                    },
                ),
            )
        };
        super::mark_not_ready(ctx, study, status, reason, msg, "StartRound").await;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }

    // Reserve each participant's spending before the round (and so any trainer Job) exists.
    let key = ledger::round_key(&ns, &name, &uid, attempt, round);
    let mut participants = Vec::new();
    let mut reserved = Vec::new();
    if let Some(p) = &privacy {
        let mechanisms = plan::round_mechanisms(p);
        for r in &chosen {
            let Some(d) = decisions.iter().find(|d| &d.candidate.reference == r) else {
                continue;
            };
            match ledger::reserve(&ctx.client, &opns, &d.hospital, &key, &mechanisms, acc).await {
                Ok(Ok(())) => {
                    participants.push(r.clone());
                    reserved.push(r.clone());
                }
                Ok(Err(msg)) => exhausted.push(format!("{r} ({msg})")),
                Err(e) => {
                    cancel_reservations(ctx, &reserved, &key).await?;
                    return Err(e);
                }
            }
        }
    } else {
        participants = chosen;
    }
    if participants.len() < min {
        cancel_reservations(ctx, &reserved, &key).await?;
        let msg = format!(
            "round {round}: only {} hospitals could reserve their privacy spending, {min} are needed",
            participants.len()
        );
        set_condition(
            &mut status.conditions,
            types::READY,
            cstatus::FALSE,
            "PrivacyBudgetExhausted",
            msg,
            generation,
        );
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let mut tr = build::training_round(
        study,
        round,
        attempt,
        participants.clone(),
        start.hash,
        privacy.clone(),
    );
    signing::attach(start.signing_key, &mut tr);
    let api: Api<TrainingRound> = Api::namespaced(ctx.client.clone(), &ns);
    let pp = PostParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, &tr).await {
        Ok(_) => {
            ctx.event(
                study,
                false,
                "RoundCreated",
                "StartRound",
                format!("round {round} attempt {attempt} with {}", participants.join(", ")),
            )
            .await;
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(&tr.name_any()).await?;
            if signing::verify(start.signing_key, &existing) {
                // Ours, created before a crash: keep it, with its participants.
                let keep = existing.spec.participants.clone();
                let extra: Vec<String> = reserved.iter().filter(|r| !keep.contains(r)).cloned().collect();
                cancel_reservations(ctx, &extra, &key).await?;
                participants = keep;
            } else {
                // Someone else's round in the way of ours: it schedules nothing; remove it.
                cancel_reservations(ctx, &reserved, &key).await?;
                match api.delete(&tr.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                ctx.event(
                    study,
                    true,
                    "ForeignRoundDeleted",
                    "StartRound",
                    format!(
                        "TrainingRound {ns}/{} was not created by the operator (no valid signature) and was deleted",
                        tr.name_any()
                    ),
                )
                .await;
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
        }
        Err(e) => {
            cancel_reservations(ctx, &reserved, &key).await?;
            return Err(e.into());
        }
    }
    status.current_round = Some(round + 1);
    status.participants = participants;
    set_condition(
        &mut status.conditions,
        types::READY,
        cstatus::TRUE,
        "Running",
        format!("round {round} attempt {attempt} started"),
        generation,
    );
    Ok(Action::requeue(ctx.poll * 4))
}
