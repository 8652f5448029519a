#!/usr/bin/env bash
# Builds the Helm CLI from its Go module (pinned in tools/helm/go.mod) and caches it outside the
# repository, keyed by version. Prints the path of the binary. Only the first build on a machine pays.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(awk '$1=="require" && $2=="helm.sh/helm/v3" {print $3}' "$here/go.mod")
[[ -n $version ]] || { echo "ERROR: cannot read the pinned Helm version from $here/go.mod" >&2; exit 1; }
cache=${CADUCEUS_CACHE:-$HOME/.cache/caduceus}
out="$cache/helm-$version"
if [[ -x "$out/helm" ]]; then echo "$out/helm"; exit 0; fi

mkdir -p "$out.tmp"
log="$out.build.log"
echo "building helm $version into $out (log: $log); a cold build on 2 cores takes a few minutes" >&2
(cd "$here" && go mod download) >"$log" 2>&1 || {
  echo "ERROR: cannot download Go modules for helm.sh/helm/v3 $version. Is the Go module proxy reachable? GOPROXY=$(go env GOPROXY); see $log" >&2
  exit 3
}
(cd "$here" && CGO_ENABLED=0 go build -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version" \
  -o "$out.tmp/helm" helm.sh/helm/v3/cmd/helm) >>"$log" 2>&1 \
  || { echo "ERROR: building helm failed; see $log" >&2; tail -20 "$log" >&2; exit 1; }
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out/helm"
