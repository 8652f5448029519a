//! The operator's trust boundaries on the real local control plane: what a study owner, or anyone
//! who can create objects in a study namespace, cannot make the operator do with a hospital's data.
//!
//! - a hand-made TrainingRound (with an owner reference to the study) gets nothing scheduled;
//! - consent binds to the study's terms: a bare name, or a hash of terms that changed since, is
//!   not admitted;
//! - a trainer image outside the hospital's allow-list is refused;
//! - a study without DP is refused unless the hospital allows non-private studies;
//! - a hospital in a namespace the operator does not serve is refused;
//! - a trainer Job deleted during its round is not created again;
//! - a study whose round cannot be created leaves every budget as it was;
//! - a hospital whose ledger is not empty cannot be deleted without the forget annotation, and a
//!   re-created hospital gets its ledger back.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, types};
use caduceus_crds::{FederatedStudy, HospitalClient, TrainingRound};
use common::{
    TestNamespace, apply, bin_dir, client, consent, consent_hash, hospital, install_crds, kubeconfig,
    kubectl, study_yaml, unique, wait_for,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};

struct Operator(Child);

impl Operator {
    fn start(ns: &str, watch: &[&str], log: PathBuf) -> Self {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(bin_dir().join("caduceus-operator"))
            .env("KUBECONFIG", kubeconfig())
            .env("RUST_LOG", "info,kube=warn")
            .args([
                "--namespace",
                ns,
                "--endpoint-mode",
                "loopback",
                "--leader-elect=false",
            ])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--watch-namespaces", &watch.join(",")])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting caduceus-operator");
        Operator(child)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The admission of `study_ref` in a hospital's status: (reason, message).
async fn admission(client: &Client, hns: &str, name: &str, study_ref: &str) -> Option<(String, String)> {
    let h = Api::<HospitalClient>::namespaced(client.clone(), hns)
        .get_opt(name)
        .await
        .ok()
        .flatten()?;
    let a = h.status?.admissions.into_iter().find(|a| a.study == study_ref)?;
    Some((a.reason, a.message))
}

async fn wait_admission(client: &Client, hns: &str, name: &str, study_ref: &str, reason: &str) -> String {
    wait_for(
        &format!("{hns}/{name}'s admission to {study_ref} to be {reason}"),
        Duration::from_secs(90),
        || async move {
            let (r, m) = admission(client, hns, name, study_ref).await?;
            (r == reason).then_some(m)
        },
    )
    .await
}

async fn study_ready(api: &Api<FederatedStudy>, name: &str) -> Option<(String, String)> {
    let c = api
        .get_opt(name)
        .await
        .ok()
        .flatten()?
        .status?
        .conditions
        .condition(types::READY)?
        .clone();
    Some((c.reason, c.message))
}

/// A study manifest without its claim (study_yaml's first document is the model-store claim).
fn study_only(yaml: &str) -> String {
    yaml.split("\n---\n").nth(1).unwrap().to_string()
}

#[tokio::test]
async fn the_operator_keeps_its_trust_boundaries() {
    let client = client().await;
    let work = tempfile::tempdir().unwrap();
    install_crds();
    let op_ns = TestNamespace::create(&client, "e2e-trust-op").await;
    let sns = TestNamespace::create(&client, "e2e-trust-s").await;
    let nostart_ns = TestNamespace::create(&client, "e2e-trust-ns").await;
    let h0 = TestNamespace::create(&client, "e2e-trust-h0").await;
    let h1 = TestNamespace::create(&client, "e2e-trust-h1").await;
    let unserved = TestNamespace::create(&client, "e2e-trust-x").await;
    let net = unique("trust");
    // Hospitals with empty data claims: a trainer that starts fails at once (no data), which is all
    // these checks need. Consent is given later, per study.
    hospital(&client, &h0.name, "good", None, 50.0, &[], &net, "/").await;
    hospital(&client, &h1.name, "open", None, 50.0, &[], &net, "/").await;
    hospital(&client, &unserved.name, "far", None, 50.0, &[], &net, "/").await;
    Api::<HospitalClient>::namespaced(client.clone(), &h1.name)
        .patch(
            "open",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"allowNonPrivateStudies": true}})),
        )
        .await
        .unwrap();
    let op = Operator::start(
        &op_ns.name,
        &[&sns.name, &nostart_ns.name, &h0.name, &h1.name],
        work.path().join("operator.log"),
    );
    let log = work.path().join("operator.log");
    let dump = || std::fs::read_to_string(&log).unwrap_or_default();
    let studies: Api<FederatedStudy> = Api::namespaced(client.clone(), &sns.name);
    let rounds: Api<TrainingRound> = Api::namespaced(client.clone(), &sns.name);
    let good: Api<HospitalClient> = Api::namespaced(client.clone(), &h0.name);

    // 1. Consent binds to the terms; the hospital decides the trainer image.
    let img = "img";
    let img_ref = format!("{}/{img}", sns.name);
    let yaml = study_yaml(&sns.name, img, &net, 1, 1, 10).replace(
        "  modelStore: {claimName: models}",
        "  modelStore: {claimName: models}\n  images: {trainer: registry.invalid/evil/trainer:1}",
    );
    apply(&yaml);
    good.patch(
        "good",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"spec": {"consentedStudies": [img_ref.clone()]}})),
    )
    .await
    .unwrap();
    let hash = consent_hash(&client, &sns.name, img).await;
    let msg = wait_admission(&client, &h0.name, "good", &img_ref, "ConsentOutdated").await;
    assert!(
        msg.contains(&format!("{img_ref}@{hash}")),
        "names the hash to approve: {msg}"
    );
    consent(&client, &sns.name, img, &[(&h0.name, "good")]).await;
    let msg = wait_admission(&client, &h0.name, "good", &img_ref, "TrainerImageNotAllowed").await;
    assert!(msg.contains("registry.invalid/evil/trainer:1"), "{msg}");
    // A change of the terms after consent needs fresh consent.
    let changed = study_only(&yaml).replace("rounds: {total: 1,", "rounds: {total: 50,");
    apply(&changed);
    let msg = wait_admission(&client, &h0.name, "good", &img_ref, "ConsentOutdated").await;
    assert!(msg.contains("terms changed"), "{msg}");
    // The hospital's admission is written before the study's status in one reconcile: wait for it.
    let new_hash = wait_for("the new consent hash", Duration::from_secs(30), || async {
        let h = consent_hash(&client, &sns.name, img).await;
        (h != hash).then_some(h)
    })
    .await;
    assert_ne!(hash, new_hash);
    let st = studies.get(img).await.unwrap().status.unwrap();
    let c = st.conditions.condition(types::HOSPITALS_ADMITTED).unwrap();
    assert_eq!(c.status, "False", "{c:?}");
    assert!(
        rounds
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    studies.delete(img, &DeleteParams::default()).await.unwrap();

    // 2. A study without DP is refused unless the hospital allows it; unserved namespaces too.
    let open = "open";
    let open_ref = format!("{}/{open}", sns.name);
    let yaml = study_only(&study_yaml(&sns.name, open, &net, 1, 3, 10)).replace(
        "privacy: {noiseMultiplier: 1, sampleRate: 0.05, clipNorm: 1.0, delta: 1.0e-5}",
        "privacy: {enabled: false}",
    );
    assert!(yaml.contains("enabled: false"), "{yaml}");
    apply(&yaml);
    consent(
        &client,
        &sns.name,
        open,
        &[(&h0.name, "good"), (&h1.name, "open"), (&unserved.name, "far")],
    )
    .await;
    wait_admission(&client, &h0.name, "good", &open_ref, "NonPrivateNotAllowed").await;
    wait_admission(&client, &h1.name, "open", &open_ref, "Admitted").await;
    // The hospitals' admissions are written before the study's status: wait for the condition that
    // counts the admitted one rather than reading the first WaitingForHospitals (an older count).
    let (reason, msg) = wait_for(
        "the non-private study to wait for 3 hospitals with 1 admitted",
        Duration::from_secs(60),
        || async {
            study_ready(&studies, open)
                .await
                .filter(|(r, m)| r == "WaitingForHospitals" && m.contains("1 can take part"))
        },
    )
    .await;
    assert!(
        msg.contains("needs 3 hospitals; 1 can take part"),
        "{reason}: {msg}"
    );
    wait_admission(&client, &unserved.name, "far", &open_ref, "NamespaceNotServed").await;
    let st = studies.get(open).await.unwrap().status.unwrap();
    let c = st
        .conditions
        .condition(types::HOSPITALS_ADMITTED)
        .unwrap()
        .clone();
    assert!(
        c.message.contains("NonPrivateNotAllowed") && c.message.contains("NamespaceNotServed"),
        "{c:?}"
    );
    studies.delete(open, &DeleteParams::default()).await.unwrap();

    // 3. A hand-made TrainingRound, owner reference and all, gets nothing.
    let dp = "dp";
    let dp_ref = format!("{}/{dp}", sns.name);
    apply(&study_only(&study_yaml(&sns.name, dp, &net, 1, 1, 10)).replace(
        "  modelStore: {claimName: models}",
        "  modelStore: {claimName: models}\n  suspend: true",
    ));
    consent(&client, &sns.name, dp, &[(&h0.name, "good")]).await;
    let study = wait_for("the dp study's uid", Duration::from_secs(30), || async {
        studies.get_opt(dp).await.ok().flatten()
    })
    .await;
    let forged: TrainingRound = serde_json::from_value(serde_json::json!({
        "apiVersion": "fl.caduceus.dev/v1alpha1", "kind": "TrainingRound",
        "metadata": {
            "name": "dp-r7", "namespace": sns.name,
            "labels": {"fl.caduceus.dev/study": dp},
            "ownerReferences": [{"apiVersion": "fl.caduceus.dev/v1alpha1", "kind": "FederatedStudy",
                "name": dp, "uid": study.uid().unwrap(), "controller": true}],
        },
        "spec": {"study": dp, "round": 7, "participants": [format!("{}/good", h0.name)],
                 "minParticipants": 1, "studyUid": study.uid().unwrap()},
    }))
    .unwrap();
    rounds.create(&Default::default(), &forged).await.unwrap();
    let c = wait_for(
        "the forged round to be refused",
        Duration::from_secs(60),
        || async {
            let r = rounds.get_opt("dp-r7").await.ok().flatten()?;
            r.status?.conditions.condition(types::SUCCEEDED).cloned()
        },
    )
    .await;
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "NotCreatedByOperator"),
        "{c:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lp = ListParams::default().labels(&format!("fl.caduceus.dev/study={dp}"));
    for ns in [&sns.name, &h0.name] {
        let j = Api::<Job>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .unwrap()
            .items;
        assert!(j.is_empty(), "a Job for the forged round in {ns}: {j:?}");
    }
    let s = Api::<Secret>::namespaced(client.clone(), &h0.name)
        .list(&lp)
        .await
        .unwrap()
        .items;
    assert!(
        s.is_empty(),
        "a certificate or key was issued for the forged round"
    );
    studies.delete(dp, &DeleteParams::default()).await.unwrap();

    // 4. A study whose round cannot be created (an admission policy denies it) leaves the budget
    //    as it was: every reservation is cancelled.
    let nostart = "nostart";
    let policy = unique("deny-rounds");
    let vap = format!(
        r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {policy}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - apiGroups: [fl.caduceus.dev]
        apiVersions: ["*"]
        operations: [CREATE]
        resources: [trainingrounds]
  validations:
    - expression: "false"
      message: "no rounds in this namespace (test)"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {policy}}}
spec:
  policyName: {policy}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {ns}}}
"#,
        ns = nostart_ns.name
    );
    apply(&vap);
    // A new policy takes a moment to be enforced: probe it with a server-side dry run until a
    // round is refused, so that the study's first round cannot slip in before it.
    let probe: TrainingRound = serde_json::from_value(serde_json::json!({
        "apiVersion": "fl.caduceus.dev/v1alpha1", "kind": "TrainingRound",
        "metadata": {"name": "probe-r0", "namespace": nostart_ns.name},
        "spec": {"study": "probe", "round": 0, "participants": [format!("{}/open", h1.name)],
                 "minParticipants": 1, "studyUid": "probe"},
    }))
    .unwrap();
    let nostart_rounds = Api::<TrainingRound>::namespaced(client.clone(), &nostart_ns.name);
    let dry = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    wait_for(
        "the admission policy to refuse rounds",
        Duration::from_secs(60),
        || async {
            match nostart_rounds.create(&dry, &probe).await {
                Err(kube::Error::Api(e)) if e.message.contains("no rounds in this namespace") => Some(()),
                _ => None,
            }
        },
    )
    .await;
    apply(&study_yaml(&nostart_ns.name, nostart, &net, 1, 1, 10));
    consent(&client, &nostart_ns.name, nostart, &[(&h1.name, "open")]).await;
    let open_h: Api<HospitalClient> = Api::namespaced(client.clone(), &h1.name);
    // The operator tries (and fails) to create the round at least once.
    wait_for(
        "the operator to try to start the round",
        Duration::from_secs(60),
        || async { dump().contains("no rounds in this namespace").then_some(()) },
    )
    .await;
    // Stop it, then look: no reservation may be left behind.
    let nostart_api = Api::<FederatedStudy>::namespaced(client.clone(), &nostart_ns.name);
    nostart_api
        .delete(nostart, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the study that never started to be gone",
        Duration::from_secs(60),
        || async {
            nostart_api
                .get_opt(nostart)
                .await
                .ok()
                .flatten()
                .is_none()
                .then_some(())
        },
    )
    .await;
    let ledger_cm = Api::<ConfigMap>::namespaced(client.clone(), &op_ns.name)
        .list(&ListParams::default().labels("app.kubernetes.io/component=privacy-ledger"))
        .await
        .unwrap()
        .items;
    let text: String = ledger_cm
        .iter()
        .filter_map(|c| c.data.as_ref()?.get("ledger.json").cloned())
        .collect();
    assert!(
        !text.contains(nostart),
        "a reservation of the study that never started is left: {text}"
    );
    let eps = open_h
        .get("open")
        .await
        .unwrap()
        .status
        .and_then(|s| s.epsilon_spent);
    assert!(
        eps.unwrap_or(0.0) == 0.0,
        "budget charged for a round that never existed: {eps:?}"
    );
    let _ = kubectl(&[
        "delete",
        "validatingadmissionpolicybinding,validatingadmissionpolicy",
        &policy,
    ]);

    // 5. A round that runs: its trainer Job, once deleted, is not created again; the round charges
    //    the ledger (the trainer started).
    let run = "run";
    apply(&study_only(&study_yaml(&sns.name, run, &net, 1, 1, 15)).replace("maxRetries: 1", "maxRetries: 0"));
    consent(&client, &sns.name, run, &[(&h0.name, "good")]).await;
    let tjobs: Api<Job> = Api::namespaced(client.clone(), &h0.name);
    let tlp = ListParams::default().labels(&format!("fl.caduceus.dev/study={run}"));
    let tj = wait_for("the trainer Job", Duration::from_secs(120), || async {
        tjobs.list(&tlp).await.ok()?.items.pop()
    })
    .await;
    tjobs
        .delete(&tj.name_any(), &DeleteParams::background())
        .await
        .unwrap();
    let (reason, msg) = wait_for("the study to end", Duration::from_secs(300), || async {
        study_ready(&studies, run)
            .await
            .filter(|(r, _)| r == "RoundFailed" || r == "Completed")
    })
    .await;
    assert_eq!(reason, "RoundFailed", "{msg}\n{}", dump());
    assert!(
        tjobs.list(&tlp).await.unwrap().items.is_empty(),
        "the deleted trainer Job was created again"
    );
    let r0 = rounds.get("run-r0").await.unwrap();
    let m = r0
        .status
        .unwrap()
        .conditions
        .condition(types::SUCCEEDED)
        .unwrap()
        .message
        .clone();
    assert!(m.contains("never created twice"), "{m}");
    let spent = wait_for("the round to be charged", Duration::from_secs(30), || async {
        good.get("good")
            .await
            .ok()?
            .status?
            .epsilon_spent
            .filter(|e| *e > 0.0)
    })
    .await;

    // 6. The hospital cannot be deleted while its ledger holds that spending...
    good.delete("good", &DeleteParams::default()).await.unwrap();
    let c = wait_for("the deletion to be refused", Duration::from_secs(60), || async {
        good.get_opt("good")
            .await
            .ok()
            .flatten()?
            .status?
            .conditions
            .condition(types::DELETION_BLOCKED)
            .cloned()
    })
    .await;
    assert!(c.message.contains("forget-privacy-ledger"), "{c:?}");
    // ...and if its finalizer is forced away and it is re-created (a restore without status),
    // the ledger comes back.
    good.patch(
        "good",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    wait_for("the hospital to be gone", Duration::from_secs(30), || async {
        good.get_opt("good").await.ok().flatten().is_none().then_some(())
    })
    .await;
    hospital(&client, &h0.name, "good", None, 50.0, &[], &net, "/").await;
    let restored = wait_for("the ledger to be restored", Duration::from_secs(60), || async {
        good.get("good").await.ok()?.status?.epsilon_spent
    })
    .await;
    assert!(
        (restored - spent).abs() < 1e-9,
        "restored ε {restored} vs {spent}"
    );
    // With the annotation, deletion forgets the ledger.
    good.patch(
        "good",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"metadata": {"annotations": {"fl.caduceus.dev/forget-privacy-ledger": "true"}}})),
    )
    .await
    .unwrap();
    good.delete("good", &DeleteParams::default()).await.unwrap();
    wait_for(
        "the forgotten hospital to be gone",
        Duration::from_secs(60),
        || async { good.get_opt("good").await.ok().flatten().is_none().then_some(()) },
    )
    .await;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &op_ns.name);
    let left = cms
        .list(&ListParams::default().labels(&format!("fl.caduceus.dev/hospital-namespace={}", h0.name)))
        .await
        .unwrap()
        .items;
    assert!(left.is_empty(), "the forgotten ledger is still there");
    let _ = dp_ref;
    // Let the namespaces go: stop the operator (it would put the finalizers back), then remove the
    // finalizers of the ledgers left in its namespace and of the remaining hospitals.
    drop(op);
    for cm in cms.list(&ListParams::default()).await.unwrap().items {
        let _ = cms
            .patch(
                &cm.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({"metadata": {"finalizers": null}})),
            )
            .await;
    }
    for (ns, name) in [(&h1.name, "open"), (&unserved.name, "far")] {
        let _ = Api::<HospitalClient>::namespaced(client.clone(), ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({"metadata": {"finalizers": null}})),
            )
            .await;
    }
}
