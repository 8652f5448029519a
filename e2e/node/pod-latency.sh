#!/usr/bin/env bash
# Pod start latency of the cluster's node: N pods, one after another, each running the aggregator image's
# `--help` (it exits at once); prints, per pod, the seconds from `kubectl create` until the pod has
# Succeeded, and the median. docs/benchmarks.md compares NODE=real with localnode this way.
#   KUBECONFIG=... e2e/node/pod-latency.sh [N]   (default 10)
set -euo pipefail
n=${1:-10}
kubectl=${KUBECTL:-$(dirname "$KUBECONFIG")/bin/kubectl}
ns=pod-latency-$$
"$kubectl" create namespace "$ns" >/dev/null
trap '"$kubectl" delete namespace "$ns" --wait=false >/dev/null 2>&1 || true' EXIT
# The default ServiceAccount must exist before a pod may be created.
for _ in $(seq 100); do "$kubectl" -n "$ns" get serviceaccount default >/dev/null 2>&1 && break; sleep 0.1; done
times=()
for i in $(seq "$n"); do
  t0=$(date +%s.%N)
  "$kubectl" -n "$ns" create -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: p$i}
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: a
    image: ghcr.io/caduceus-dev/caduceus-aggregator:0.1.0
    imagePullPolicy: IfNotPresent
    args: ["--help"]
    securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
YAML
  until [[ $("$kubectl" -n "$ns" get pod "p$i" -o 'jsonpath={.status.phase}') == Succeeded ]]; do
    [[ $("$kubectl" -n "$ns" get pod "p$i" -o 'jsonpath={.status.phase}') == Failed ]] && { echo "pod p$i failed" >&2; exit 1; }
    sleep 0.05
  done
  times+=("$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')")
done
echo "pod create -> Succeeded (s): ${times[*]}"
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END{printf "median %.2f s over %d pods\n", (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2), NR}'
