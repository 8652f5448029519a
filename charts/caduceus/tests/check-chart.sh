#!/usr/bin/env bash
# Offline checks of the Helm chart (no cluster): helm lint, helm template with the default and the
# full-featured values, the monitoring checker on the full render, and every values file under
# invalid/ rejected with a message that names the bad key (the `# expect:` line of the file).
# The cluster checks (dry-run=server, a real install and a study through it) are in e2e/tests/chart.rs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
chart=$(cd "$here/.." && pwd)
repo=$(cd "$chart/../.." && pwd)
helm=${HELM:-$("$repo/tools/helm/build.sh")}
kube_version=1.33.0
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

echo "chart: helm lint (default and full values)"
"$helm" lint --strict "$chart" --kube-version "$kube_version" >/dev/null
"$helm" lint --strict "$chart" --kube-version "$kube_version" -f "$here/values-full.yaml" >/dev/null

echo "chart: helm template (default and full values)"
"$helm" template caduceus "$chart" -n caduceus-system --kube-version "$kube_version" >"$work/default.yaml"
"$helm" template caduceus "$chart" -n caduceus-system --kube-version "$kube_version" \
  -f "$here/values-full.yaml" >"$work/full.yaml"
# The default render holds the CRDs (kept on uninstall), the operator and its least-privilege RBAC.
for want in "kind: CustomResourceDefinition" "helm.sh/resource-policy: keep" "kind: Deployment" \
            "kind: ClusterRole" "readOnlyRootFilesystem: true" "runAsNonRoot: true"; do
  grep -q "$want" "$work/default.yaml" || { echo "ERROR: the default render lacks '$want'" >&2; exit 1; }
done
if grep -Eq '^\s*(- )?(verbs|resources|apiGroups): \[?"?\*' "$work/default.yaml"; then
  echo "ERROR: a wildcard in the chart's RBAC rules" >&2; exit 1
fi
for want in "kind: ServiceMonitor" "kind: PrometheusRule" "kind: NetworkPolicy" "grafana_dashboard" \
            "kind: Role" "CADUCEUS_LEADER_ELECT" ; do
  grep -q "$want" "$work/full.yaml" || { echo "ERROR: the full render lacks '$want'" >&2; exit 1; }
done

echo "chart: alerts and dashboard refer only to metrics the operator exports"
"$here/check-monitoring.sh" "$work/full.yaml"

echo "chart: values that violate the schema are rejected"
for bad in "$here"/invalid/*.yaml; do
  expect=$(sed -n 's/^# expect: //p' "$bad" | head -n1)
  if out=$("$helm" template caduceus "$chart" --kube-version "$kube_version" -f "$bad" 2>&1); then
    echo "ERROR: $(basename "$bad") was accepted" >&2; exit 1
  fi
  grep -qF -- "$expect" <<<"$out" || {
    echo "ERROR: rejecting $(basename "$bad") did not name '$expect':" >&2; echo "$out" >&2; exit 1; }
done
echo "chart: all offline checks passed"
