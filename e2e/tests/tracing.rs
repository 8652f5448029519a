//! OpenTelemetry, exported for real: one round is one trace in Jaeger.
//!
//! Jaeger (all-in-one, built from its Go module by `e2e/jaeger/build.sh`) runs as a local process with
//! in-memory storage. The operator runs with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at it and passes
//! its OTEL_* settings on to the Jobs; a one-round study of two hospitals (DP-SGD and TFHE, the small
//! CNN) runs to completion. Then Jaeger's query API must hold, under the round's trace id (derived from
//! the round's uid), spans of all three services: the operator's reconcile of the round, the
//! aggregator's aggregation, and each trainer's local training, encryption and upload, carrying the
//! study, round and hospital attributes.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, types};
use caduceus_crds::{FederatedStudy, TrainingRound};
use common::{
    Killed, TestNamespace, apply, bin_dir, client, consent, free_port, get_json, hospital, install_crds,
    kubeconfig, make_shards, start_jaeger, study_yaml, unique, wait_for,
};
use kube::Api;
use serde_json::Value;

/// One span of a Jaeger trace: its service, operation and tags (values as text).
#[derive(Debug)]
struct Span {
    service: String,
    operation: String,
    tags: Vec<(String, String)>,
}

impl Span {
    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn tag_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The spans of trace `trace_id` as Jaeger's query API (`/api/traces/<id>`) returns them.
fn trace_spans(port: u16, trace_id: &str) -> Vec<Span> {
    let Some(v) = get_json(port, &format!("/api/traces/{trace_id}")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in v["data"].as_array().into_iter().flatten() {
        assert_eq!(
            t["traceID"].as_str(),
            Some(trace_id),
            "Jaeger answered another trace: {t}"
        );
        for s in t["spans"].as_array().into_iter().flatten() {
            let pid = s["processID"].as_str().unwrap_or_default();
            out.push(Span {
                service: t["processes"][pid]["serviceName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                operation: s["operationName"].as_str().unwrap_or_default().to_string(),
                tags: s["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|kv| {
                        (
                            kv["key"].as_str().unwrap_or_default().to_string(),
                            tag_text(&kv["value"]),
                        )
                    })
                    .collect(),
            });
        }
    }
    out
}

#[tokio::test]
async fn one_round_is_one_trace_in_jaeger() {
    let client = client().await;
    let work = tempfile::tempdir().unwrap();

    // Jaeger, every port on loopback and free (e2e/jaeger/config.yaml).
    let (otlp, query) = (free_port(), free_port());
    let _jaeger = start_jaeger(
        &format!("127.0.0.1:{otlp}"),
        query,
        Some(&work.path().join("jaeger.log")),
    )
    .await;

    make_shards(work.path(), 2);
    install_crds();
    let op_ns = TestNamespace::create(&client, "e2e-otel-op").await;
    let sns = TestNamespace::create(&client, "e2e-otel-s").await;
    let h = [
        TestNamespace::create(&client, "e2e-otel-h0").await,
        TestNamespace::create(&client, "e2e-otel-h1").await,
    ];
    let network = unique("otel");
    let study = "traced";
    let consents = vec![format!("{}/{study}", sns.name)];
    for (i, hns) in h.iter().enumerate() {
        let shard = work.path().join(format!("split/hospital-{i}"));
        hospital(
            &client,
            &hns.name,
            &format!("hospital-{i}"),
            Some(&shard),
            20.0,
            &consents,
            &network,
            "/shard",
        )
        .await;
    }

    // The operator as the other tests start it, with tracing on the standard way.
    let op_log = work.path().join("operator.log");
    let log = std::fs::File::create(&op_log).unwrap();
    let _operator = Killed(
        Command::new(bin_dir().join("caduceus-operator"))
            .env("KUBECONFIG", kubeconfig())
            .env("RUST_LOG", "info,kube=warn")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp}"))
            .env("OTEL_BSP_SCHEDULE_DELAY", "500")
            .args([
                "--namespace",
                &op_ns.name,
                "--endpoint-mode",
                "loopback",
                "--leader-elect=false",
            ])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args([
                "--watch-namespaces",
                &format!("{},{},{}", sns.name, h[0].name, h[1].name),
            ])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting caduceus-operator"),
    );

    apply(&study_yaml(&sns.name, study, &network, 1, 2, 300));
    consent(
        &client,
        &sns.name,
        study,
        &[(&h[0].name, "hospital-0"), (&h[1].name, "hospital-1")],
    )
    .await;
    let studies: Api<FederatedStudy> = Api::namespaced(client.clone(), &sns.name);
    let (reason, msg) = wait_for("the study to finish", Duration::from_secs(600), || async {
        let c = studies
            .get_opt(study)
            .await
            .ok()??
            .status?
            .conditions
            .condition(types::READY)?
            .clone();
        ["Completed", "RoundFailed", "Invalid", "PrivacyBudgetExhausted"]
            .contains(&c.reason.as_str())
            .then_some((c.reason, c.message))
    })
    .await;
    let op_tail = || {
        let text = std::fs::read_to_string(&op_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    assert_eq!(reason, "Completed", "{msg}\noperator log (tail):\n{}", op_tail());

    // The round's trace id, as the operator derives it from the round's uid.
    let round: TrainingRound = Api::namespaced(client.clone(), &sns.name)
        .get(&format!("{study}-r0"))
        .await
        .expect("the study's round 0");
    let trace_id = caduceus_operator::round::traceparent(&round, "operator")[3..35].to_string();
    let study_id = caduceus_operator::names::study_id(&sns.name, study);
    let hospitals: BTreeSet<String> = h
        .iter()
        .enumerate()
        .map(|(i, hns)| caduceus_operator::names::hospital_id(&hns.name, &format!("hospital-{i}")))
        .collect();

    // Spans reach Jaeger in batches (the trainers' at their exit, the aggregator's after its linger).
    let complete = |spans: &[Span]| {
        let of = |service: &str, operation: &str| {
            spans
                .iter()
                .filter(|s| s.service == service && s.operation == operation)
                .filter(|s| s.tag("caduceus.study") == Some(&study_id) && s.tag("caduceus.round").is_some())
                .collect::<Vec<_>>()
        };
        let trainer_hospitals: BTreeSet<String> = of("caduceus-trainer", "trainer round")
            .iter()
            .filter(|s| s.tag("caduceus.round") == Some("0"))
            .filter_map(|s| s.tag("caduceus.hospital").map(str::to_string))
            .collect();
        let per_hospital = |op: &str| {
            spans
                .iter()
                .filter(|s| s.service == "caduceus-trainer" && s.operation == op)
                .count()
                >= hospitals.len()
        };
        !of("caduceus-operator", "reconcile round").is_empty()
            && of("caduceus-aggregator", "aggregate round")
                .iter()
                .any(|s| s.tag("caduceus.round") == Some("0"))
            && trainer_hospitals == hospitals
            && ["local training", "encryption", "upload"]
                .iter()
                .all(|op| per_hospital(op))
    };
    let spans = wait_for(
        "one trace with the operator's, the aggregator's and both trainers' spans",
        Duration::from_secs(60),
        || async {
            let spans = trace_spans(query, &trace_id);
            complete(&spans).then_some(spans)
        },
    )
    .await
    .into_iter()
    .map(|s| (s.service, s.operation))
    .collect::<BTreeSet<_>>();
    eprintln!("trace {trace_id}: {spans:?}");
    // The query by service finds the same trace.
    let by_service = get_json(query, "/api/traces?service=caduceus-aggregator&limit=20").unwrap();
    assert!(
        by_service["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|t| t["traceID"].as_str() == Some(&trace_id))),
        "the aggregator's traces do not include {trace_id}: {by_service}"
    );
}
