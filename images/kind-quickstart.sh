#!/usr/bin/env bash
# Caduceus on a local kind cluster, for machines WITH Docker, kind, kubectl and helm:
#   1. creates the kind cluster $CLUSTER (default caduceus) unless it exists,
#   2. builds the three images (images/build.sh) and loads them into the cluster (`kind load docker-image`),
#   3. applies examples/00-namespaces.yaml and installs the chart charts/caduceus as release `caduceus` in
#      caduceus-system, serving those namespaces (the API server's endpoints read from the cluster),
#   4. applies the PVCs the examples name, the hospitals
#      (examples/hospital-st-mary.yaml, examples/hospital-minimal.yaml) and the study
#      (examples/study-gender-fedavg.yaml).
# Hospitals' data: each hospital's PVC must hold its shard before any round can run. Give the shards with
#   ST_MARY_DATA=DIR RIVERSIDE_DATA=DIR images/kind-quickstart.sh
# (each DIR: a hospital directory of `caduceus data split`, i.e. train/ and val/ manifests, with the
# images the manifests' image_root points at; see images/README.md). Without them the script still sets
# everything up, but the PVCs stay unbound and empty, the hospitals stay NotReady and no round starts.
# Re-running is safe (everything is create-or-update).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

CLUSTER="${CLUSTER:-caduceus}"
export REGISTRY="${REGISTRY:-ghcr.io/caduceus-dev}"
version="$(awk '/^\[/ { p = ($0 == "[workspace.package]"); next } p && $1 == "version" { gsub(/"/, "", $3); print $3; exit }' Cargo.toml)"
export TAG="${TAG:-$version}"
ST_MARY_DATA="${ST_MARY_DATA:-}"
RIVERSIDE_DATA="${RIVERSIDE_DATA:-}"
# Where the operator mounts a hospital's claim in trainer pods (operator/src/build.rs, DATA_DIR).
TRAINER_DATA_MOUNT=/var/lib/caduceus/data
LOADER_IMAGE="${LOADER_IMAGE:-busybox:1.37}"
CLAIM_SIZE="${CLAIM_SIZE:-2Gi}"

say() { printf '\n== %s\n' "$*"; }
die() { echo "kind-quickstart: $*" >&2; exit 1; }

missing=()
for tool in docker kind kubectl helm; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "kind-quickstart: missing ${missing[*]}; this script needs Docker, kind, kubectl and helm." >&2
  exit 2
fi
if ! docker info >/dev/null 2>&1; then
  echo "kind-quickstart: this machine has no container runtime (the docker client cannot reach a daemon)." >&2
  exit 2
fi
[ -f charts/caduceus/Chart.yaml ] || die "charts/caduceus is missing in $root"
# A hospital directory must hold train/ and val/ manifests whose image_root the trainer can resolve:
# relative (to the manifest's directory) and inside the copied directory, or absolute under the mount.
check_data() {
  local d="$1" part root
  for part in train val; do
    [ -f "$d/$part/manifest.json" ] \
      || die "$d/$part/manifest.json is missing ($d must be a hospital directory of 'caduceus data split')"
    root="$(sed -n 's/.*"image_root"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$d/$part/manifest.json" | head -1)"
    case "$root" in
      "") die "$d/$part/manifest.json has no image_root" ;;
      "$TRAINER_DATA_MOUNT"/*) ;;
      /*) die "$d/$part/manifest.json: image_root $root is a path on this machine; trainer pods mount the
claim at $TRAINER_DATA_MOUNT. Put the images inside $d and make image_root relative (e.g. ../images)" ;;
      *) [ -d "$d/$part/$root" ] || die "$d/$part/manifest.json: image_root $root is not a directory"
         case "$(cd "$d/$part/$root" && pwd -P)/" in
           "$(cd "$d" && pwd -P)"/*) ;;
           *) die "$d/$part/manifest.json: image_root $root lies outside $d, so it would not be copied" ;;
         esac ;;
    esac
  done
}
for d in "$ST_MARY_DATA" "$RIVERSIDE_DATA"; do
  if [ -n "$d" ]; then check_data "$d"; fi
done

say "kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "exists; reusing it"
else
  kind create cluster --name "$CLUSTER" --wait 120s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

say "images $REGISTRY/caduceus-{operator,trainer,aggregator}:$TAG"
images/build.sh
for c in operator trainer aggregator; do
  kind load docker-image --name "$CLUSTER" "$REGISTRY/caduceus-$c:$TAG"
done

# The chart puts its Roles and policies into the namespaces it serves, so they come first.
say "namespaces"
kubectl apply -f examples/00-namespaces.yaml

# The operator's NetworkPolicy lets it reach only the API server's endpoints.
api_cidrs=$(kubectl get endpointslices -n default -l kubernetes.io/service-name=kubernetes \
  -o jsonpath='{range .items[*].endpoints[*]}{.addresses[0]}{"\n"}{end}' |
  awk 'NF { printf "%s%s/%s", sep, $1, (index($1, ":") ? 128 : 32); sep = "," }')
[ -n "$api_cidrs" ] || die "cannot read the API server's endpoints (endpointslices in namespace default)"

say "helm install caduceus charts/caduceus"
helm upgrade --install caduceus charts/caduceus -n caduceus-system --create-namespace --wait --timeout 5m \
  --set image.repository="$REGISTRY/caduceus-operator" --set image.tag="$TAG" \
  --set workloads.trainer.image.repository="$REGISTRY/caduceus-trainer" --set workloads.trainer.image.tag="$TAG" \
  --set workloads.aggregator.image.repository="$REGISTRY/caduceus-aggregator" --set workloads.aggregator.image.tag="$TAG" \
  --set 'namespaces.studies={caduceus-studies}' --set 'namespaces.hospitals={hospital-st-mary,hospital-riverside}' \
  --set "networkPolicy.apiServer.cidrs={$api_cidrs}"
kubectl wait --for condition=Established --timeout 60s \
  crd/federatedstudies.fl.caduceus.dev crd/hospitalclients.fl.caduceus.dev crd/trainingrounds.fl.caduceus.dev

say "claims and node label"
# The claims the examples name: St Mary's data (faces), Riverside's data (images), the study's model store.
# kind's default StorageClass binds a claim when the first pod uses it.
for claim in caduceus-studies/gender-fedavg-models hospital-st-mary/faces hospital-riverside/images; do
  kubectl apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: ${claim#*/}
  namespace: ${claim%%/*}
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: $CLAIM_SIZE
YAML
done
# examples/hospital-st-mary.yaml schedules its trainers with nodeSelector caduceus.dev/pool=training.
kubectl label nodes --all caduceus.dev/pool=training --overwrite

# Copies directory $3 into claim $1/$2 at path $4 with a short-lived pod (which also binds the claim).
load_data() {
  local ns="$1" claim="$2" src="$3" dest="$4" pod="caduceus-data-loader"
  say "copying $src into $ns/$claim:$dest"
  kubectl -n "$ns" delete pod "$pod" --ignore-not-found --wait
  kubectl -n "$ns" apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $pod
spec:
  restartPolicy: Never
  securityContext: {runAsUser: 65532, runAsGroup: 65532, fsGroup: 65532}
  containers:
    - name: loader
      image: $LOADER_IMAGE
      command: [sleep, "3600"]
      volumeMounts: [{name: data, mountPath: /data}]
  volumes:
    - name: data
      persistentVolumeClaim: {claimName: $claim}
YAML
  kubectl -n "$ns" wait --for condition=Ready --timeout 180s "pod/$pod"
  tar -C "$src" -cf - . | kubectl -n "$ns" exec -i "$pod" -- sh -c "mkdir -p '/data$dest' && tar -C '/data$dest' -xf -"
  kubectl -n "$ns" delete pod "$pod" --wait
}
if [ -n "$ST_MARY_DATA" ]; then load_data hospital-st-mary faces "$ST_MARY_DATA" /utkface/shard-0; fi
if [ -n "$RIVERSIDE_DATA" ]; then load_data hospital-riverside images "$RIVERSIDE_DATA" ""; fi

say "hospitals and study"
kubectl apply -f examples/hospital-st-mary.yaml -f examples/hospital-minimal.yaml
kubectl apply -f examples/study-gender-fedavg.yaml
kubectl get studies,hospitals -A

echo
if [ -z "$ST_MARY_DATA" ] || [ -z "$RIVERSIDE_DATA" ]; then
  cat <<MSG
NOTE: no data was loaded for $( [ -z "$ST_MARY_DATA" ] && printf 'St Mary ' )$( [ -z "$RIVERSIDE_DATA" ] && printf 'Riverside' ).
A hospital stays NotReady while its PVC is unbound, so study gender-fedavg (minHospitals 2) starts no
round. Re-run with ST_MARY_DATA=DIR RIVERSIDE_DATA=DIR (hospital directories of 'caduceus data split'
whose manifests' image_root resolves inside the trainer pod, under $TRAINER_DATA_MOUNT; see images/README.md).
MSG
fi
cat <<MSG
Next step:
  kubectl get rounds -A -w
The trainer of St Mary requests 2 CPUs and 4Gi of memory: the kind node (your Docker VM) must have them.
Remove everything with: kind delete cluster --name $CLUSTER
MSG
