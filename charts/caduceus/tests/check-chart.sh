#!/usr/bin/env bash
# Offline checks of the Helm chart (no cluster): helm lint, helm template with the required
# (values-required.yaml) and the full-featured values, the defaults alone refused, RBAC, NetworkPolicies
# and admission policies checked rule by rule against the values (check-policies.py, also for each
# switch), the monitoring checker on the full render, the roles coordinator and site
# (values-coordinator.yaml, values-site.yaml: lint, policies, and what each must and must not render),
# and every values file under invalid/ (over values-required.yaml) rejected with a message that names
# the bad key (its `# expect:` line).
# The cluster checks (dry-run=server, a real install and a study through it) are in e2e/tests/chart.rs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
chart=$(cd "$here/.." && pwd)
repo=$(cd "$chart/../.." && pwd)
helm=${HELM:-$("$repo/tools/helm/build.sh")}
kube_version=1.33.0
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

# The chart's defaults leave the served namespaces and the API server's CIDRs empty, so every render
# starts from values-required.yaml (what an install must set).
req="$here/values-required.yaml"
full="$here/values-full.yaml"
render() { "$helm" template caduceus "$chart" -n caduceus-system --kube-version "$kube_version" "$@"; }

echo "chart: helm lint (required and full values)"
"$helm" lint --strict "$chart" --kube-version "$kube_version" -f "$req" >/dev/null
"$helm" lint --strict "$chart" --kube-version "$kube_version" -f "$full" >/dev/null

echo "chart: the defaults alone are refused with a message that names the missing values"
if out=$("$helm" template caduceus "$chart" --kube-version "$kube_version" 2>&1); then
  echo "ERROR: the chart rendered without namespaces.studies" >&2; exit 1
fi
grep -qF "namespaces.studies is empty" <<<"$out" || { echo "ERROR: unexpected failure: $out" >&2; exit 1; }

echo "chart: helm template (required and full values)"
render -f "$req" >"$work/default.yaml"
render -f "$full" >"$work/full.yaml"
# The default render holds the CRDs (kept on uninstall), the operator and its least-privilege RBAC.
for want in "kind: CustomResourceDefinition" "helm.sh/resource-policy: keep" "kind: Deployment" \
            "kind: ClusterRole" "kind: Role" "kind: NetworkPolicy" "kind: ValidatingAdmissionPolicy" \
            "readOnlyRootFilesystem: true" "runAsNonRoot: true" "fsGroup: 65532"; do
  grep -q "$want" "$work/default.yaml" || { echo "ERROR: the default render lacks '$want'" >&2; exit 1; }
done
if grep -Eq '^\s*(- )?(verbs|resources|apiGroups): \[?"?\*' "$work/default.yaml" "$work/full.yaml"; then
  echo "ERROR: a wildcard in the chart's RBAC rules" >&2; exit 1
fi
for want in "kind: ServiceMonitor" "kind: PrometheusRule" "kind: NetworkPolicy" "grafana_dashboard" \
            "kind: Role" "CADUCEUS_LEADER_ELECT" "kind: ValidatingAdmissionPolicyBinding"; do
  grep -q "$want" "$work/full.yaml" || { echo "ERROR: the full render lacks '$want'" >&2; exit 1; }
done

# Span export (tracing.*): off by default, the OTEL_* variables on the operator when an endpoint is set.
if grep -q 'OTEL_' "$work/default.yaml"; then
  echo "ERROR: the default render sets OTEL_* variables (tracing must be off by default)" >&2; exit 1
fi
for want in "OTEL_EXPORTER_OTLP_ENDPOINT" "http://otel-collector.observability:4317" "OTEL_TRACES_SAMPLER_ARG"; do
  grep -q "$want" "$work/full.yaml" || { echo "ERROR: the full render lacks '$want' (tracing.*)" >&2; exit 1; }
done

echo "chart: RBAC, NetworkPolicies and admission policies match the values (check-policies.py)"
python3 "$here/check-policies.py" "$work/default.yaml" -f "$req"
python3 "$here/check-policies.py" "$work/full.yaml" -f "$full"
# Each switch, and a release whose names differ from the chart's.
variant=0
check_variant() { # --set-json KEY=JSON...
  local sets=() checks=() a
  variant=$((variant + 1))
  for a in "$@"; do sets+=(--set-json "$a"); checks+=(--set-json "$a"); done
  render -f "$req" "${sets[@]}" >"$work/variant-$variant.yaml"
  python3 "$here/check-policies.py" "$work/variant-$variant.yaml" -f "$req" "${checks[@]}" \
    || { echo "ERROR: (values: $*)" >&2; exit 1; }
}
check_variant 'networkPolicy.enabled=false' 'networkPolicy.apiServer.cidrs=[]'
check_variant 'networkPolicy.defaultDeny=false'
check_variant 'admissionPolicy.enabled=false'
check_variant 'rbac.create=false'
check_variant 'leaderElection.enabled=false'
check_variant 'serviceAccount.name="caduceus-operator"' 'fullnameOverride="fl-operator"'
check_variant 'admissionPolicy.jobControllerUsername="system:kube-controller-manager"'
check_variant 'namespaces={"studies":["s1","s2"],"hospitals":["h1"]}'
grep -q 'CADUCEUS_WATCH_NAMESPACES' "$work/variant-1.yaml" || { echo "ERROR: no CADUCEUS_WATCH_NAMESPACES" >&2; exit 1; }
# A cluster whose discovery lacks ValidatingAdmissionPolicy (Kubernetes < 1.30) is refused clearly.
if out=$(render -f "$req" --api-versions admissionregistration.k8s.io/v1/ValidatingWebhookConfiguration 2>&1); then
  echo "ERROR: admissionPolicy.enabled rendered for a cluster without ValidatingAdmissionPolicy" >&2; exit 1
fi
grep -qF "admissionPolicy.enabled needs ValidatingAdmissionPolicy" <<<"$out" || { echo "ERROR: unexpected failure: $out" >&2; exit 1; }
render -f "$req" --api-versions admissionregistration.k8s.io/v1/ValidatingWebhookConfiguration \
  --api-versions admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy >/dev/null
render -f "$req" --api-versions admissionregistration.k8s.io/v1/ValidatingWebhookConfiguration \
  --set admissionPolicy.enabled=false >/dev/null

echo "chart: role all (the default) renders no sites-mode object or setting"
for unwanted in CADUCEUS_ROLE CADUCEUS_GATEWAY CADUCEUS_SITES_NAMESPACE CADUCEUS_HOSPITAL CADUCEUS_JOIN_SECRET \
                "name: gateway" "caduceus-gateway" "caduceus-sites" "caduceus-site-identity"; do
  for f in "$work/default.yaml" "$work/full.yaml"; do
    if grep -qF -- "$unwanted" "$f"; then echo "ERROR: role all renders '$unwanted' ($(basename "$f"))" >&2; exit 1; fi
  done
done

echo "chart: roles coordinator and site (docs/sites.md): lint, template, policies, key differences"
coord="$here/values-coordinator.yaml"
site="$here/values-site.yaml"
# Neither starts from values-required.yaml: a coordinator has no hospital namespaces, a site neither.
"$helm" lint --strict "$chart" --kube-version "$kube_version" -f "$coord" >/dev/null
"$helm" lint --strict "$chart" --kube-version "$kube_version" -f "$site" >/dev/null
render -f "$coord" >"$work/coordinator.yaml"
render -f "$site" >"$work/site.yaml"
python3 "$here/check-policies.py" "$work/coordinator.yaml" -f "$coord"
python3 "$here/check-policies.py" "$work/site.yaml" -f "$site"
# kinds FILE: "Kind namespace/name" per object; rbac FILE: "Kind namespace/name group/resource" per rule.
kinds() { python3 -c 'import sys,yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d: print(d["kind"], d["metadata"].get("namespace", "") + "/" + d["metadata"]["name"])' "$1"; }
rbac() { python3 -c 'import sys,yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] in ("Role", "ClusterRole"):
        for r in d.get("rules") or []:
            for g in r["apiGroups"]:
                for res in r["resources"]:
                    print(d["kind"], d["metadata"].get("namespace", "") + "/" + d["metadata"]["name"], (g or "core") + "/" + res)' "$1"; }
expect() { # FILE-LABEL WANT(0|1) PATTERN TEXT
  if grep -Eq -- "$3" <<<"$4"; then [[ $2 == 1 ]] || { echo "ERROR: the $1 render has '$3'" >&2; exit 1; }
  else [[ $2 == 0 ]] || { echo "ERROR: the $1 render lacks '$3'" >&2; exit 1; }; fi
}
k=$(kinds "$work/site.yaml"); r=$(rbac "$work/site.yaml")
expect site 0 '^Service ' "$k"                                   # no inbound connection at all
expect site 0 '^ClusterRole' "$k"
expect site 0 'federatedstudies|trainingrounds' "$r"            # no studies, no rounds
expect site 0 'core/services' "$r"
expect site 1 '^Role hospital-st-mary/caduceus-hospital fl.caduceus.dev/hospitalclients$' "$r"
expect site 1 '^CustomResourceDefinition /hospitalclients.fl.caduceus.dev$' "$k"
expect site 0 '^CustomResourceDefinition /(federatedstudies|trainingrounds)' "$k"
expect site 0 'containerPort: 7443' "$(cat "$work/site.yaml")"
expect site 1 'name: CADUCEUS_HOSPITAL' "$(cat "$work/site.yaml")"
k=$(kinds "$work/coordinator.yaml"); r=$(rbac "$work/coordinator.yaml")
expect coordinator 1 '^Service caduceus-system/caduceus-gateway$' "$k"
expect coordinator 1 '^Service caduceus-system/caduceus-metrics$' "$k"
expect coordinator 1 'type: LoadBalancer' "$(cat "$work/coordinator.yaml")"
expect coordinator 1 '^Role caduceus-sites/caduceus-sites fl.caduceus.dev/hospitalclients$' "$r"
expect coordinator 0 '^ClusterRole .* fl.caduceus.dev/hospitalclients' "$r"   # the mirrors' namespace only
expect coordinator 0 'caduceus-hospital' "$k"                                     # no trainers, no hospital namespaces
expect coordinator 1 '^Role caduceus-studies/caduceus-study batch/jobs$' "$r"
expect coordinator 1 'value: "fl.example.org:7443"' "$(cat "$work/coordinator.yaml")"
# Each switch again, per role.
check_role_variant() { # VALUES-FILE --set-json KEY=JSON...
  local file=$1 sets=() a; shift
  variant=$((variant + 1))
  for a in "$@"; do sets+=(--set-json "$a"); done
  render -f "$file" "${sets[@]}" >"$work/variant-$variant.yaml"
  python3 "$here/check-policies.py" "$work/variant-$variant.yaml" -f "$file" "${sets[@]}" \
    || { echo "ERROR: (values: $(basename "$file") $*)" >&2; exit 1; }
}
check_role_variant "$coord" 'gateway.service={"type":"NodePort","nodePort":30443}' 'gateway.serverNames=[]'
grep -q 'nodePort: 30443' "$work/variant-$variant.yaml" || { echo "ERROR: gateway.service.nodePort not rendered" >&2; exit 1; }
check_role_variant "$coord" 'workloads.endpointMode="nodeport"' 'workloads.publicHost="fl.example.org"'
grep -A1 'name: CADUCEUS_PUBLIC_HOST' "$work/variant-$variant.yaml" | grep -q '"fl.example.org"' \
  || { echo "ERROR: workloads.publicHost not passed as CADUCEUS_PUBLIC_HOST" >&2; exit 1; }
check_role_variant "$coord" 'networkPolicy.sitesFrom=[{"ipBlock":{"cidr":"198.51.100.0/24"}}]' 'metrics.service.enabled=false'
check_role_variant "$coord" 'networkPolicy.enabled=false' 'admissionPolicy.enabled=false' 'rbac.create=false'
check_role_variant "$coord" 'namespaces={"studies":["s1","s2"],"sites":"fl-sites"}' 'fullnameOverride="fl-operator"'
check_role_variant "$site" 'leaderElection.enabled=false' 'site.joinSecret="join-bundle"'
check_role_variant "$site" 'networkPolicy.coordinator.aggregatorPorts=[{"port":31051}]' 'networkPolicy.defaultDeny=false'
check_role_variant "$site" 'networkPolicy.enabled=false' 'networkPolicy.coordinator.cidrs=[]' 'admissionPolicy.enabled=false'
check_role_variant "$site" 'rbac.create=false' 'serviceAccount.name="caduceus-site"'

echo "chart: alerts and dashboard refer only to metrics the operator exports"
"$here/check-monitoring.sh" "$work/full.yaml"

echo "chart: values that violate the schema or the chart's rules are rejected"
for bad in "$here"/invalid/*.yaml; do
  expect=$(sed -n 's/^# expect: //p' "$bad" | head -n1)
  if out=$("$helm" template caduceus "$chart" --kube-version "$kube_version" -f "$req" -f "$bad" 2>&1); then
    echo "ERROR: $(basename "$bad") was accepted" >&2; exit 1
  fi
  grep -qF -- "$expect" <<<"$out" || {
    echo "ERROR: rejecting $(basename "$bad") did not name '$expect':" >&2; echo "$out" >&2; exit 1; }
done
echo "chart: all offline checks passed"
