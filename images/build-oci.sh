#!/usr/bin/env bash
# Builds the Caduceus images without a container daemon, from the binaries `make build` produced:
#   $IMAGES_DIR/caduceus-<x>.oci/      OCI image layout (index.json names the image ${REGISTRY}/caduceus-<x>:${TAG})
#   $IMAGES_DIR/caduceus-<x>.tar       docker-archive tarball (`docker load -i`, `ctr images import`), same image
#   $IMAGES_DIR/caduceus-<x>.cdx.json  the image's CycloneDX SBOM (also in the image at /usr/share/sbom/)
#   $IMAGES_DIR/images.json            tag, digest and paths of each image
# Usage: images/build-oci.sh [operator|trainer|aggregator ...]   (default: all three)
# Environment: IMAGES_DIR (default $CARGO_TARGET_DIR/images), PROFILE (debug, the default, or release: the
# cargo profile whose binaries are packed), BIN_DIR (default $CARGO_TARGET_DIR/$PROFILE), REGISTRY
# (ghcr.io/caduceus-dev), TAG (the workspace version), REVISION (git HEAD), SOURCE_DATE_EPOCH (HEAD's commit
# time), IMAGES_STRIP (1: strip the binaries' debug info in the image; 0 keeps it), CRANE, CARGO_CYCLONEDX.
# One layer per image, distroless-style (docs in images/README.md): the binary, the shared libraries `ldd`
# names taken from this Debian host, /etc/passwd and /etc/group with nonroot 65532, CA certificates,
# /tmp, the SBOM; no shell. Config (entrypoint, user, labels, ports) is read from images/Dockerfile's target.
# Two runs from the same commit and binaries give the same digests (images/check-oci.sh tests it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

workspace_field() {
  awk -v key="$1" '
    /^\[/ { in_pkg = ($0 == "[workspace.package]"); next }
    in_pkg && $1 == key { sub(/^[^=]*=[ \t]*"/, ""); sub(/".*$/, ""); print; exit }
  ' Cargo.toml
}

targets=()
for a in "$@"; do
  case "$a" in
    operator|trainer|aggregator) targets+=("$a") ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build-oci.sh: unknown argument '$a' (expected operator, trainer or aggregator)" >&2; exit 64 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(operator trainer aggregator)

: "${CARGO_TARGET_DIR:=$root/target}"
PROFILE="${PROFILE:-debug}"
case "$PROFILE" in debug|release) ;; *) echo "build-oci.sh: PROFILE must be debug or release" >&2; exit 64 ;; esac
BIN_DIR="${BIN_DIR:-$CARGO_TARGET_DIR/$PROFILE}"
IMAGES_DIR="${IMAGES_DIR:-$CARGO_TARGET_DIR/images}"
REGISTRY="${REGISTRY:-ghcr.io/caduceus-dev}"
VERSION="$(workspace_field version)"
TAG="${TAG:-$VERSION}"
LICENSES="$(workspace_field license)"
SOURCE="$(workspace_field repository)"
REVISION="${REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
IMAGES_STRIP="${IMAGES_STRIP:-1}"
[ "$(uname -m)" = x86_64 ] || { echo "build-oci.sh: only x86_64 hosts are supported (images are linux/amd64, libraries from the host)" >&2; exit 1; }
[ -n "$VERSION" ] || { echo "build-oci.sh: cannot read the workspace version from Cargo.toml" >&2; exit 1; }
for t in "${targets[@]}"; do
  [ -x "$BIN_DIR/caduceus-$t" ] || { echo "build-oci.sh: $BIN_DIR/caduceus-$t is missing; run \`make build\` (or PROFILE=release: cargo build --release --workspace --bins)" >&2; exit 1; }
done
CRANE="${CRANE:-$(tools/crane/build.sh)}"
CARGO_CYCLONEDX="${CARGO_CYCLONEDX:-$(tools/cargo-cyclonedx/build.sh)}"

work="$(mktemp -d "${TMPDIR:-/tmp}/caduceus-images.XXXXXX")"
reg_pid=""
cleanup() { [ -z "$reg_pid" ] || kill "$reg_pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
log="$work/crane.log"

# --- SBOMs: cargo-cyclonedx over a copy of the workspace's sources (it writes next to each Cargo.toml, and
# the working tree is not ours to litter); the copy shares Cargo.lock, so the dependency graph is the build's.
mkdir -p "$work/src"
git ls-files -z --cached --others --exclude-standard | xargs -0 -r cp --parents -t "$work/src" 2>/dev/null || true
cp Cargo.lock "$work/src/Cargo.lock"
(cd "$work/src" && SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" "$CARGO_CYCLONEDX" cyclonedx --format json --spec-version 1.5 --describe binaries --no-build-deps \
  --target x86_64-unknown-linux-gnu --quiet) >"$work/cyclonedx.log" 2>&1 \
  || { echo "build-oci.sh: cargo-cyclonedx failed:" >&2; cat "$work/cyclonedx.log" >&2; exit 1; }

# --- a registry in memory on loopback: crane assembles and configures each image there
"$CRANE" registry serve --address 127.0.0.1:0 >"$work/registry.log" 2>&1 &
reg_pid=$!
port=""
for _ in $(seq 100); do
  port="$(sed -n 's/.*serving on port \([0-9][0-9]*\).*/\1/p' "$work/registry.log")"
  [ -n "$port" ] && break
  sleep 0.05
done
[ -n "$port" ] || { echo "build-oci.sh: crane registry serve did not start:" >&2; cat "$work/registry.log" >&2; exit 1; }
local_reg="127.0.0.1:$port"

mkdir -p "$IMAGES_DIR"
csv() { local v="${1//\"/\"\"}"; printf '"%s"' "$v"; }   # a crane key=value flag, CSV-quoted (values have commas)
for t in "${targets[@]}"; do
  bin="caduceus-$t"
  image="$REGISTRY/$bin:$TAG"
  sbom_src="$(find "$work/src" -name "${bin}_bin.cdx.json" -print -quit)"
  [ -n "$sbom_src" ] || { echo "build-oci.sh: cargo-cyclonedx wrote no ${bin}_bin.cdx.json" >&2; exit 1; }
  strip_flag=(); [ "$IMAGES_STRIP" = 1 ] && strip_flag=(--strip)
  python3 images/oci.py rootfs --bin "$BIN_DIR/$bin" --name "$bin" --sbom "$sbom_src" --src-root "$work/src" --epoch "$SOURCE_DATE_EPOCH" \
    --out "$work/$bin.layer.tar" --sbom-out "$work/$bin.cdx.json" "${strip_flag[@]}"

  build_args=(VERSION="$VERSION" REVISION="$REVISION" SOURCE="$SOURCE" LICENSES="$LICENSES" BIN="$bin")
  python3 images/oci.py spec images/Dockerfile "$t" "${build_args[@]}" >"$work/$bin.spec.json"
  sbom_path="/usr/share/sbom/$bin.cdx.json"
  mapfile -t flags < <(python3 - "$work/$bin.spec.json" "$sbom_path" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
kv = lambda k, v: '"' + f"{k}={v}".replace('"', '""') + '"'
labels = dict(s["labels"], **{"dev.caduceus.image.sbom": sys.argv[2],
                              "dev.caduceus.image.sbom.format": "CycloneDX 1.5 JSON"})
out = ["--set-platform", "linux/amd64", "--user", s["user"], "--workdir", s["workdir"]]
# The environment of the Dockerfile's base, gcr.io/distroless/cc-debian12.
out += ["--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--env", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"]
for e in s["entrypoint"]:
    out += ["--entrypoint", e]
for p in s["expose"]:
    out += ["--exposed-ports", p]
for k in sorted(labels):
    out += ["--label", kv(k, labels[k])]
    if k.startswith("org.opencontainers.image.") or k.startswith("dev.caduceus."):
        out += ["--annotation", kv(k, labels[k])]
print("\n".join(out))
PY
)
  "$CRANE" append --oci-empty-base -f "$work/$bin.layer.tar" -t "$local_reg/$bin:layer" >>"$log" 2>&1 \
    || { echo "build-oci.sh: crane append failed; log:" >&2; cat "$log" >&2; exit 1; }
  "$CRANE" mutate "$local_reg/$bin:layer" "${flags[@]}" -t "$local_reg/$bin:$TAG" >>"$log" 2>&1 \
    || { echo "build-oci.sh: crane mutate failed; log:" >&2; cat "$log" >&2; exit 1; }

  rm -rf "$IMAGES_DIR/$bin.oci" "$IMAGES_DIR/$bin.oci.tmp" "$IMAGES_DIR/$bin.tar"
  "$CRANE" pull --format=oci "$local_reg/$bin:$TAG" "$IMAGES_DIR/$bin.oci.tmp" >>"$log" 2>&1 \
    || { echo "build-oci.sh: crane pull failed; log:" >&2; cat "$log" >&2; exit 1; }
  # Name the image in index.json as containerd's importer reads it (full name; the OCI ref.name is the tag).
  python3 - "$IMAGES_DIR/$bin.oci.tmp/index.json" "$image" "$TAG" <<'PY'
import json, sys
p, image, tag = sys.argv[1:]
idx = json.load(open(p))
(m,) = idx["manifests"]
m.setdefault("annotations", {}).update({"io.containerd.image.name": image, "org.opencontainers.image.ref.name": tag})
json.dump(idx, open(p, "w"), indent=2, sort_keys=True)
PY
  chmod -R a+rX "$IMAGES_DIR/$bin.oci.tmp"   # crane writes layer blobs 0600
  mv "$IMAGES_DIR/$bin.oci.tmp" "$IMAGES_DIR/$bin.oci"
  # The same image as a docker-archive tarball, RepoTags = the image's real name (no push: -o writes a file).
  "$CRANE" mutate "$local_reg/$bin:$TAG" -t "$image" -o "$IMAGES_DIR/$bin.tar" >>"$log" 2>&1 \
    || { echo "build-oci.sh: crane mutate -o failed; log:" >&2; cat "$log" >&2; exit 1; }
  cp "$work/$bin.cdx.json" "$IMAGES_DIR/$bin.cdx.json"
  digest="$("$CRANE" digest "$local_reg/$bin:$TAG")"
  libs="$(ldd "$BIN_DIR/$bin" | awk '/=>/ {print $3} /^[ \t]*\// {print $1}' | sort -u | paste -sd, -)"
  python3 - "$IMAGES_DIR/images.json" "$bin" "$image" "$digest" "$IMAGES_DIR" "$VERSION" "$SOURCE_DATE_EPOCH" "$libs" "${build_args[@]}" <<'PY'
import json, os, sys
p, bin_, image, digest, d, version, epoch, libs, *args = sys.argv[1:]
meta = json.load(open(p)) if os.path.exists(p) else {}
meta[bin_] = {"tag": image, "digest": digest, "oci_layout": f"{d}/{bin_}.oci", "docker_archive": f"{d}/{bin_}.tar",
              "sbom": f"{d}/{bin_}.cdx.json", "version": version, "source_date_epoch": int(epoch),
              "libraries": libs.split(","), "build_args": dict(a.split("=", 1) for a in args)}
json.dump(meta, open(p, "w"), indent=2, sort_keys=True)
PY
  echo "$image $digest"
  echo "  $IMAGES_DIR/$bin.oci  $IMAGES_DIR/$bin.tar  $IMAGES_DIR/$bin.cdx.json"
done
