#!/usr/bin/env bash
# Checks the Terraform code under terraform/ offline, with OpenTofu and providers built from Go modules
# (tools/tofu/build.sh; the first run on a machine builds them, later runs reuse the cache):
#   tofu fmt -check; tofu init -backend=false + tofu validate for the module and each example;
#   tofu test for the module (mocked providers: variable validation must reject bad inputs).
# Works on a copy of terraform/ in a temporary directory, so it leaves nothing in the repository and
# ignores any .terraform directory, state or lock file (for registry-built providers) of a manual run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

fail() { echo "ERROR: terraform/check.sh: $*" >&2; exit 1; }

built=$(tools/tofu/build.sh) || fail "building OpenTofu and the providers failed (tools/tofu/build.sh, above)"
tofu_dir=$(sed -n 1p <<<"$built")
plugin_dir=$(sed -n 2p <<<"$built")
tofu="$tofu_dir/tofu"
[[ -x $tofu && -d $plugin_dir ]] || fail "tools/tofu/build.sh printed no usable tofu/plugin directory: $built"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/caduceus-tofu-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
tar -C "$root" --exclude=.terraform --exclude=.terraform.lock.hcl --exclude='*.tfstate' --exclude='*.tfstate.*' \
  -cf - terraform | tar -C "$tmp" -xf - || fail "cannot copy terraform/ to $tmp"

# No user or machine CLI configuration, no registry, no telemetry.
export TF_CLI_CONFIG_FILE="$tmp/tofurc"
: >"$TF_CLI_CONFIG_FILE"
export TF_IN_AUTOMATION=1 TF_INPUT=0 CHECKPOINT_DISABLE=1
unset TF_PLUGIN_CACHE_DIR TF_WORKSPACE

echo "== $("$tofu" version | head -n1); plugins from $plugin_dir"

echo "== tofu fmt -check -recursive terraform/"
(cd "$tmp" && "$tofu" fmt -check -recursive -diff terraform/) || fail "terraform/ is not formatted; run: $tofu fmt -recursive terraform/"

# init DIR: tofu init with the local plugin directory only (no network), in the copy.
init() {
  export TF_DATA_DIR="$tmp/data/${1//\//_}"
  "$tofu" -chdir="$tmp/$1" init -backend=false -input=false -no-color -plugin-dir="$plugin_dir" >"$TF_DATA_DIR.init.log" 2>&1 \
    || { cat "$TF_DATA_DIR.init.log" >&2; fail "tofu init failed in $1"; }
}
mkdir -p "$tmp/data"

for dir in terraform/modules/caduceus terraform/examples/*/; do
  dir=${dir%/}
  echo "== $dir: tofu init -backend=false (offline) && tofu validate"
  init "$dir"
  "$tofu" -chdir="$tmp/$dir" validate -no-color || fail "tofu validate failed in $dir"
done

for dir in terraform/modules/*/; do
  dir=${dir%/}
  compgen -G "$dir/tests/*.tftest.hcl" >/dev/null || continue
  echo "== $dir: tofu test (mocked providers)"
  init "$dir"
  "$tofu" -chdir="$tmp/$dir" test -no-color || fail "tofu test failed in $dir"
done

echo "== terraform/check.sh: all checks passed"
