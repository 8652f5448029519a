#!/usr/bin/env bash
# Builds the daemonless images (images/build-oci.sh) twice from the same binaries and checks them:
#  (a) each image's config: user 65532:65532, the entrypoint, linux/amd64, the OCI labels, the SBOM label and
#      annotation; its one layer: the binary, the libraries `ldd` names, the dynamic loader, /etc/passwd and
#      /etc/group with nonroot, CA certificates, /tmp, the SBOM (CycloneDX with the crates and the Debian
#      packages), no shell, root-owned, nothing world-writable but /tmp, mtimes = SOURCE_DATE_EPOCH, sorted;
#      the docker-archive tarball holds the same config and layer under RepoTags = the image's name;
#  (b) images/Dockerfile's target and the image agree: ENTRYPOINT, USER, EXPOSE, WORKDIR, LABELs (values)
#      and COPY destinations (present in the layer);
#  (c) the binary runs (`--help`) chrooted into the extracted layer, so with the image's libraries only;
#  (d) the second build gives the same manifest digests and byte-identical tarballs and SBOMs.
# Leaves the first build in IMAGES_DIR (default $CARGO_TARGET_DIR/images), like `make images`.
# Needs the binaries of `make build` (PROFILE=release: of the release profile), python3 and root or
# `unshare -r` for the chroot. Exits 1 naming each problem.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
: "${CARGO_TARGET_DIR:=$root/target}"
PROFILE="${PROFILE:-debug}"
src_bins="${BIN_DIR:-$CARGO_TARGET_DIR/$PROFILE}"
export IMAGES_DIR="${IMAGES_DIR:-$CARGO_TARGET_DIR/images}"
targets=(operator trainer aggregator)

tmp="$(mktemp -d "${TMPDIR:-/tmp}/caduceus-images-check.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# Both builds pack the same files even if cargo relinks the shared target directory meanwhile (hard links
# keep the old inodes), and carry the same revision and epoch even if HEAD moves.
mkdir -p "$tmp/bin"
for t in "${targets[@]}"; do
  f="$src_bins/caduceus-$t"
  [ -x "$f" ] || { echo "images/check-oci.sh: $f is missing; run \`make build\`" >&2; exit 1; }
  ln "$f" "$tmp/bin/" 2>/dev/null || cp "$f" "$tmp/bin/"
done
export BIN_DIR="$tmp/bin"
export REVISION="${REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
export CRANE="${CRANE:-$(tools/crane/build.sh)}"
export CARGO_CYCLONEDX="${CARGO_CYCLONEDX:-$(tools/cargo-cyclonedx/build.sh)}"

start=$SECONDS
images/build-oci.sh "${targets[@]}" >"$tmp/build1.log"
IMAGES_DIR="$tmp/again" images/build-oci.sh "${targets[@]}" >"$tmp/build2.log"
echo "images/check-oci.sh: built the three images twice in $((SECONDS - start)) s"

rc=0
python3 images/oci.py check "$IMAGES_DIR" "${targets[@]}" || rc=1

# (d) reproducible
python3 - "$IMAGES_DIR" "$tmp/again" "${targets[@]}" <<'PY'
import hashlib, json, sys
from pathlib import Path
a, b, *targets = sys.argv[1:]
ma, mb = (json.loads((Path(d) / "images.json").read_text()) for d in (a, b))
bad = []
for t in targets:
    n = f"caduceus-{t}"
    if ma[n]["digest"] != mb[n]["digest"]:
        bad.append(f"{n}: two builds gave {ma[n]['digest']} and {mb[n]['digest']}")
    for suffix in (".tar", ".cdx.json", ".oci/index.json"):
        ha, hb = (hashlib.sha256((Path(d) / (n + suffix)).read_bytes()).hexdigest() for d in (a, b))
        if ha != hb:
            bad.append(f"{n}{suffix}: the two builds differ")
if bad:
    print("images/check-oci.sh: FAILED (not reproducible)", file=sys.stderr)
    for x in bad:
        print("  - " + x, file=sys.stderr)
    sys.exit(1)
print("images/check-oci.sh: reproducible: two builds, same digests: "
      + ", ".join(f"{ma[f'caduceus-{t}']['tag']}@{ma[f'caduceus-{t}']['digest'][:19]}" for t in targets))
PY
[ "$rc" = 0 ] || exit 1
echo "images/check-oci.sh: images in $IMAGES_DIR"
