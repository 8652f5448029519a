#!/usr/bin/env bash
# Static checks of images/Dockerfile and images/build.sh (this repository's CI has no container runtime,
# so the images are never built there). Needs bash and python3 (3.11+, standard library only).
#  - every stage's base image is pinned to a tag or digest (not :latest, no variables);
#  - every image target that build.sh builds (and the Dockerfile's last stage) derives from a distroless
#    `nonroot` image, sets USER to a numeric non-root uid, runs no RUN/SHELL, and has an exec-form
#    ENTRYPOINT on the binary it copies;
#  - the BIN values build.sh passes are `[[bin]]` names of the workspace packages of the same name;
#  - the OCI labels title, description, source, licenses and version exist (licenses = Cargo.toml's).
# Exits 1 with one line per problem.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec python3 - "$root" <<'PY'
import json, re, sys, tomllib
from pathlib import Path

root = Path(sys.argv[1])
dockerfile = root / "images" / "Dockerfile"
build_sh = root / "images" / "build.sh"
problems = []
def fail(msg): problems.append(msg)

# --- Dockerfile: logical lines (continuations joined, comments and parser directives dropped) ---------
lines, buf = [], ""
for raw in dockerfile.read_text().splitlines():
    s = raw.strip()
    if not buf and (not s or s.startswith("#")):
        continue
    if s.startswith("#"):           # a comment inside a continued instruction
        continue
    if s.endswith("\\"):
        buf += s[:-1] + " "
        continue
    lines.append(buf + s)
    buf = ""
if buf:
    lines.append(buf)

stages = []                          # {name, base, instrs:[(op, rest)]}
for line in lines:
    op, _, rest = line.partition(" ")
    op, rest = op.upper(), rest.strip()
    if op == "FROM":
        words = [w for w in rest.split() if not w.startswith("--")]
        base = words[0] if words else ""
        name = words[2].lower() if len(words) >= 3 and words[1].lower() == "as" else None
        stages.append({"name": name, "base": base, "instrs": []})
    elif stages:
        stages[-1]["instrs"].append((op, rest))
    elif op != "ARG":
        fail(f"Dockerfile: {op} before the first FROM")
if not stages:
    sys.exit("images/check.sh: no FROM in images/Dockerfile")
by_name = {s["name"]: s for s in stages if s["name"]}

def pinned(image):
    if "$" in image:
        return "uses a variable (cannot be checked statically)"
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has no tag"
    if last.rsplit(":", 1)[1] == "latest":
        return "is tagged latest"
    return None

for s in stages:
    if s["base"].lower() in by_name:
        continue
    why = pinned(s["base"])
    if why:
        fail(f"Dockerfile: stage {s['name'] or '?'} base image {s['base']!r} {why}; pin it to a tag")

def chain(stage):
    """Stages from the external base down to `stage`."""
    out, seen = [stage], set()
    while stage["base"].lower() in by_name and stage["base"].lower() not in seen:
        seen.add(stage["base"].lower())
        stage = by_name[stage["base"].lower()]
        out.append(stage)
    return list(reversed(out))

def parse_labels(rest):
    # key="value" or key=value pairs
    pairs = re.findall(r'([A-Za-z0-9._-]+)=(?:"((?:[^"\\]|\\.)*)"|(\S+))', rest)
    return {k: quoted or bare for k, quoted, bare in pairs}

def arg_defaults(stage_list):
    out = {}
    for s in stage_list:
        for op, rest in s["instrs"]:
            if op == "ARG" and "=" in rest:
                k, v = rest.split("=", 1)
                out[k.strip()] = v.strip().strip('"')
    return out

# --- Cargo: workspace license and [[bin]] names by package --------------------------------------------
ws = tomllib.loads((root / "Cargo.toml").read_text())
license_ = ws.get("workspace", {}).get("package", {}).get("license")
bins_by_pkg = {}
for member in ws.get("workspace", {}).get("members", []):
    manifest = root / member / "Cargo.toml"
    if not manifest.exists():
        fail(f"Cargo.toml: workspace member {member} has no Cargo.toml")
        continue
    t = tomllib.loads(manifest.read_text())
    pkg = t.get("package", {}).get("name", member)
    bins_by_pkg[pkg] = {b.get("name") for b in t.get("bin", [])}

# --- build.sh: the targets it builds and the BIN it gives each -----------------------------------------
sh = build_sh.read_text()
lists = [m.split() for m in re.findall(r'targets=\(([^)]*)\)', sh) if m.split()]
m_bin = re.search(r'^\s*bin="([^"$]*)\$t"', sh, re.M)
if not lists or not m_bin:
    sys.exit("images/check.sh: cannot find the default `targets=(...)` list or `bin=\"...$t\"` in images/build.sh")
targets = lists[-1]
if '--target "$t"' not in sh or '"BIN=$bin"' not in sh:
    fail('build.sh: expected `--target "$t"` and `--build-arg "BIN=$bin"` in its build command')

# --- the build stage --------------------------------------------------------------------------------------
build_stage = by_name.get("build")
if not build_stage:
    fail("Dockerfile: no stage named build")
else:
    run = " ".join(r for op, r in build_stage["instrs"] if op == "RUN")
    for needle in ("cargo build --release --locked", '-p "${CRATE}"', '--bin "${BIN}"',
                   "type=cache", "/usr/local/cargo/registry", "target=/src/target"):
        if needle not in run:
            fail(f"Dockerfile: the build stage's RUN lacks {needle!r}")
    crate_default = arg_defaults([build_stage]).get("CRATE")
    if crate_default != "${BIN}":
        fail("Dockerfile: ARG CRATE must default to ${BIN} (the checks below rely on package name = binary name)")
    bin_default = arg_defaults([build_stage]).get("BIN")
    if bin_default and bin_default not in bins_by_pkg.get(bin_default, set()):
        fail(f"Dockerfile: ARG BIN default {bin_default!r} is no [[bin]] of a workspace package of that name")

# --- the image targets ------------------------------------------------------------------------------------
required_labels = ["title", "description", "source", "licenses", "version"]
finals = [(t, f"{m_bin.group(1)}{t}") for t in targets]
last = stages[-1]
if last["name"] not in targets:
    fail(f"Dockerfile: the last stage ({last['name']}) is not one of build.sh's targets {targets}")
for target, bin_ in finals:
    if bin_ not in bins_by_pkg.get(bin_, set()):
        where = ", ".join(f"{p}: {sorted(b)}" for p, b in bins_by_pkg.items() if b) or "none"
        fail(f"build.sh: BIN={bin_} is not a [[bin]] of a workspace package named {bin_} ([[bin]]s: {where})")
    stage = by_name.get(target)
    if not stage:
        fail(f"Dockerfile: build.sh builds --target {target}, but no stage is named {target}")
        continue
    ch = chain(stage)
    base = ch[0]["base"]
    if not re.fullmatch(r"gcr\.io/distroless/[a-z0-9._/-]+:(nonroot|[a-z0-9._-]*nonroot[a-z0-9._-]*)(@sha256:[0-9a-f]{64})?", base):
        fail(f"Dockerfile: target {target} derives from {base!r}, not a distroless :nonroot image")
    instrs = [i for s in ch for i in s["instrs"]]
    users = [r for op, r in instrs if op == "USER"]
    if not users:
        fail(f"Dockerfile: target {target} sets no USER")
    else:
        mu = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
        if not mu:
            fail(f"Dockerfile: target {target} USER {users[-1]!r} is not numeric (runAsNonRoot cannot verify a name)")
        elif int(mu.group(1)) == 0 or (mu.group(2) is not None and int(mu.group(2)) == 0):
            fail(f"Dockerfile: target {target} USER {users[-1]} is root")
    for op, r in instrs:
        if op in ("RUN", "SHELL"):
            fail(f"Dockerfile: target {target} has {op} ({r[:40]}...): the final image has no shell")
    copies = [r for op, r in stage["instrs"] if op == "COPY" and "--from=build" in r]
    if not any(r.split()[-2].endswith("/" + bin_) for r in copies if len(r.split()) >= 3):
        fail(f"Dockerfile: target {target} does not COPY /out/{bin_} from the build stage")
    eps = [r for op, r in instrs if op == "ENTRYPOINT"]
    if not eps:
        fail(f"Dockerfile: target {target} has no ENTRYPOINT")
    else:
        try:
            ep = json.loads(eps[-1])
            if not ep or not ep[0].endswith("/" + bin_):
                fail(f"Dockerfile: target {target} ENTRYPOINT {ep} does not run {bin_}")
        except json.JSONDecodeError:
            fail(f"Dockerfile: target {target} ENTRYPOINT is not exec form (a JSON array); there is no shell")
    labels = {}
    for op, r in instrs:
        if op == "LABEL":
            labels.update(parse_labels(r))
    for key in required_labels:
        if f"org.opencontainers.image.{key}" not in labels:
            fail(f"Dockerfile: target {target} lacks the label org.opencontainers.image.{key}")
    title = labels.get("org.opencontainers.image.title")
    if title is not None and title != bin_:
        fail(f"Dockerfile: target {target} title label {title!r} is not {bin_!r}")
    lic = labels.get("org.opencontainers.image.licenses", "")
    lic_value = arg_defaults(ch).get(lic[2:-1], lic) if lic.startswith("${") else lic
    if license_ and lic_value != license_:
        fail(f"Dockerfile: target {target} licenses label defaults to {lic_value!r}, Cargo.toml says {license_!r}")

if problems:
    print("images/check.sh: FAILED", file=sys.stderr)
    for p in problems:
        print("  - " + p, file=sys.stderr)
    sys.exit(1)
print(f"images/check.sh: OK ({len(stages)} stages; targets {', '.join(t for t, _ in finals)}: distroless nonroot, "
      f"numeric non-root USER, pinned bases, [[bin]] names, OCI labels, licenses {license_})")
PY
