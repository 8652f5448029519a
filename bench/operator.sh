#!/usr/bin/env bash
# Operator scale benchmark on the local control plane: RSS and reconcile throughput with H hospitals
# (HospitalClients with bound data claims) and S studies, and the time from a study's creation to its
# first round's Jobs. Needs a running cluster (KUBECONFIG, e.g. `export KUBECONFIG=$(e2e/cluster.sh up)`)
# and the workspace binaries. Env: HOSPITALS (200), STUDIES (20), SETTLE (60 s of steady state measured).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CADUCEUS_BIN_DIR:-${CARGO_TARGET_DIR:-$here/target}/debug}
: "${KUBECONFIG:?set KUBECONFIG to the test cluster (e2e/cluster.sh up prints it)}"
K="$(dirname "$KUBECONFIG")/bin/kubectl --kubeconfig $KUBECONFIG"
H=${HOSPITALS:-200}; S=${STUDIES:-20}; SETTLE=${SETTLE:-60}
NS_PER=10
tag=b$RANDOM
work=$(mktemp -d)
trap 'kill $op 2>/dev/null || true; rm -rf "$work"' EXIT

$K apply --server-side --force-conflicts -f "$here/crds" >/dev/null
$K create namespace "$tag-op" >/dev/null
$K create namespace "$tag-studies" >/dev/null
nns=$(( (H + NS_PER - 1) / NS_PER ))
{
for ((n = 0; n < nns; n++)); do
  printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: %s-h%d}\n---\n' "$tag" "$n"
done
} | $K apply -f - >/dev/null
{
for ((i = 0; i < H; i++)); do
  n=$((i / NS_PER))
  consents=""
  for ((s = 0; s < S; s++)); do consents+="$tag-studies/s$s, "; done
  cat <<Y
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: faces-$i, namespace: $tag-h$n}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
---
apiVersion: fl.caduceus.dev/v1alpha1
kind: HospitalClient
metadata: {name: h$i, namespace: $tag-h$n, labels: {caduceus.dev/network: $tag}}
spec:
  data: {claimName: faces-$i}
  privacyBudget: {epsilon: 10}
  consentedStudies: [${consents%, }]
---
Y
done
} | $K apply -f - >/dev/null
echo "bench: $H hospitals in $nns namespaces"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN/caduceus-operator" --namespace "$tag-op" --endpoint-mode loopback --leader-elect=false \
  --metrics-addr "127.0.0.1:$port" >"$work/operator.log" 2>&1 &
op=$!
metric() { curl -sf "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 ~ "^"m {s += $2} END {print s+0}'; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$op/status"; }
hwm() { awk '/VmHWM/ {print $2}' "/proc/$op/status"; }
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do sleep 0.5; done

# S studies, each without its model-store claim: they stay in ModelStoreMissing (re-checked every 30 s)
# while every hospital is reconciled; no Jobs.
{
for ((s = 0; s < S; s++)); do
  cat <<Y
apiVersion: fl.caduceus.dev/v1alpha1
kind: FederatedStudy
metadata: {name: s$s, namespace: $tag-studies}
spec:
  model: {architecture: small-cnn}
  task: {label: gender, sensitiveAttributes: [race]}
  rounds: {total: 3, minHospitals: 2, maxHospitals: 10}
  training: {steps: 3}
  privacy: {noiseMultiplier: 1.0, sampleRate: 0.01}
  hospitalSelector: {matchLabels: {caduceus.dev/network: $tag}}
  modelStore: {claimName: models-s$s}
---
Y
done
} | $K apply -f - >/dev/null
t0=$(date +%s.%N)
until [[ $($K get hospitalclients -A -l caduceus.dev/network=$tag -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True) -ge $H ]]; do sleep 1; done
t1=$(date +%s.%N)
echo "bench: all $H hospitals Ready after $(awk -v a=$t0 -v b=$t1 'BEGIN{printf "%.1f", b-a}') s"
r0=$(metric caduceus_reconciliations_total); s0=$(date +%s.%N)
sleep "$SETTLE"
r1=$(metric caduceus_reconciliations_total); s1=$(date +%s.%N)
echo "bench: steady state: $(awk -v a=$r0 -v b=$r1 -v x=$s0 -v y=$s1 'BEGIN{printf "%.1f", (b-a)/(y-x)}') reconciliations/s over ${SETTLE}s"
echo "bench: operator RSS $(( $(rss) / 1024 )) MiB now, peak $(( $(hwm) / 1024 )) MiB (goal <= 64 MiB)"

# Burst: every hospital's status touched at once (a label change each) and timed until reconciled.
r0=$(metric caduceus_reconciliations_total); b0=$(date +%s.%N)
$K label hospitalclients -A -l caduceus.dev/network=$tag bench-touch=1 --overwrite >/dev/null
until (( $(metric caduceus_reconciliations_total | cut -d. -f1) >= ${r0%.*} + H )); do sleep 0.2; done
b1=$(date +%s.%N)
echo "bench: burst of $H hospital changes reconciled in $(awk -v a=$b0 -v b=$b1 'BEGIN{printf "%.2f", b-a}') s ($(awk -v a=$b0 -v b=$b1 -v h=$H 'BEGIN{printf "%.0f", h/(b-a)}') reconciliations/s)"

# Time from a study's creation to its first round's Jobs: give study s0 its model store.
printf 'apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: models-s0, namespace: %s-studies}\nspec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n' "$tag" | $K apply -f - >/dev/null
$K delete federatedstudy -n "$tag-studies" s0 --wait=true >/dev/null
c0=$(date +%s.%N)
cat <<Y | $K apply -f - >/dev/null
apiVersion: fl.caduceus.dev/v1alpha1
kind: FederatedStudy
metadata: {name: s0, namespace: $tag-studies}
spec:
  model: {architecture: small-cnn}
  task: {label: gender, sensitiveAttributes: [race]}
  rounds: {total: 3, minHospitals: 2, maxHospitals: 10}
  training: {steps: 3}
  privacy: {noiseMultiplier: 1.0, sampleRate: 0.01}
  hospitalSelector: {matchLabels: {caduceus.dev/network: $tag}}
  modelStore: {claimName: models-s0}
Y
until [[ $($K get jobs -A -l fl.caduceus.dev/study=s0,fl.caduceus.dev/study-namespace=$tag-studies --no-headers 2>/dev/null | wc -l) -ge 11 ]]; do sleep 0.1; done
c1=$(date +%s.%N)
echo "bench: study created -> its first round's 11 Jobs (1 aggregator + 10 trainers) exist: $(awk -v a=$c0 -v b=$c1 'BEGIN{printf "%.2f", b-a}') s"
echo "bench: operator RSS $(( $(rss) / 1024 )) MiB, peak $(( $(hwm) / 1024 )) MiB"
$K delete namespace "$tag-studies" "$tag-op" --wait=false >/dev/null
for ((n = 0; n < nns; n++)); do $K delete namespace "$tag-h$n" --wait=false >/dev/null; done
