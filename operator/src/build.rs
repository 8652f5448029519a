//! The build step of the pipeline: pure functions from a study, a round and the settings to the
//! Kubernetes objects they want. Nothing here talks to the API server.

use std::collections::BTreeMap;

use caduceus_crds::study::{
    LocalOptimizer, PrivacyPlan, SecureAggregationMode, SensitiveAttribute, Strategy,
};
use caduceus_crds::{FederatedStudy, HospitalClient, TrainingRound, TrainingRoundSpec};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::names;
use crate::plan;

/// How trainers reach the aggregator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EndpointMode {
    /// Through the aggregator's ClusterIP Service and cluster DNS (any real cluster).
    Service,
    /// Through 127.0.0.1 and the Service's allocated node port, with the Service's DNS name as TLS
    /// server name: for the local test cluster, whose pods share the host network and have no DNS.
    Loopback,
    /// Through a NodePort Service at `--public-host`, with the Service's DNS name as TLS server name:
    /// for trainers in other clusters (sites mode, docs/sites.md). TLS stays end to end.
    #[value(name = "nodeport")]
    NodePort,
}

/// Operator-wide settings that shape the objects.
#[derive(Debug, Clone)]
pub struct Settings {
    pub operator_namespace: String,
    pub trainer_image: String,
    pub aggregator_image: String,
    pub endpoint_mode: EndpointMode,
    /// The address of the coordinator's nodes that trainers in other clusters dial
    /// (`--endpoint-mode nodeport`).
    pub public_host: Option<String>,
    /// The study and hospital namespaces the operator serves (`--watch-namespaces`); `None` serves
    /// every namespace (and needs cluster-wide permissions).
    pub watch_namespaces: Option<std::collections::BTreeSet<String>>,
    /// The operator's own `OTEL_*` variables, passed on to every aggregator and trainer Job so that they
    /// export spans to the same collector; empty unless they turn export on
    /// (`caduceus_startup::otel::forwarded_env`).
    pub telemetry_env: Vec<(String, String)>,
}

impl Settings {
    /// Whether the operator serves namespace `ns` (its own always).
    pub fn serves(&self, ns: &str) -> bool {
        ns == self.operator_namespace || self.watch_namespaces.as_ref().is_none_or(|w| w.contains(ns))
    }

    /// The consent hash of `study` under these settings' default images.
    pub fn consent_hash(&self, study: &FederatedStudy) -> String {
        caduceus_crds::consent::consent_hash(
            &format!("{}/{}", study.namespace().unwrap_or_default(), study.name_any()),
            &study.spec,
            &self.trainer_image,
            &self.aggregator_image,
        )
    }

    /// The images `study` runs: (trainer, aggregator).
    pub fn images<'a>(&'a self, study: &'a FederatedStudy) -> (&'a str, &'a str) {
        caduceus_crds::consent::resolved_images(&study.spec, &self.trainer_image, &self.aggregator_image)
    }
}

/// Seconds a round may live, from its creation, before the operator fails it (`DeadlineExceeded`):
/// room for the aggregator's own deadline twice (the training round and the final evaluation, each
/// restarted after a crash) and for pods to start.
pub fn round_max_life_secs(study: &FederatedStudy) -> i64 {
    study.spec.rounds.deadline_seconds as i64 * 3 + 600
}

/// `activeDeadlineSeconds` of the aggregator Job: its two waits and start-up, across restarts.
pub fn aggregator_active_deadline_secs(study: &FederatedStudy) -> i64 {
    study.spec.rounds.deadline_seconds as i64 * 2 + 300
}

/// `ttlSecondsAfterFinished` of every Job of a round: longer than the round can live, so a finished
/// Job is still there (and is seen, not re-created) while its round runs.
pub fn job_ttl_secs(study: &FederatedStudy) -> i64 {
    (round_max_life_secs(study) + 3600).max(86400)
}

/// A ServiceAccount the operator's workloads run as: no token is mounted and no Role binds it.
fn tokenless_service_account(name: &str, namespace: &str) -> ServiceAccount {
    from_json(json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {names::LABEL_MANAGED_BY: names::MANAGED_BY},
        },
        "automountServiceAccountToken": false,
    }))
}

/// The ServiceAccount trainer pods run as in a hospital namespace: no token, no Role binds it.
pub fn trainer_service_account(hospital_ns: &str) -> ServiceAccount {
    tokenless_service_account(names::TRAINER_SERVICE_ACCOUNT, hospital_ns)
}

pub const TLS_DIR: &str = "/etc/caduceus/tls";
pub const KEY_DIR: &str = "/etc/caduceus/study-key";
pub const DATA_DIR: &str = "/var/lib/caduceus/data";
pub const STORE_DIR: &str = "/var/lib/caduceus/store";
pub const STATE_DIR: &str = "/var/lib/caduceus/state";
pub const TERMINATION_LOG: &str = "/dev/termination-log";

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("the builders produce valid objects (tested)")
}

/// An owner reference that makes `owner` the controller of the object.
pub fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    owner.controller_owner_ref(&()).expect("owner has a name and uid")
}

fn env(pairs: Vec<(&str, String)>) -> Value {
    Value::Array(
        pairs
            .into_iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect(),
    )
}

fn strategy_name(s: Strategy) -> &'static str {
    match s {
        Strategy::FedAvg => "fedavg",
        Strategy::FedProx => "fedprox",
        Strategy::Scaffold => "scaffold",
        Strategy::FairFed => "fairfed",
        Strategy::TrimmedMean => "trimmed-mean",
        Strategy::Median => "median",
    }
}

fn attribute_name(a: SensitiveAttribute) -> &'static str {
    match a {
        SensitiveAttribute::Race => "race",
        SensitiveAttribute::AgeGroup => "age-group",
        SensitiveAttribute::Gender => "gender",
    }
}

fn arch_name(study: &FederatedStudy) -> String {
    serde_json::to_value(study.spec.model.architecture)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "small-cnn".into())
}

/// The ServiceAccount aggregator pods run as: no token is mounted and no Role binds it.
pub fn aggregator_service_account(study: &FederatedStudy) -> ServiceAccount {
    tokenless_service_account(
        names::AGGREGATOR_SERVICE_ACCOUNT,
        &study.namespace().unwrap_or_default(),
    )
}

/// The aggregator's Service. In loopback mode it is a NodePort Service, whose allocated port the
/// aggregator listens on.
pub fn aggregator_service(study: &FederatedStudy, settings: &Settings) -> Service {
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let mut labels = names::study_labels(&ns, &name, "aggregator");
    labels.remove(names::LABEL_STUDY_NAMESPACE);
    let mut spec = json!({
        "selector": labels,
        "ports": [{"name": "grpc", "port": names::AGGREGATOR_PORT, "targetPort": names::AGGREGATOR_PORT, "protocol": "TCP"}],
    });
    if matches!(
        settings.endpoint_mode,
        EndpointMode::Loopback | EndpointMode::NodePort
    ) {
        spec["type"] = json!("NodePort");
    }
    from_json(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": names::service(&name),
            "namespace": ns,
            "labels": names::study_labels(&ns, &name, "aggregator"),
            "ownerReferences": [controller_ref(study)],
        },
        "spec": spec,
    }))
}

/// A Secret with string data.
pub fn secret(
    name: &str,
    namespace: &str,
    labels: BTreeMap<String, String>,
    owner: Option<OwnerReference>,
    data: &[(&str, &[u8])],
) -> Secret {
    let mut s: Secret = from_json(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "type": "Opaque",
    }));
    if let Some(o) = owner {
        s.metadata.owner_references = Some(vec![o]);
    }
    s.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
            .collect(),
    );
    s
}

/// The TrainingRound the study wants next (unsigned: see [`crate::signing::attach`]).
pub fn training_round(
    study: &FederatedStudy,
    round: u32,
    attempt: u32,
    participants: Vec<String>,
    consent_hash: &str,
    privacy: Option<PrivacyPlan>,
) -> TrainingRound {
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let min = study
        .spec
        .rounds
        .min_hospitals
        .min(participants.len() as u32)
        .max(1);
    let mut tr = TrainingRound::new(
        &names::round_name(&name, round, attempt),
        TrainingRoundSpec {
            study: name.clone(),
            round,
            attempt,
            participants,
            min_participants: min,
            study_uid: study.metadata.uid.clone(),
            consent_hash: Some(consent_hash.to_string()),
            privacy,
        },
    );
    tr.metadata.namespace = Some(ns.clone());
    tr.metadata.labels = Some(names::round_labels(&ns, &name, "round", round, attempt));
    tr.metadata.owner_references = Some(vec![controller_ref(study)]);
    tr
}

/// Where trainers dial and which name they verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: String,
    pub server_name: String,
    /// The port the aggregator listens on.
    pub listen_port: i32,
    pub listen_host: String,
}

/// The aggregator endpoint of a study, given its Service's node port (loopback mode).
pub fn endpoint(study: &FederatedStudy, settings: &Settings, node_port: Option<i32>) -> Option<Endpoint> {
    let ns = study.namespace().unwrap_or_default();
    let dns = names::service_dns(&study.name_any(), &ns);
    match settings.endpoint_mode {
        EndpointMode::Service => Some(Endpoint {
            address: format!("{dns}:{}", names::AGGREGATOR_PORT),
            server_name: dns,
            listen_port: names::AGGREGATOR_PORT,
            listen_host: "0.0.0.0".into(),
        }),
        EndpointMode::NodePort => {
            let host = settings.public_host.as_deref()?;
            node_port.map(|p| Endpoint {
                address: format!("{host}:{p}"),
                server_name: dns,
                listen_port: names::AGGREGATOR_PORT,
                listen_host: "0.0.0.0".into(),
            })
        }
        EndpointMode::Loopback => node_port.map(|p| Endpoint {
            address: format!("127.0.0.1:{p}"),
            server_name: dns,
            listen_port: p,
            listen_host: "127.0.0.1".into(),
        }),
    }
}

/// The non-root user of the images (distroless `nonroot`).
pub const RUN_AS_USER: i64 = 65532;

fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// Requests and limits of the aggregator container (it holds every update of a round in memory).
fn aggregator_resources() -> Value {
    json!({"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "4Gi"}})
}

/// The size limit of the trainer's scratch `emptyDir` (its model state between rounds).
pub const TRAINER_STATE_LIMIT: &str = "2Gi";

fn container_security() -> Value {
    json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}})
}

/// The aggregator Job of a round: serves training round `round` (0-based) of the study, resuming from
/// the model store, then an evaluation of the new model, and exits with a compact outcome in its
/// termination message.
pub fn aggregator_job(
    study: &FederatedStudy,
    round: &TrainingRound,
    settings: &Settings,
    ep: &Endpoint,
    hospital_ids: &[String],
    key_fingerprint: Option<&str>,
    traceparent: Option<&str>,
) -> Job {
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let s = &study.spec;
    let r = round.spec.round;
    let n = hospital_ids.len() as u32;
    let store_path = s
        .model_store
        .path
        .clone()
        .unwrap_or_else(|| format!("/{}", names::study_id(&ns, &name)));
    let (_, classes) = plan::task(s.task.label);
    let mut e = vec![
        ("CADUCEUS_STUDY_ID", names::study_id(&ns, &name)),
        ("CADUCEUS_ROUNDS", (r + 1).to_string()),
        (
            "CADUCEUS_STRATEGY",
            strategy_name(s.aggregation.strategy).to_string(),
        ),
        ("CADUCEUS_HOSPITALS", hospital_ids.join(",")),
        (
            "CADUCEUS_QUORUM_MIN",
            round.spec.min_participants.min(n).max(1).to_string(),
        ),
        ("CADUCEUS_QUORUM_MAX", n.max(1).to_string()),
        (
            "CADUCEUS_ROUND_DEADLINE_SECS",
            s.rounds.deadline_seconds.to_string(),
        ),
        ("CADUCEUS_TLS_CERT", format!("{TLS_DIR}/tls.crt")),
        ("CADUCEUS_TLS_KEY", format!("{TLS_DIR}/tls.key")),
        ("CADUCEUS_TLS_CA", format!("{TLS_DIR}/ca.crt")),
        (
            "CADUCEUS_MODEL_STORE",
            format!("{STORE_DIR}{}", normalise_path(&store_path)),
        ),
        (
            "CADUCEUS_LISTEN",
            format!("{}:{}", ep.listen_host, ep.listen_port),
        ),
        ("CADUCEUS_ARCH", arch_name(study)),
        ("CADUCEUS_NUM_CLASSES", classes.to_string()),
        ("CADUCEUS_MIN_GROUP_SIZE", s.fairness.min_group_size.to_string()),
        ("CADUCEUS_RESULT_FILE", TERMINATION_LOG.into()),
        ("CADUCEUS_FINAL_EVALUATION", "true".into()),
        ("CADUCEUS_LINGER_SECS", "10".into()),
    ];
    if let Some(mu) = s.aggregation.mu {
        e.push(("CADUCEUS_FEDPROX_MU", mu.to_string()));
    }
    if let Some(b) = s.aggregation.beta {
        e.push(("CADUCEUS_FAIRFED_BETA", b.to_string()));
    }
    if let Some(lr) = s.aggregation.server_learning_rate {
        e.push(("CADUCEUS_SCAFFOLD_SERVER_LR", lr.to_string()));
    }
    if let Some(a) = s.task.sensitive_attributes.first() {
        e.push(("CADUCEUS_FAIRFED_ATTRIBUTE", attribute_name(*a).into()));
    }
    if let Some(fp) = key_fingerprint {
        e.push(("CADUCEUS_SECURE_AGGREGATION", "tfhe".into()));
        e.push(("CADUCEUS_KEY_FINGERPRINT", fp.to_string()));
    }
    if let Some(tp) = traceparent {
        e.push(("TRACEPARENT", tp.to_string()));
    }
    e.extend(
        settings
            .telemetry_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone())),
    );
    e.push(("RUST_LOG", "info".into()));
    let job_name = names::aggregator_job(&round.name_any());
    let labels = names::round_labels(&ns, &name, "aggregator", r, round.spec.attempt);
    let mut pod_labels = labels.clone();
    pod_labels.remove(names::LABEL_STUDY_NAMESPACE);
    from_json(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": job_name, "namespace": ns, "labels": labels,
            "ownerReferences": [controller_ref(round)],
        },
        "spec": {
            "backoffLimit": 2,
            "ttlSecondsAfterFinished": job_ttl_secs(study),
            "activeDeadlineSeconds": aggregator_active_deadline_secs(study),
            // A missed quorum (1) or bad settings (2) are final; a crash retries and resumes from the
            // model store's checkpoint.
            "podFailurePolicy": {"rules": [
                {"action": "FailJob", "onExitCodes": {"containerName": "aggregator", "operator": "In", "values": [1, 2]}},
            ]},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": names::AGGREGATOR_SERVICE_ACCOUNT,
                    "automountServiceAccountToken": false,
                    "securityContext": pod_security(),
                    "containers": [{
                        "name": "aggregator",
                        "image": settings.images(study).1,
                        "env": env(e),
                        "resources": aggregator_resources(),
                        "ports": [{"name": "grpc", "containerPort": ep.listen_port}],
                        "terminationMessagePath": TERMINATION_LOG,
                        "terminationMessagePolicy": "File",
                        "securityContext": container_security(),
                        "volumeMounts": [
                            {"name": "tls", "mountPath": TLS_DIR, "readOnly": true},
                            {"name": "store", "mountPath": STORE_DIR},
                        ],
                    }],
                    "volumes": [
                        {"name": "tls", "secret": {"secretName": names::aggregator_tls_secret(&name), "defaultMode": 0o400}},
                        {"name": "store", "persistentVolumeClaim": {"claimName": s.model_store.claim_name}},
                    ],
                },
            },
        },
    }))
}

fn normalise_path(p: &str) -> String {
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else if trimmed.starts_with('/') {
        trimmed.to_string()
    } else {
        format!("/{trimmed}")
    }
}

/// A hospital's trainer Job for a round, in the hospital's namespace: its data volume read-only, its
/// client certificate, the study key (secure aggregation only), no ServiceAccount token.
/// `hospital_id` is the id its certificate carries and the aggregator admits: in one cluster
/// `names::hospital_id` of the HospitalClient, at a site that of the coordinator's mirror.
#[allow(clippy::too_many_arguments)]
pub fn trainer_job(
    study: &FederatedStudy,
    round: &TrainingRound,
    hospital: &HospitalClient,
    settings: &Settings,
    ep: &Endpoint,
    privacy: Option<&PrivacyPlan>,
    hospital_id: &str,
    traceparent: Option<&str>,
) -> Job {
    let sns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let hns = hospital.namespace().unwrap_or_default();
    let s = &study.spec;
    let r = round.spec.round;
    let (task, _) = plan::task(s.task.label);
    let sensitive: Vec<&str> = s
        .task
        .sensitive_attributes
        .iter()
        .map(|a| attribute_name(*a))
        .collect();
    let mut e = vec![
        ("CADUCEUS_HOSPITAL", hospital_id.to_string()),
        ("CADUCEUS_STUDY_ID", names::study_id(&sns, &name)),
        (
            "CADUCEUS_SHARD",
            format!("{DATA_DIR}{}", normalise_path(&hospital.spec.data.path)),
        ),
        ("CADUCEUS_AGGREGATOR", ep.address.clone()),
        ("CADUCEUS_SERVER_NAME", ep.server_name.clone()),
        ("CADUCEUS_TLS_CERT", format!("{TLS_DIR}/tls.crt")),
        ("CADUCEUS_TLS_KEY", format!("{TLS_DIR}/tls.key")),
        ("CADUCEUS_TLS_CA", format!("{TLS_DIR}/ca.crt")),
        ("CADUCEUS_ROUNDS", format!("{r}-{}", r + 1)),
        ("CADUCEUS_TASK", task.into()),
        ("CADUCEUS_BATCH_SIZE", s.training.batch_size.to_string()),
        ("CADUCEUS_LR", s.training.learning_rate.to_string()),
        (
            "CADUCEUS_OPTIMIZER",
            match s.training.optimizer {
                LocalOptimizer::AdamW => "adamw",
                LocalOptimizer::Sgd => "sgd",
            }
            .into(),
        ),
        (
            "CADUCEUS_SEED",
            (r as u64 * 1000 + round.spec.attempt as u64).to_string(),
        ),
        ("CADUCEUS_STATE_DIR", STATE_DIR.into()),
        ("CADUCEUS_SUMMARY_PATH", TERMINATION_LOG.into()),
        ("CADUCEUS_RETRY_SECS", s.rounds.deadline_seconds.to_string()),
    ];
    if let Some(m) = s.training.momentum {
        e.push(("CADUCEUS_MOMENTUM", m.to_string()));
    }
    if !sensitive.is_empty() {
        e.push(("CADUCEUS_SENSITIVE", sensitive.join(",")));
    }
    match privacy {
        Some(p) => {
            // The operator plans every DP step: the trainer runs exactly the steps it was charged for.
            e.push(("CADUCEUS_LOCAL_STEPS", p.steps_per_round.to_string()));
            e.push(("CADUCEUS_DP_NOISE_MULTIPLIER", p.noise_multiplier.to_string()));
            e.push(("CADUCEUS_DP_SAMPLE_RATE", p.sample_rate.to_string()));
            e.push(("CADUCEUS_DP_CLIP_NORM", p.clip_norm.to_string()));
            e.push(("CADUCEUS_DP_DELTA", p.delta.to_string()));
            if let Some(z) = p.evaluation_noise_multiplier {
                e.push(("CADUCEUS_DP_EVAL_NOISE_MULTIPLIER", z.to_string()));
            }
        }
        None => {
            if let Some(steps) = s.training.steps {
                e.push(("CADUCEUS_LOCAL_STEPS", steps.to_string()));
            }
            if let Some(ep) = s.training.epochs {
                e.push(("CADUCEUS_LOCAL_EPOCHS", ep.to_string()));
            }
        }
    }
    let tfhe = s.secure_aggregation.mode == SecureAggregationMode::Tfhe;
    if tfhe {
        e.push(("CADUCEUS_SECURE_AGGREGATION", "tfhe".into()));
        e.push(("CADUCEUS_STUDY_KEY", format!("{KEY_DIR}/study.key")));
    }
    if let Some(tp) = traceparent {
        e.push(("TRACEPARENT", tp.to_string()));
    }
    e.extend(
        settings
            .telemetry_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone())),
    );
    e.push(("RUST_LOG", "info".into()));
    let mut labels = names::round_labels(&sns, &name, "trainer", r, round.spec.attempt);
    labels.insert(names::LABEL_HOSPITAL.into(), hospital.name_any());
    let mut mounts = vec![
        json!({"name": "data", "mountPath": DATA_DIR, "readOnly": true}),
        json!({"name": "tls", "mountPath": TLS_DIR, "readOnly": true}),
        json!({"name": "state", "mountPath": STATE_DIR}),
    ];
    let mut volumes = vec![
        json!({"name": "data", "persistentVolumeClaim": {"claimName": hospital.spec.data.claim_name, "readOnly": true}}),
        json!({"name": "tls", "secret": {"secretName": names::hospital_tls_secret(&sns, &name, &hospital.name_any()), "defaultMode": 0o400}}),
        json!({"name": "state", "emptyDir": {"sizeLimit": TRAINER_STATE_LIMIT}}),
    ];
    if tfhe {
        mounts.push(json!({"name": "study-key", "mountPath": KEY_DIR, "readOnly": true}));
        volumes.push(json!({"name": "study-key", "secret": {"secretName": names::hospital_key_secret(&sns, &name, &hospital.name_any()), "defaultMode": 0o400}}));
    }
    let mut container = json!({
        "name": "trainer",
        "image": settings.images(study).0,
        "env": env(e),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security(),
        "volumeMounts": mounts,
    });
    let mut pod = json!({
        "restartPolicy": "Never",
        "serviceAccountName": names::TRAINER_SERVICE_ACCOUNT,
        "automountServiceAccountToken": false,
        "securityContext": pod_security(),
        "containers": [],
        "volumes": volumes,
    });
    if let Some(t) = &hospital.spec.trainer {
        if let Some(res) = &t.resources {
            container["resources"] = serde_json::to_value(res).unwrap_or(Value::Null);
        }
        if !t.node_selector.is_empty() {
            pod["nodeSelector"] = json!(t.node_selector);
        }
        if !t.tolerations.is_empty() {
            pod["tolerations"] = serde_json::to_value(&t.tolerations).unwrap_or(Value::Null);
        }
    }
    pod["containers"] = json!([container]);
    let mut pod_labels = labels.clone();
    pod_labels.remove(names::LABEL_STUDY_NAMESPACE);
    from_json(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": names::trainer_job(&sns, &round.name_any(), &hospital.name_any()),
            "namespace": hns,
            "labels": labels,
        },
        "spec": {
            // A retried trainer would train and release a second, freshly noised update: never.
            "backoffLimit": 0,
            // Created suspended; the round controller resumes it once its start is on record.
            "suspend": true,
            "ttlSecondsAfterFinished": job_ttl_secs(study),
            "activeDeadlineSeconds": (s.rounds.deadline_seconds as i64) * 3,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod},
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn study(tfhe: bool) -> FederatedStudy {
        let mut s: FederatedStudy = serde_yaml::from_str(&format!(
            r#"
apiVersion: fl.caduceus.dev/v1alpha1
kind: FederatedStudy
metadata: {{name: gender, namespace: studies, uid: "1234"}}
spec:
  model: {{architecture: small-cnn}}
  task: {{label: gender, sensitiveAttributes: [race]}}
  rounds: {{total: 3, minHospitals: 2, deadlineSeconds: 60}}
  training: {{steps: 5, batchSize: 32}}
  privacy: {{noiseMultiplier: 1.1, sampleRate: 0.02}}
  secureAggregation: {{mode: {}}}
  hospitalSelector: {{}}
  modelStore: {{claimName: store}}
"#,
            if tfhe { "Tfhe" } else { "None" }
        ))
        .unwrap();
        s.metadata.uid = Some("1234".into());
        s
    }

    #[test]
    fn workload_service_accounts_mount_no_token() {
        for (sa, name, ns) in [
            (
                trainer_service_account("north"),
                names::TRAINER_SERVICE_ACCOUNT,
                "north",
            ),
            (
                aggregator_service_account(&study(false)),
                names::AGGREGATOR_SERVICE_ACCOUNT,
                "studies",
            ),
        ] {
            assert_eq!(sa.metadata.name.as_deref(), Some(name));
            assert_eq!(sa.metadata.namespace.as_deref(), Some(ns));
            assert_eq!(sa.automount_service_account_token, Some(false));
            assert_eq!(
                sa.metadata
                    .labels
                    .unwrap()
                    .get(names::LABEL_MANAGED_BY)
                    .map(String::as_str),
                Some(names::MANAGED_BY)
            );
        }
    }

    fn hospital() -> HospitalClient {
        serde_yaml::from_str(
            r#"
apiVersion: fl.caduceus.dev/v1alpha1
kind: HospitalClient
metadata: {name: st-mary, namespace: north, uid: "77"}
spec:
  data: {claimName: faces, path: /shard}
  privacyBudget: {epsilon: 8}
  consentedStudies: [studies/gender]
"#,
        )
        .unwrap()
    }

    fn settings(mode: EndpointMode) -> Settings {
        Settings {
            operator_namespace: "caduceus-system".into(),
            trainer_image: "caduceus-trainer:test".into(),
            aggregator_image: "caduceus-aggregator:test".into(),
            endpoint_mode: mode,
            public_host: Some("coordinator.example.org".into()),
            watch_namespaces: None,
            telemetry_env: Vec::new(),
        }
    }

    fn env_of(job: &Job) -> BTreeMap<String, String> {
        let c = &job
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        c.env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    #[test]
    fn trainer_job_mounts_data_read_only_and_has_no_token() {
        let st = study(true);
        let mut round = training_round(&st, 1, 0, vec!["north/st-mary".into()], "h", None);
        round.metadata.uid = Some("r1".into());
        let s = settings(EndpointMode::Service);
        let ep = endpoint(&st, &s, None).unwrap();
        let plan = plan::privacy_plan(&st.spec).unwrap();
        let id = names::hospital_id("north", "st-mary");
        let job = trainer_job(&st, &round, &hospital(), &s, &ep, plan.as_ref(), &id, None);
        assert_eq!(job.metadata.namespace.as_deref(), Some("north"));
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        let vols = pod.volumes.as_ref().unwrap();
        let data = vols.iter().find(|v| v.name == "data").unwrap();
        assert_eq!(
            data.persistent_volume_claim.as_ref().unwrap().read_only,
            Some(true)
        );
        assert!(vols.iter().any(|v| {
            v.secret.as_ref().is_some_and(|s| {
                s.secret_name.as_deref() == Some(&names::hospital_key_secret("studies", "gender", "st-mary"))
            })
        }));
        let e = env_of(&job);
        assert_eq!(e["CADUCEUS_ROUNDS"], "1-2");
        assert_eq!(e["CADUCEUS_LOCAL_STEPS"], "5");
        assert_eq!(e["CADUCEUS_DP_NOISE_MULTIPLIER"], "1.1");
        assert_eq!(e["CADUCEUS_AGGREGATOR"], "gender-aggregator.studies.svc:50051");
        assert_eq!(e["CADUCEUS_SHARD"], "/var/lib/caduceus/data/shard");
        assert_eq!(e["CADUCEUS_HOSPITAL"], names::hospital_id("north", "st-mary"));
        assert_eq!(e["CADUCEUS_DP_EVAL_NOISE_MULTIPLIER"], "10");
        assert_eq!(job.spec.as_ref().unwrap().backoff_limit, Some(0));
        assert_eq!(
            job.spec.as_ref().unwrap().suspend,
            Some(true),
            "resumed only once its start is recorded"
        );
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some(names::TRAINER_SERVICE_ACCOUNT),
            "never a ServiceAccount of the hospital's choosing"
        );
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_user,
            Some(RUN_AS_USER)
        );
        let state = vols.iter().find(|v| v.name == "state").unwrap();
        assert!(state.empty_dir.as_ref().unwrap().size_limit.is_some());
        assert!(
            job.spec.as_ref().unwrap().ttl_seconds_after_finished.unwrap() as i64 > round_max_life_secs(&st),
            "a finished trainer Job outlives its round"
        );
    }

    #[test]
    fn trainer_job_passes_the_local_optimiser() {
        let mut st = study(false);
        let mut round = training_round(&st, 0, 0, vec!["north/st-mary".into()], "h", None);
        round.metadata.uid = Some("r0".into());
        let s = settings(EndpointMode::Service);
        let ep = endpoint(&st, &s, None).unwrap();
        let plan = plan::privacy_plan(&st.spec).unwrap();
        let env = |st: &FederatedStudy| {
            env_of(&trainer_job(
                st,
                &round,
                &hospital(),
                &s,
                &ep,
                plan.as_ref(),
                "north-st-mary",
                None,
            ))
        };
        let e = env(&st);
        assert_eq!(e["CADUCEUS_OPTIMIZER"], "adamw");
        assert!(!e.contains_key("CADUCEUS_MOMENTUM"));

        st.spec.training.optimizer = LocalOptimizer::Sgd;
        st.spec.training.momentum = Some(0.9);
        st.spec.training.learning_rate = 0.03;
        let e = env(&st);
        assert_eq!(e["CADUCEUS_OPTIMIZER"], "sgd");
        assert_eq!(e["CADUCEUS_MOMENTUM"], "0.9");
        assert_eq!(e["CADUCEUS_LR"], "0.03");
    }

    #[test]
    fn jobs_get_the_operators_otel_settings_only_when_it_has_them() {
        let st = study(false);
        let mut round = training_round(&st, 0, 0, vec!["north/st-mary".into()], "h", None);
        round.metadata.uid = Some("r0".into());
        let ids = vec![names::hospital_id("north", "st-mary")];
        let tp = crate::round::traceparent(&round, "x");
        let envs = |s: &Settings| {
            let ep = endpoint(&st, s, None).unwrap();
            let plan = plan::privacy_plan(&st.spec).unwrap();
            [
                env_of(&aggregator_job(&st, &round, s, &ep, &ids, None, Some(&tp))),
                env_of(&trainer_job(
                    &st,
                    &round,
                    &hospital(),
                    s,
                    &ep,
                    plan.as_ref(),
                    &ids[0],
                    Some(&tp),
                )),
            ]
        };
        let otel = |e: &BTreeMap<String, String>| {
            e.iter()
                .filter(|(k, _)| k.starts_with("OTEL_"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        // Off on the operator: no OTEL_* variable in any Job (the trace context is passed regardless).
        for e in envs(&settings(EndpointMode::Service)) {
            assert!(otel(&e).is_empty(), "{e:?}");
            assert_eq!(e["TRACEPARENT"], tp);
        }
        let mut s = settings(EndpointMode::Service);
        s.telemetry_env = caduceus_startup::otel::forwarded_env([
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
                "http://collector.obs:4317".to_string(),
            ),
            ("OTEL_SERVICE_NAME".to_string(), "caduceus-operator".to_string()),
            (
                "OTEL_TRACES_SAMPLER".to_string(),
                "parentbased_always_on".to_string(),
            ),
        ]);
        for e in envs(&s) {
            assert_eq!(
                otel(&e),
                vec![
                    (
                        "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
                        "http://collector.obs:4317".to_string()
                    ),
                    (
                        "OTEL_TRACES_SAMPLER".to_string(),
                        "parentbased_always_on".to_string()
                    ),
                ],
                "each binary names its own service"
            );
            assert_eq!(e["TRACEPARENT"], tp);
        }
    }

    #[test]
    fn aggregator_job_never_gets_the_study_key() {
        let st = study(true);
        let mut round = training_round(
            &st,
            0,
            0,
            vec!["north/st-mary".into(), "south/x".into()],
            "h",
            None,
        );
        round.metadata.uid = Some("r0".into());
        let s = settings(EndpointMode::Loopback);
        let svc_port = 31000;
        let ep = endpoint(&st, &s, Some(svc_port)).unwrap();
        let job = aggregator_job(
            &st,
            &round,
            &s,
            &ep,
            &["north-st-mary".into(), "south-x".into()],
            Some("ab"),
            None,
        );
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some(names::AGGREGATOR_SERVICE_ACCOUNT)
        );
        for v in pod.volumes.as_ref().unwrap() {
            if let Some(sec) = &v.secret {
                assert!(
                    !sec.secret_name.as_deref().unwrap_or("").contains("tfhe"),
                    "{v:?}"
                );
            }
        }
        let e = env_of(&job);
        assert!(!e.contains_key("CADUCEUS_STUDY_KEY"));
        assert_eq!(e["CADUCEUS_LISTEN"], "127.0.0.1:31000");
        assert_eq!(e["CADUCEUS_ROUNDS"], "1");
        assert_eq!(e["CADUCEUS_QUORUM_MIN"], "2");
        assert_eq!(e["CADUCEUS_KEY_FINGERPRINT"], "ab");
        assert_eq!(
            e["CADUCEUS_MODEL_STORE"],
            "/var/lib/caduceus/store/studies-gender"
        );
        assert_eq!(job.metadata.owner_references.as_ref().unwrap()[0].uid, "r0");
        let spec = job.spec.as_ref().unwrap();
        assert!(spec.active_deadline_seconds.is_some(), "a stuck aggregator ends");
        assert!(
            pod.containers[0]
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .is_some(),
            "the aggregator has resource limits"
        );
    }

    #[test]
    fn nodeport_publishes_the_public_host_and_keeps_the_service_name_for_tls() {
        let st = study(false);
        let s = settings(EndpointMode::NodePort);
        assert!(endpoint(&st, &s, None).is_none(), "no port allocated yet");
        let ep = endpoint(&st, &s, Some(31001)).unwrap();
        assert_eq!(ep.address, "coordinator.example.org:31001");
        assert_eq!(
            ep.server_name,
            names::service_dns(&st.name_any(), &st.namespace().unwrap())
        );
        assert_eq!(
            (ep.listen_host.as_str(), ep.listen_port),
            ("0.0.0.0", names::AGGREGATOR_PORT)
        );
        let svc = aggregator_service(&st, &s);
        assert_eq!(svc.spec.unwrap().type_.as_deref(), Some("NodePort"));
        let no_host = Settings {
            public_host: None,
            ..s
        };
        assert!(endpoint(&st, &no_host, Some(31001)).is_none());
    }

    #[test]
    fn loopback_needs_the_node_port() {
        let st = study(false);
        assert!(endpoint(&st, &settings(EndpointMode::Loopback), None).is_none());
        let svc = aggregator_service(&st, &settings(EndpointMode::Loopback));
        assert_eq!(svc.spec.unwrap().type_.as_deref(), Some("NodePort"));
    }
}
