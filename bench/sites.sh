#!/usr/bin/env bash
# Site gateway scale figure (issue 18): the coordinator's resident memory with SITES simulated site
# agents connected (operator/examples/site_swarm.rs: each enrols with a join token and holds one mTLS
# Session with a SiteHello), against the same process with none connected (the baseline, same run), and
# the bytes a site sends to enrol and connect. Needs a running cluster (KUBECONFIG, e.g.
# `export KUBECONFIG=$(e2e/cluster.sh up)`) and `cargo build -p caduceus-operator --bins --examples`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CADUCEUS_BIN_DIR:-${CARGO_TARGET_DIR:-$here/target}/debug}
: "${KUBECONFIG:?set KUBECONFIG to the test cluster (e2e/cluster.sh up prints it)}"
K="$(dirname "$KUBECONFIG")/bin/kubectl --kubeconfig $KUBECONFIG"
SITES=${SITES:-50}
tag=g$RANDOM
work=$(mktemp -d)
trap 'kill $op 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

$K apply --server-side --force-conflicts -f "$here/crds" >/dev/null
$K create namespace "$tag-op" >/dev/null
$K create namespace caduceus-sites >/dev/null 2>&1 || true
mport=$(free_port); gport=$(free_port)
"$BIN/caduceus-operator" --role coordinator --namespace "$tag-op" --endpoint-mode loopback --leader-elect=false \
  --metrics-addr "127.0.0.1:$mport" --gateway-listen "127.0.0.1:$gport" --gateway-address "127.0.0.1:$gport" \
  --watch-namespaces caduceus-sites >"$work/operator.log" 2>&1 &
op=$!
until curl -sf "http://127.0.0.1:$mport/readyz" >/dev/null 2>&1; do sleep 0.5; done
until grep -q "site gateway listening" "$work/operator.log"; do sleep 0.2; done
sleep 5
"$BIN/examples/site_swarm" --namespace "$tag-op" --gateway "127.0.0.1:$gport" --sites "$SITES" --pid "$op" \
  | tee "$work/swarm.jsonl"
python3 - "$work/swarm.jsonl" "$SITES" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = next(r for r in rows if r["phase"] == "baseline")
conn = next(r for r in rows if r["phase"] == "connected")
print(f"bench: gateway with {conn['sites']} connected sites: RSS {conn['rss_kib']/1024:.1f} MiB vs "
      f"{base['rss_kib']/1024:.1f} MiB with none (ratio {conn['rss_kib']/base['rss_kib']:.2f}, "
      f"{(conn['rss_kib']-base['rss_kib'])/max(conn['sites'],1):.0f} KiB per site); "
      f"enrol + connect {conn['connect_seconds']} s for all; {conn['bytes_sent_per_site_to_connect']} B sent per site")
PY
n=$($K get hospitalclients -n caduceus-sites -l fl.caduceus.dev/site --no-headers | wc -l)
echo "bench: $n mirrors in caduceus-sites"
$K delete hospitalclients -n caduceus-sites --all --wait=false >/dev/null 2>&1 || true
$K delete namespace "$tag-op" --wait=false >/dev/null
