#!/usr/bin/env bash
# Builds crane (github.com/google/go-containerregistry/cmd/crane, pinned in tools/crane/go.mod) and caches
# it outside the repository, keyed by version. Prints the path of the binary. `make images` uses it to
# assemble OCI layouts and docker-archive tarballs without a container daemon. Only the first build pays.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
module=github.com/google/go-containerregistry
version=$(awk -v m="$module" '$1=="require" && $2==m {print $3}' "$here/go.mod")
[[ -n $version ]] || { echo "ERROR: cannot read the pinned crane version from $here/go.mod" >&2; exit 1; }
cache=${CADUCEUS_CACHE:-$HOME/.cache/caduceus}
out="$cache/crane-$version"
if [[ -x "$out/crane" ]]; then echo "$out/crane"; exit 0; fi

mkdir -p "$cache"
tmp=$(mktemp -d "$out.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log="$out.build.log"
echo "building crane $version into $out (log: $log); a cold build on 2 cores takes about a minute" >&2
(cd "$here" && go mod download) >"$log" 2>&1 || {
  echo "ERROR: cannot download Go modules for $module $version. Is the Go module proxy reachable? GOPROXY=$(go env GOPROXY); see $log" >&2
  exit 3
}
(cd "$here" && CGO_ENABLED=0 go build -trimpath \
  -ldflags "-s -w -X $module/cmd/crane/cmd.Version=$version" \
  -o "$tmp/crane" "$module/cmd/crane") >>"$log" 2>&1 \
  || { echo "ERROR: building crane failed; see $log" >&2; tail -20 "$log" >&2; exit 1; }
rm -rf "$out" && mv "$tmp" "$out"
trap - EXIT
echo "$out/crane"
