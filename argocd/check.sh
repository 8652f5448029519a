#!/usr/bin/env bash
# Tests the Argo CD health checks of the Caduceus kinds and checks that the generated argocd-cm patch
# and argo-cd Helm values match them. Needs Go >= 1.26; modules come from GOPROXY (default
# https://proxy.golang.org). Exits non-zero on any failure.
#
#   argocd/check.sh                 # from anywhere
#   (cd argocd/healthtest && go run . -write-configmap)   # after editing a health.lua
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/healthtest"

command -v go >/dev/null || { echo "argocd/check.sh: go is not installed (need Go >= 1.26)" >&2; exit 1; }
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly"

echo "== go mod download"
go mod download
go mod verify >/dev/null

echo "== gofmt / go vet"
unformatted="$(gofmt -l .)"
if [ -n "$unformatted" ]; then
    echo "argocd/check.sh: not gofmt-ed: $unformatted (run: gofmt -w argocd/healthtest)" >&2
    exit 1
fi
go vet ./...

echo "== go test (runner self-tests, sandbox, every health_test.yaml)"
go test -count=1 ./...

echo "== health_test.yaml cases and generated files"
go run . -root ../resource_customizations -out .. -check-configmap
