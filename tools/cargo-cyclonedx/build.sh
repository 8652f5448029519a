#!/usr/bin/env bash
# Installs cargo-cyclonedx (CycloneDX SBOMs of the Rust dependency graph, from crates.io, --locked) once and
# caches it outside the repository, keyed by version. Prints the path of the binary. `make images` uses it
# for each image's SBOM. Only the first install on a machine pays (about two minutes on 2 cores).
set -euo pipefail
version=0.5.9
cache=${CADUCEUS_CACHE:-$HOME/.cache/caduceus}
out="$cache/cargo-cyclonedx-$version"
if [[ -x "$out/bin/cargo-cyclonedx" ]]; then echo "$out/bin/cargo-cyclonedx"; exit 0; fi

mkdir -p "$cache"
log="$out.build.log"
tmp=$(mktemp -d "$out.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "installing cargo-cyclonedx $version into $out (log: $log)" >&2
# Its own target directory: the workspace's shared CARGO_TARGET_DIR stays untouched (and unlocked).
CARGO_TARGET_DIR="$tmp/target" cargo install --quiet --locked --version "$version" --root "$tmp/root" \
  cargo-cyclonedx >"$log" 2>&1 || {
  echo "ERROR: cargo install cargo-cyclonedx $version failed (is crates.io reachable?); see $log" >&2
  tail -20 "$log" >&2; exit 1
}
rm -rf "$out" && mv "$tmp/root" "$out"
echo "$out/bin/cargo-cyclonedx"
