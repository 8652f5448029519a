#!/usr/bin/env bash
# Builds OpenTofu (the MPL-2.0, Linux Foundation fork of Terraform) and the helm and kubernetes providers
# from Go modules, and caches them outside the repository, keyed by version. Nothing comes from a Terraform
# registry: only the Go module proxy is used, so `tofu init -plugin-dir` works without network.
# Prints two lines: the directory that holds `tofu`, then the plugin directory (for `tofu init -plugin-dir`),
# laid out as <plugin-dir>/registry.opentofu.org/hashicorp/<name>/<version>/<os>_<arch>/terraform-provider-<name>_v<version>.
# Only the first build on a machine pays for it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
modver() { awk -v m="$1" '($1=="require" && $2==m) {print $3} ($1==m && $2 ~ /^v/) {print $2}' "$2" | head -n1; }
TOFU_VERSION=$(modver github.com/opentofu/opentofu "$here/go.mod")
HELM_VERSION=$(modver github.com/hashicorp/terraform-provider-helm "$here/providers/helm/go.mod")
K8S_VERSION=$(modver github.com/hashicorp/terraform-provider-kubernetes "$here/providers/kubernetes/go.mod")
[[ -n $TOFU_VERSION && -n $HELM_VERSION && -n $K8S_VERSION ]] \
  || { echo "ERROR: cannot read the pinned versions from $here/go.mod and $here/providers/*/go.mod" >&2; exit 1; }
cache=${CADUCEUS_CACHE:-$HOME/.cache/caduceus}
tofu_dir="$cache/tofu-$TOFU_VERSION"
plugin_dir="$cache/tofu-plugins"
platform="$(go env GOOS)_$(go env GOARCH)"

fail_proxy() { # $1: what, $2: module@version, $3: log
  echo "ERROR: cannot download the Go modules of $1 ($2). Is the Go module proxy reachable?" >&2
  echo "GOPROXY=$(go env GOPROXY). terraform/check.sh cannot run without it; see $3." >&2
  exit 3
}

# build NAME MODULE_DIR PACKAGE OUTPUT LDFLAGS VERSION
build() {
  local name=$1 dir=$2 pkg=$3 out=$4 ldflags=$5 version=$6
  [[ -x $out ]] && return 0
  mkdir -p "$cache/tofu-logs" "$(dirname "$out")"
  local log="$cache/tofu-logs/$name-$version.build.log" tmp="$cache/tofu-logs/$name-$version.$$"
  echo "building $name $version into $out; log: $log" >&2
  local start=$SECONDS
  (cd "$dir" && go mod download) >"$log" 2>&1 || fail_proxy "$name" "${pkg%%/cmd/*}@$version" "$log"
  (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp" "$pkg") >>"$log" 2>&1 \
    || { echo "ERROR: building $name $version failed; see $log" >&2; tail -20 "$log" >&2; rm -f "$tmp"; exit 1; }
  mv "$tmp" "$out"
  echo "built $name $version in $((SECONDS - start)) s" >&2
}

need=0
for f in "$tofu_dir/tofu" \
  "$plugin_dir/registry.opentofu.org/hashicorp/helm/${HELM_VERSION#v}/$platform/terraform-provider-helm_$HELM_VERSION" \
  "$plugin_dir/registry.opentofu.org/hashicorp/kubernetes/${K8S_VERSION#v}/$platform/terraform-provider-kubernetes_$K8S_VERSION"; do
  [[ -x $f ]] || need=1
done
(( need )) && echo "a cold build of OpenTofu and two providers on 2 cores takes about 15 minutes" >&2

build OpenTofu "$here" github.com/opentofu/opentofu/cmd/tofu "$tofu_dir/tofu" \
  "-s -w -X github.com/opentofu/opentofu/version.dev=no" "$TOFU_VERSION"
build terraform-provider-helm "$here/providers/helm" github.com/hashicorp/terraform-provider-helm \
  "$plugin_dir/registry.opentofu.org/hashicorp/helm/${HELM_VERSION#v}/$platform/terraform-provider-helm_$HELM_VERSION" \
  "-s -w" "$HELM_VERSION"
build terraform-provider-kubernetes "$here/providers/kubernetes" github.com/hashicorp/terraform-provider-kubernetes \
  "$plugin_dir/registry.opentofu.org/hashicorp/kubernetes/${K8S_VERSION#v}/$platform/terraform-provider-kubernetes_$K8S_VERSION" \
  "-s -w" "$K8S_VERSION"

echo "$tofu_dir"
echo "$plugin_dir"
