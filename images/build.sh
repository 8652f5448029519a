#!/usr/bin/env bash
# Builds the Caduceus images from images/Dockerfile:
#   ${REGISTRY}/caduceus-{operator,trainer,aggregator}:${TAG}
# REGISTRY defaults to ghcr.io/caduceus-dev (the Helm chart's default repositories), TAG to the workspace
# version in Cargo.toml. Usage: images/build.sh [--push] [operator|trainer|aggregator ...]
# Needs Docker with BuildKit (buildx if present, else DOCKER_BUILDKIT=1 docker build).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# `key = "value"` from the [workspace.package] table of the root Cargo.toml.
workspace_field() {
  awk -v key="$1" '
    /^\[/ { in_pkg = ($0 == "[workspace.package]"); next }
    in_pkg && $1 == key { sub(/^[^=]*=[ \t]*"/, ""); sub(/".*$/, ""); print; exit }
  ' Cargo.toml
}

REGISTRY="${REGISTRY:-ghcr.io/caduceus-dev}"
VERSION="$(workspace_field version)"
TAG="${TAG:-$VERSION}"
LICENSES="$(workspace_field license)"
SOURCE="$(workspace_field repository)"
REVISION="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"

push=0
targets=()
for a in "$@"; do
  case "$a" in
    --push) push=1 ;;
    operator|trainer|aggregator) targets+=("$a") ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument '$a' (expected --push, operator, trainer or aggregator)" >&2; exit 64 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(operator trainer aggregator)

# A docker client without a reachable daemon cannot build either (this repository's CI machine has a
# client and no daemon).
if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
  if command -v docker >/dev/null 2>&1; then why="the docker client cannot reach a daemon"; else why="'docker' is not on PATH"; fi
  echo "build.sh: this machine has no container runtime ($why), so no image can be built here." >&2
  echo "build.sh: run it on a machine with Docker and BuildKit, or check the Dockerfile statically with images/check.sh." >&2
  exit 2
fi
if [ -z "$VERSION" ] || [ -z "$TAG" ]; then
  echo "build.sh: could not read the workspace version from $root/Cargo.toml; set TAG" >&2
  exit 1
fi

use_buildx=0
if docker buildx version >/dev/null 2>&1; then use_buildx=1; fi

for t in "${targets[@]}"; do
  bin="caduceus-$t"
  image="$REGISTRY/$bin:$TAG"
  args=(-f images/Dockerfile --target "$t"
        --build-arg "BIN=$bin" --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION"
        --build-arg "SOURCE=$SOURCE" --build-arg "LICENSES=$LICENSES"
        -t "$image")
  echo "== $image (target $t, BIN=$bin)"
  if [ "$use_buildx" = 1 ]; then
    if [ "$push" = 1 ]; then args+=(--push); else args+=(--load); fi
    docker buildx build "${args[@]}" .
  else
    DOCKER_BUILDKIT=1 docker build "${args[@]}" .
    if [ "$push" = 1 ]; then docker push "$image"; fi
  fi
done
