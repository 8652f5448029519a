#!/usr/bin/env python3
"""Helpers of the daemonless image build (images/build-oci.sh) and of its checks (images/check-oci.sh).
Python 3.11+ standard library only.

  oci.py spec DOCKERFILE TARGET KEY=VALUE...   the target's ENTRYPOINT, USER, WORKDIR, EXPOSE, LABELs and
                                               COPY destinations as JSON (${ARG}s substituted from the
                                               KEY=VALUEs, else from the ARG defaults)
  oci.py rootfs --bin PATH --name NAME --sbom CDX.json --src-root DIR --epoch N --out LAYER.tar
                --sbom-out MERGED.json [--strip]
                                               the image's one layer: the binary, the shared libraries `ldd`
                                               names (from this Debian host), passwd/group with nonroot
                                               65532, CA certificates, /tmp, the SBOM; reproducible
  oci.py check IMAGES_DIR TARGET...            the checks of images/check-oci.sh on built images
  oci.py sizes IMAGES_DIR TARGET...            compressed and uncompressed sizes (docs/benchmarks.md)
"""
import argparse, gzip, hashlib, io, json, os, re, subprocess, sys, tarfile, tempfile, uuid
from datetime import datetime, timezone
from pathlib import Path

NONROOT = 65532
SBOM_DIR = "usr/share/sbom"
SBOM_LABEL = "dev.caduceus.image.sbom"
SBOM_FORMAT_LABEL = "dev.caduceus.image.sbom.format"


# --- Dockerfile ------------------------------------------------------------------------------------------
def dockerfile_stages(path):
    lines, buf = [], ""
    for raw in Path(path).read_text().splitlines():
        s = raw.strip()
        if s.startswith("#") or (not buf and not s):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    if buf:
        lines.append(buf)
    stages = []
    for line in lines:
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2].lower() if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append({"name": name, "base": words[0] if words else "", "instrs": []})
        elif stages:
            stages[-1]["instrs"].append((op, rest))
    return stages


def target_spec(dockerfile, target, args):
    """What the Dockerfile's `target` stage (and the stages it derives from) sets in the image."""
    stages = dockerfile_stages(dockerfile)
    by_name = {s["name"]: s for s in stages if s["name"]}
    if target not in by_name:
        raise SystemExit(f"oci.py: the Dockerfile has no stage {target}")
    chain, s = [], by_name[target]
    while True:
        chain.insert(0, s)
        if s["base"].lower() not in by_name:
            break
        s = by_name[s["base"].lower()]
    env = {}
    spec = {"entrypoint": None, "user": None, "workdir": None, "expose": [], "labels": {}, "copies": []}
    def sub(v):
        return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), v)
    for st in chain:
        for op, rest in st["instrs"]:
            if op == "ARG":
                k, _, v = rest.partition("=")
                k = k.strip()
                env[k] = args[k] if k in args else v.strip().strip('"')
            elif op == "LABEL":
                for k, q, b in re.findall(r'([A-Za-z0-9._-]+)=(?:"((?:[^"\\]|\\.)*)"|(\S+))', rest):
                    spec["labels"][k] = sub(q or b)
            elif op == "ENTRYPOINT":
                spec["entrypoint"] = json.loads(rest)
            elif op == "USER":
                spec["user"] = sub(rest)
            elif op == "WORKDIR":
                spec["workdir"] = rest
            elif op == "EXPOSE":
                spec["expose"] += [p if "/" in p else p + "/tcp" for p in rest.split()]
            elif op == "COPY":
                spec["copies"].append(rest.split()[-1])
    spec["workdir"] = spec["workdir"] or "/"     # distroless images have no WORKDIR: the default is /
    return spec


# --- the layer ---------------------------------------------------------------------------------------------
PASSWD = """root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
"""
GROUP = """root:x:0:
nobody:x:65534:
nonroot:x:65532:
"""
NSSWITCH = """passwd: files
group: files
hosts: files dns
"""
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def ldd_paths(binary):
    out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    paths = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
            if target == "not found" or not target:
                raise SystemExit(f"oci.py: ldd {binary}: {line}")
            paths.append(target)
        elif line.startswith("/"):
            paths.append(line.split("(")[0].strip())   # the dynamic loader
    return sorted(set(paths))


def dpkg_package(path):
    for p in (path, os.path.realpath(path)):
        r = subprocess.run(["dpkg-query", "-S", p], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.split(":", 1)[0].strip()
    raise SystemExit(f"oci.py: no Debian package owns {path} (dpkg-query -S)")


def dpkg_info(pkg):
    fmt = "${Package}\t${Version}\t${Architecture}\t${source:Package}\t${source:Version}\t${Homepage}"
    out = subprocess.run(["dpkg-query", "-W", "-f", fmt, pkg], check=True, capture_output=True, text=True).stdout
    name, version, arch, src, src_version, homepage = out.split("\t")
    return {"name": name, "version": version, "arch": arch, "source": src, "source_version": src_version,
            "homepage": homepage}


class Layer:
    """A tar with sorted entries, fixed mtimes and numeric root ownership (parents added as 0755 dirs)."""
    def __init__(self, epoch):
        self.epoch, self.entries = epoch, {}

    def _dirs(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            self.entries.setdefault(d, ("dir", 0o755, 0, None))

    def file(self, path, data, mode=0o644):
        path = path.lstrip("/")
        self._dirs(path)
        self.entries[path] = ("file", mode, 0, data)

    def dir(self, path, mode=0o755, owner=0):
        path = path.lstrip("/")
        self._dirs(path)
        self.entries[path] = ("dir", mode, owner, None)

    def write(self, out):
        with open(out, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                kind, mode, owner, data = self.entries[path]
                ti = tarfile.TarInfo(path)
                ti.mtime, ti.mode, ti.uid, ti.gid = self.epoch, mode, owner, owner
                ti.uname = ti.gname = ""
                if kind == "dir":
                    ti.type = tarfile.DIRTYPE
                    tar.addfile(ti)
                else:
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))


def rootfs(a):
    binary = Path(a.bin)
    layer = Layer(a.epoch)
    data = binary.read_bytes()
    if a.strip:
        with tempfile.TemporaryDirectory() as t:
            out = Path(t) / binary.name
            subprocess.run(["objcopy", "--strip-debug", str(binary), str(out)], check=True)
            data = out.read_bytes()
    layer.file(f"usr/local/bin/{a.name}", data, 0o755)
    packages = {}
    for lib in ldd_paths(str(binary)):
        layer.file(lib, Path(lib).read_bytes(), 0o755)   # the symlink's target, under the name ldd found
        packages.setdefault(dpkg_package(lib), []).append(lib)
    ca = Path(CA_BUNDLE).read_bytes()
    layer.file(CA_BUNDLE, ca)
    packages.setdefault("ca-certificates", []).append(CA_BUNDLE)
    for pkg in packages:
        copyright_ = Path(f"/usr/share/doc/{pkg}/copyright")
        if copyright_.exists():
            layer.file(f"usr/share/doc/{pkg}/copyright", copyright_.read_bytes())
    layer.file("etc/passwd", PASSWD.encode())
    layer.file("etc/group", GROUP.encode())
    layer.file("etc/nsswitch.conf", NSSWITCH.encode())
    layer.dir("tmp", 0o1777)
    layer.dir("home/nonroot", 0o700, NONROOT)
    layer.dir("root", 0o700)

    # cargo-cyclonedx names our own packages by their path (bom-ref path+file://<dir>): the build's copy of the
    # sources is a temporary directory, named /src here (the Dockerfile's WORKDIR) so that builds agree.
    text = Path(a.sbom).read_text().replace("file://" + a.src_root.rstrip("/"), "file:///src")
    sbom = merge_sbom(json.loads(text), a.name, packages, a.epoch)
    text = (json.dumps(sbom, indent=2, sort_keys=True) + "\n").encode()
    layer.file(f"{SBOM_DIR}/{a.name}.cdx.json", text)
    Path(a.sbom_out).write_bytes(text)
    layer.write(a.out)


def merge_sbom(doc, name, packages, epoch):
    """cargo-cyclonedx's document of the binary, made reproducible, plus the Debian packages in the layer."""
    meta = doc.setdefault("metadata", {})
    meta["timestamp"] = datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    comps = doc.setdefault("components", [])
    root_ref = meta.get("component", {}).get("bom-ref")
    deb_refs = []
    for pkg in sorted(packages):
        i = dpkg_info(pkg)
        purl = (f"pkg:deb/debian/{i['name']}@{i['version']}?arch={i['arch']}&distro=debian-"
                f"{Path('/etc/debian_version').read_text().strip().split('.')[0]}")
        if i["source"] and i["source"] != i["name"]:
            purl += f"&upstream={i['source']}"
        comp = {"type": "library", "bom-ref": purl, "name": i["name"], "version": i["version"], "purl": purl,
                "supplier": {"name": "Debian"},
                "properties": [{"name": "dev.caduceus:image-path", "value": "/" + p.lstrip("/")}
                               for p in sorted(packages[pkg])]}
        if i["homepage"]:
            comp["externalReferences"] = [{"type": "website", "url": i["homepage"]}]
        comps.append(comp)
        deb_refs.append(purl)
    if root_ref:
        deps = doc.setdefault("dependencies", [])
        for d in deps:
            if d.get("ref") == root_ref:
                d["dependsOn"] = sorted(set(d.get("dependsOn", [])) | set(deb_refs))
                break
        else:
            deps.append({"ref": root_ref, "dependsOn": deb_refs})
        for r in deb_refs:
            deps.append({"ref": r, "dependsOn": []})
    doc.pop("serialNumber", None)
    body = json.dumps(doc, sort_keys=True).encode()
    doc["serialNumber"] = "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, hashlib.sha256(body).hexdigest()))
    return doc


# --- checks -------------------------------------------------------------------------------------------------
def read_layout(d):
    d = Path(d)
    blob = lambda dg: (d / "blobs" / dg.replace(":", "/")).read_bytes()
    def verified(desc):
        data = blob(desc["digest"])
        if "sha256:" + hashlib.sha256(data).hexdigest() != desc["digest"] or len(data) != desc["size"]:
            raise AssertionError(f"{d}: blob {desc['digest']} does not match its digest or size")
        return data
    if json.loads((d / "oci-layout").read_text()).get("imageLayoutVersion") != "1.0.0":
        raise AssertionError(f"{d}: oci-layout is not version 1.0.0")
    index = json.loads((d / "index.json").read_text())
    (mdesc,) = index["manifests"]
    manifest = json.loads(verified(mdesc))
    config = json.loads(verified(manifest["config"]))
    layers = [verified(l) for l in manifest["layers"]]
    return mdesc, manifest, config, layers


def check(a):
    root = Path(__file__).resolve().parent.parent
    images = Path(a.images_dir)
    meta = json.loads((images / "images.json").read_text())
    problems = []
    def expect(cond, msg):
        if not cond:
            problems.append(msg)
    for t in a.targets:
        bin_ = f"caduceus-{t}"
        before = len(problems)
        m = meta[bin_]
        want = target_spec(root / "images" / "Dockerfile", t, m["build_args"])
        mdesc, manifest, config, layers = read_layout(images / f"{bin_}.oci")
        c = config.get("config", {})
        # (a) the image config
        expect(c.get("User") == "65532:65532", f"{bin_}: User is {c.get('User')!r}, not 65532:65532")
        expect(c.get("Entrypoint") == [f"/usr/local/bin/{bin_}"], f"{bin_}: Entrypoint {c.get('Entrypoint')}")
        expect(config.get("os") == "linux" and config.get("architecture") == "amd64",
               f"{bin_}: platform {config.get('os')}/{config.get('architecture')}")
        expect("SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in (c.get("Env") or []),
               f"{bin_}: Env {c.get('Env')} lacks SSL_CERT_FILE (distroless sets it)")
        labels = c.get("Labels") or {}
        for k in ("title", "description", "version", "revision", "source", "licenses", "vendor"):
            expect(labels.get(f"org.opencontainers.image.{k}"), f"{bin_}: label org.opencontainers.image.{k} missing")
        expect(labels.get("org.opencontainers.image.title") == bin_, f"{bin_}: title label {labels.get('org.opencontainers.image.title')!r}")
        expect(labels.get("org.opencontainers.image.version") == m["version"], f"{bin_}: version label")
        sbom_path = labels.get(SBOM_LABEL)
        expect(sbom_path == f"/{SBOM_DIR}/{bin_}.cdx.json", f"{bin_}: label {SBOM_LABEL} is {sbom_path!r}")
        expect((manifest.get("annotations") or {}).get(SBOM_LABEL) == sbom_path, f"{bin_}: manifest lacks the SBOM annotation")
        expect(mdesc.get("annotations", {}).get("io.containerd.image.name") == m["tag"],
               f"{bin_}: index.json does not name the image {m['tag']}")
        # (b) the Dockerfile agrees
        expect(c.get("Entrypoint") == want["entrypoint"], f"{bin_}: Entrypoint {c.get('Entrypoint')} != Dockerfile {want['entrypoint']}")
        expect(c.get("User") == want["user"], f"{bin_}: User {c.get('User')!r} != Dockerfile {want['user']!r}")
        expect(c.get("WorkingDir", "/") in ("", want["workdir"]), f"{bin_}: WorkingDir {c.get('WorkingDir')!r}")
        expect(sorted(c.get("ExposedPorts") or {}) == sorted(want["expose"]),
               f"{bin_}: ExposedPorts {sorted(c.get('ExposedPorts') or {})} != Dockerfile EXPOSE {want['expose']}")
        for k, v in want["labels"].items():
            expect(labels.get(k) == v, f"{bin_}: label {k}={labels.get(k)!r}, the Dockerfile gives {v!r}")
        # the layer
        expect(len(layers) == 1, f"{bin_}: {len(layers)} layers, expected 1")
        tar = tarfile.open(fileobj=io.BytesIO(gzip.decompress(layers[0])))
        members = {mm.name.lstrip("./").rstrip("/"): mm for mm in tar.getmembers()}
        for dest in want["copies"]:
            expect(dest.lstrip("/") in members, f"{bin_}: the Dockerfile COPYs to {dest}; the layer lacks it")
        need = [f"usr/local/bin/{bin_}", "etc/passwd", "etc/group", "etc/ssl/certs/ca-certificates.crt",
                f"{SBOM_DIR}/{bin_}.cdx.json", "lib64/ld-linux-x86-64.so.2", "tmp"]
        need += [l.lstrip("/") for l in m["libraries"]]
        for n in need:
            expect(n in members, f"{bin_}: the layer lacks /{n}")
        for sh in ("bin/sh", "usr/bin/sh", "bin/bash", "usr/bin/bash", "bin/busybox"):
            expect(sh not in members, f"{bin_}: the layer has /{sh} (no shell expected)")
        for n, mm in members.items():
            if not n.startswith("home/nonroot"):
                expect(mm.uid == 0 and mm.gid == 0, f"{bin_}: /{n} is owned by {mm.uid}:{mm.gid}, not root")
            expect(not (mm.mode & 0o002) or n == "tmp", f"{bin_}: /{n} is world-writable")
        stale = sorted(n for n, mm in members.items() if mm.mtime != m["source_date_epoch"])
        expect(not stale, f"{bin_}: {len(stale)} entries (/{', /'.join(stale[:3])}...) have an mtime other than "
                          f"SOURCE_DATE_EPOCH {m['source_date_epoch']}")
        expect(members.get(f"usr/local/bin/{bin_}") and members[f"usr/local/bin/{bin_}"].mode & 0o111,
               f"{bin_}: the binary is not executable")
        names = [mm.name for mm in tar.getmembers()]
        expect(names == sorted(names), f"{bin_}: the layer's entries are not sorted")
        passwd = tar.extractfile("etc/passwd").read().decode()
        expect("nonroot:x:65532:65532:" in passwd, f"{bin_}: /etc/passwd lacks nonroot 65532")
        expect("nonroot:x:65532:" in tar.extractfile("etc/group").read().decode(), f"{bin_}: /etc/group lacks nonroot")
        expect(b"BEGIN CERTIFICATE" in tar.extractfile("etc/ssl/certs/ca-certificates.crt").read(), f"{bin_}: no CA certificates")
        sbom = json.loads(tar.extractfile(f"{SBOM_DIR}/{bin_}.cdx.json").read())
        expect(sbom.get("bomFormat") == "CycloneDX", f"{bin_}: the SBOM is not CycloneDX")
        purls = [x.get("purl", "") for x in sbom.get("components", [])]
        expect(any(p.startswith("pkg:cargo/") for p in purls), f"{bin_}: the SBOM has no crates")
        expect(any(p.startswith("pkg:deb/debian/libc6@") for p in purls), f"{bin_}: the SBOM lacks libc6")
        expect(sbom.get("metadata", {}).get("component", {}).get("name") == bin_,
               f"{bin_}: the SBOM describes {sbom.get('metadata', {}).get('component', {}).get('name')!r}")
        expect((images / f"{bin_}.cdx.json").read_bytes() == tar.extractfile(f"{SBOM_DIR}/{bin_}.cdx.json").read(),
               f"{bin_}: the SBOM next to the layout differs from the one in the image")
        # the docker-archive tarball holds the same image under the tag
        with tarfile.open(images / f"{bin_}.tar") as dt:
            (entry,) = json.loads(dt.extractfile("manifest.json").read())
            expect(entry["RepoTags"] == [m["tag"]], f"{bin_}.tar: RepoTags {entry['RepoTags']} != [{m['tag']}]")
            dconf = dt.extractfile(entry["Config"]).read()
            expect(json.loads(dconf) == config, f"{bin_}.tar: its config differs from the OCI layout's")
            for l, data in zip(entry["Layers"], layers):
                expect(hashlib.sha256(dt.extractfile(l).read()).digest() == hashlib.sha256(data).digest(),
                       f"{bin_}.tar: layer {l} differs from the OCI layout's")
        # (c) the binary runs with the image's own libraries only (chroot into the extracted layer)
        with tempfile.TemporaryDirectory() as tmp:
            if hasattr(tarfile, "data_filter"):      # Python 3.11.4+; Debian 12's 3.11.2 has no filters
                tar.extractall(tmp, filter="fully_trusted" if os.geteuid() == 0 else "data")
            else:
                tar.extractall(tmp)
            cmd = ["chroot", tmp, f"/usr/local/bin/{bin_}", "--help"]
            if os.geteuid() != 0:
                cmd = ["unshare", "-r"] + cmd
            r = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
            expect(r.returncode == 0 and "Usage" in r.stdout,
                   f"{bin_}: `{' '.join(cmd)}` exited {r.returncode}: {(r.stderr or r.stdout).strip()[:300]}")
        if len(problems) == before:
            print(f"  {bin_}: {m['tag']} {mdesc['digest']}: config, labels, Dockerfile agreement, layer "
                  f"({len(members)} entries), SBOM ({len(purls)} components), docker-archive, runs in a chroot")
    if problems:
        print("images/check-oci.sh: FAILED", file=sys.stderr)
        for p in problems:
            print("  - " + p, file=sys.stderr)
        sys.exit(1)


def sizes(a):
    """Each image's compressed size (manifest + config + layer blobs: what a registry stores and a node pulls),
    uncompressed size (the layer tar), the binary in it, and the docker-archive file, as a Markdown table."""
    images = Path(a.images_dir)
    print("| Image | Compressed | Uncompressed | Binary in the image | docker-archive `.tar` |")
    print("|---|---|---|---|---|")
    mib = lambda n: f"{n / 2**20:.1f} MiB"
    for t in a.targets:
        bin_ = f"caduceus-{t}"
        mdesc, manifest, config, layers = read_layout(images / f"{bin_}.oci")
        compressed = mdesc["size"] + manifest["config"]["size"] + sum(l["size"] for l in manifest["layers"])
        raw = [gzip.decompress(l) for l in layers]
        binary = tarfile.open(fileobj=io.BytesIO(raw[0])).getmember(f"usr/local/bin/{bin_}").size
        tag = json.loads((images / "images.json").read_text())[bin_]["tag"]
        print(f"| `{tag}` | {mib(compressed)} | {mib(sum(map(len, raw)))} | {mib(binary)} | "
              f"{mib((images / f'{bin_}.tar').stat().st_size)} |")


def main():
    ap = argparse.ArgumentParser()
    sp = ap.add_subparsers(dest="cmd", required=True)
    s = sp.add_parser("spec"); s.add_argument("dockerfile"); s.add_argument("target"); s.add_argument("args", nargs="*")
    r = sp.add_parser("rootfs")
    for f in ("--bin", "--name", "--sbom", "--src-root", "--out", "--sbom-out"):
        r.add_argument(f, required=True)
    r.add_argument("--epoch", type=int, required=True)
    r.add_argument("--strip", action="store_true")
    c = sp.add_parser("check"); c.add_argument("images_dir"); c.add_argument("targets", nargs="+")
    z = sp.add_parser("sizes"); z.add_argument("images_dir"); z.add_argument("targets", nargs="+")
    a = ap.parse_args()
    if a.cmd == "spec":
        print(json.dumps(target_spec(a.dockerfile, a.target, dict(x.split("=", 1) for x in a.args))))
    elif a.cmd == "rootfs":
        rootfs(a)
    elif a.cmd == "sizes":
        sizes(a)
    else:
        check(a)


if __name__ == "__main__":
    main()
