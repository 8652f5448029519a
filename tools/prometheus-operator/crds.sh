#!/usr/bin/env bash
# Prints the directory that holds the real prometheus-operator CRDs (ServiceMonitor, PrometheusRule, ...),
# taken from the Go module github.com/prometheus-operator/prometheus-operator (its example/ folder) through
# the Go module proxy, checked against go.sum's hash database like any module, and cached by version in the
# Go module cache. The chart tests install them so that `kubectl apply --dry-run=server` validates the
# chart's ServiceMonitor and PrometheusRule against their real schemas.
set -euo pipefail
version=v0.85.0
module=github.com/prometheus-operator/prometheus-operator
dir=$(cd "${TMPDIR:-/tmp}" && GOFLAGS=-mod=mod go mod download -json "$module@$version" 2>/dev/null \
  | python3 -c 'import json,sys; print(json.load(sys.stdin).get("Dir",""))') || true
crds="$dir/example/prometheus-operator-crd"
if [[ -z $dir || ! -f $crds/monitoring.coreos.com_servicemonitors.yaml ]]; then
  echo "ERROR: cannot download $module@$version from the Go module proxy (GOPROXY=$(go env GOPROXY))" >&2
  exit 3
fi
echo "$crds"
