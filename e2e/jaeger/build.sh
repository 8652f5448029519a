#!/usr/bin/env bash
# Builds Jaeger all-in-one (the `jaeger` binary of github.com/jaegertracing/jaeger, pinned in go.mod next
# to this script) from its Go module and caches it outside the repository, keyed by version. Prints the
# path of the binary. Only the first build on a machine pays for it. Used by the OpenTelemetry e2e test
# (e2e/tests/tracing.rs): the binary receives OTLP (gRPC 4317, HTTP 4318) and serves the query API (16686).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(awk '($1=="require" && $2=="github.com/jaegertracing/jaeger") {print $3} ($1=="github.com/jaegertracing/jaeger" && $2 ~ /^v/) {print $2}' "$here/go.mod" | head -n1)
[[ -n $version ]] || { echo "ERROR: cannot read the pinned Jaeger version from $here/go.mod" >&2; exit 1; }
cache=${CADUCEUS_CACHE:-$HOME/.cache/caduceus}
out="$cache/jaeger-$version"
if [[ -x "$out/jaeger" ]]; then echo "$out/jaeger"; exit 0; fi

mkdir -p "$out.tmp"
log="$out.build.log"
echo "building jaeger $version into $out (log: $log); a cold build on 2 cores takes several minutes" >&2
(cd "$here" && go mod download) >"$log" 2>&1 || {
  echo "ERROR: cannot download Go modules for github.com/jaegertracing/jaeger $version. Is the Go module proxy" >&2
  echo "reachable? GOPROXY=$(go env GOPROXY). The tracing e2e test cannot run without Jaeger; see $log." >&2
  exit 3
}
(cd "$here" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.tmp/jaeger" \
  github.com/jaegertracing/jaeger/cmd/jaeger) >>"$log" 2>&1 \
  || { echo "ERROR: building jaeger failed; see $log" >&2; tail -20 "$log" >&2; exit 1; }
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out/jaeger"
