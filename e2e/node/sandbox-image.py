#!/usr/bin/env python3
"""Writes the real node's sandbox ("pause") image as an OCI image-layout tarball for `ctr images import`.

    sandbox-image.py PAUSE_BINARY IMAGE_REF OUT.tar

One layer holding /pause (root-owned, mode 0755, mtime 0), run as 65535:65535 like the upstream pause
image. The node cannot reach registry.k8s.io, so containerd is pointed at this image instead. Output is
reproducible: the same binary gives the same digest.
"""
import hashlib
import io
import json
import sys
import tarfile


def blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def layer(binary: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("pause")
        info.size, info.mode, info.mtime, info.uid, info.gid = len(binary), 0o755, 0, 0, 0
        t.addfile(info, io.BytesIO(binary))
    return buf.getvalue()


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    binary_path, ref, out = sys.argv[1:]
    with open(binary_path, "rb") as f:
        binary = f.read()
    layer_digest, layer_bytes = blob(layer(binary))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535", "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    config_digest, config_bytes = blob(json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer_bytes)}],
    }
    manifest_digest, manifest_bytes = blob(json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": len(manifest_bytes),
            "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1]},
        }],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
    }
    for digest, data in ((layer_digest, layer_bytes), (config_digest, config_bytes), (manifest_digest, manifest_bytes)):
        files["blobs/sha256/" + digest.split(":", 1)[1]] = data
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            t.addfile(info, io.BytesIO(files[name]))
    print(manifest_digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
