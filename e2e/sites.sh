#!/usr/bin/env bash
# Three local control planes side by side for sites mode (docs/sites.md): a coordinator and two hospital
# clusters, each a separate e2e/cluster.sh state dir with its own etcd, API server and localnode.
# tests/sites.rs starts and stops its own; this script is for a look by hand and for cleaning up.
#
#   e2e/sites.sh up       start the three (in parallel), install the CRDs; print each kubeconfig
#   e2e/sites.sh down     stop the three (no stray processes)
#   e2e/sites.sh status   e2e/cluster.sh status of each
#
# State dirs: ${CADUCEUS_SITES_DIR:-/tmp/sites-e2e/<uid>}/{coordinator,site-a,site-b}. LOCALNODE_BIN and
# CADUCEUS_BIN_DIR are passed on to cluster.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
BASE=${CADUCEUS_SITES_DIR:-/tmp/sites-e2e/$(id -u)}
CLUSTERS=(coordinator site-a site-b)

up() {
  local c pids=() rc=0
  mkdir -p "$BASE"
  for c in "${CLUSTERS[@]}"; do
    CADUCEUS_CLUSTER_DIR=$BASE/$c "$here/cluster.sh" up >"$BASE/$c.up.log" 2>&1 &
    pids+=($!)
    sleep 0.7 # cluster.sh picks free ports at random: fewer races
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "sites: ${CLUSTERS[$i]} failed to start:" >&2; tail -20 "$BASE/${CLUSTERS[$i]}.up.log" >&2; rc=1; }
  done
  ((rc == 0)) || { down; exit 1; }
  for c in "${CLUSTERS[@]}"; do
    "$BASE/$c/bin/kubectl" --kubeconfig "$BASE/$c/kubeconfig" apply --server-side --force-conflicts \
      -f "$repo/crds" >/dev/null
    "$BASE/$c/bin/kubectl" --kubeconfig "$BASE/$c/kubeconfig" wait --for condition=Established \
      --timeout=60s crd/federatedstudies.fl.caduceus.dev crd/hospitalclients.fl.caduceus.dev \
      crd/trainingrounds.fl.caduceus.dev >/dev/null
    echo "$c: KUBECONFIG=$BASE/$c/kubeconfig"
  done
}

down() {
  local c
  for c in "${CLUSTERS[@]}"; do
    [[ -d $BASE/$c ]] && CADUCEUS_CLUSTER_DIR=$BASE/$c "$here/cluster.sh" down || true
  done
}

status() {
  local c rc=0
  for c in "${CLUSTERS[@]}"; do
    echo "== $c"
    CADUCEUS_CLUSTER_DIR=$BASE/$c "$here/cluster.sh" status || rc=1
  done
  return $rc
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
