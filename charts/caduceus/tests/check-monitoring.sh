#!/usr/bin/env bash
# Checks the chart's monitoring manifests against the metrics the operator registers.
#
#   helm template t charts/caduceus \
#     --set metrics.serviceMonitor.enabled=true,prometheusRule.enabled=true,dashboard.enabled=true \
#     | charts/caduceus/tests/check-monitoring.sh
#   charts/caduceus/tests/check-monitoring.sh rendered.yaml        # or a file
#   charts/caduceus/tests/check-monitoring.sh charts/caduceus/dashboards/caduceus.json   # a dashboard alone
#
# Verifies that
#   - every metric named in the PrometheusRule's expressions, the dashboard's panel targets and its
#     template variables is one that operator/src/telemetry.rs registers (`Opts::new("x"` /
#     `HistogramOpts::new("x"` under the registry's `caduceus` prefix; histograms also give _bucket,
#     _sum and _count; `up` is allowed), and every function called is a PromQL function;
#   - the expressions have balanced (), {} and [];
#   - every alert has a severity label and summary, description and runbook_url annotations;
#   - the dashboard JSON parses, has schemaVersion >= 36, a `datasource` variable of type prometheus,
#     and unique panel ids;
#   - the ServiceMonitor scrapes port `metrics` on /metrics, and CaduceusOperatorDown's job is the
#     metrics Service's name (when the Service is rendered too).
# Exits 1 naming each offending alert or panel.
#
# Options: --telemetry FILE (default: operator/src/telemetry.rs of this repository);
#          --allow-metric NAME (repeatable): accept NAME although the operator does not register it
#          yet (reported as a warning).
# Needs only bash and python3 (standard library; PyYAML is used when present).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
telemetry="$here/../../../operator/src/telemetry.rs"
allow=()
inputs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --telemetry) telemetry="$2"; shift 2 ;;
    --allow-metric) allow+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -) inputs+=("-"); shift ;;
    -*) echo "check-monitoring: unknown option $1" >&2; exit 2 ;;
    *) inputs+=("$1"); shift ;;
  esac
done
[ ${#inputs[@]} -gt 0 ] || inputs=("-")
[ -f "$telemetry" ] || { echo "check-monitoring: $telemetry not found (use --telemetry)" >&2; exit 2; }

export CM_TELEMETRY="$telemetry"
export CM_ALLOW="${allow[*]-}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
n=0
for f in "${inputs[@]}"; do
  n=$((n + 1))
  if [ "$f" = "-" ]; then cat > "$tmp/$n.in"; echo "stdin" > "$tmp/$n.name"; else cp -- "$f" "$tmp/$n.in"; printf '%s\n' "$f" > "$tmp/$n.name"; fi
  case "$f" in *.json) mv "$tmp/$n.in" "$tmp/$n.json" ;; *) mv "$tmp/$n.in" "$tmp/$n.yaml" ;; esac
done

python3 - "$tmp" <<'PY'
import difflib, json, os, re, sys

errors, warnings = [], []
def err(msg): errors.append(msg)
def warn(msg): warnings.append(msg)

# ---------------------------------------------------------------- registered metrics
src = open(os.environ["CM_TELEMETRY"], encoding="utf-8").read()
m = re.search(r'Registry::new_custom\(\s*Some\(\s*"([^"]+)"', src)
prefix = (m.group(1) + "_") if m else "caduceus_"
known = {"up"}
var_of = {}
for m in re.finditer(r'let\s+(\w+)\s*=\s*\w+::new\(\s*(Histogram)?Opts::new\(\s*"([A-Za-z_:][A-Za-z0-9_:]*)"', src):
    var_of[m.group(3)] = m.group(1)
registered_vars = set(re.findall(r'register\(\s*Box::new\(\s*(\w+)\.clone\(\)', src))
defined = 0
for m in re.finditer(r'\b(Histogram)?Opts::new\(\s*"([A-Za-z_:][A-Za-z0-9_:]*)"', src):
    hist, name = m.group(1), m.group(2)
    defined += 1
    v = var_of.get(name)
    if v is not None and registered_vars and v not in registered_vars:
        warn(f"telemetry.rs defines {prefix}{name} but does not register `{v}`; treated as unknown")
        continue
    full = prefix + name
    known.add(full)
    if hist:
        known.update({full + "_bucket", full + "_sum", full + "_count"})
if defined == 0:
    print(f"check-monitoring: no Opts::new(\"...\") found in {os.environ['CM_TELEMETRY']}", file=sys.stderr)
    sys.exit(2)
# Label names: the operator's (the `&["namespace", "study"]` list after each Opts) and a scrape's.
TARGET_LABELS = {"instance", "job", "pod", "namespace", "service", "endpoint", "container", "__name__"}
label_names = set(TARGET_LABELS)
labels_of = {}
for m in re.finditer(r'\b(Histogram)?Opts::new\(\s*"([A-Za-z_:][A-Za-z0-9_:]*)".*?&\[([^\]]*)\]', src, re.S):
    labs = set(re.findall(r'"(\w+)"', m.group(3)))
    label_names.update(labs)
    full = prefix + m.group(2)
    for suffix in (("", "_bucket", "_sum", "_count") if m.group(1) else ("",)):
        labels_of[full + suffix] = labs | ({"le"} if suffix == "_bucket" else set())
allowed = set(os.environ.get("CM_ALLOW", "").split())
for a in sorted(allowed - known):
    warn(f"{a} is accepted by --allow-metric but the operator does not register it yet")

# ---------------------------------------------------------------- a small YAML reader
def _scalar(s):
    s = s.strip()
    if s == "" or s in ("~", "null"):
        return None
    if s[0] == '"':
        return json.loads(s)
    if s[0] == "'":
        return s[1:-1].replace("''", "'")
    if s[0] in "[{":
        v, rest = _flow(s, 0)
        if re.sub(r"\s+#.*$", "", s[rest:]).strip():
            raise ValueError(f"text after a flow collection: {s!r}")
        return v
    s = re.sub(r"\s+#.*$", "", s)
    if s in ("true", "True"):
        return True
    if s in ("false", "False"):
        return False
    if re.fullmatch(r"[-+]?\d+", s):
        return int(s)
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?", s):
        return float(s)
    return s

def _flow(s, i):
    """A flow collection ({a: 1, b: [x, "y"]}) or scalar starting at s[i] -> (value, next index)."""
    while s[i] == " ":
        i += 1
    if s[i] in "[{":
        close, i = ("]" if s[i] == "[" else "}"), i + 1
        items, d = [], {}
        while True:
            while s[i] in " ,":
                i += 1
            if s[i] == close:
                return (items if close == "]" else d), i + 1
            k, i = _flow(s, i)
            while s[i] == " ":
                i += 1
            if s[i] == ":" and close == "}":
                v, i = _flow(s, i + 1)
                d[k] = v
            elif close == "}":
                d[k] = None
            else:
                items.append(k)
    if s[i] in "\"'":
        q, j = s[i], i + 1
        while s[j] != q or (q == '"' and s[j - 1] == "\\" and s[j - 2] != "\\"):
            j += 1
        if q == "'" and s[j + 1 : j + 2] == "'":
            j = s.index("'", j + 2)  # '' inside a single-quoted scalar (good enough)
        return _scalar(s[i : j + 1]), j + 1
    m = re.compile(r"[^,\[\]{}:]*(?::(?! )[^,\[\]{}:]*)*").match(s, i)
    return _scalar(m.group(0)), m.end()

def _split_key(t):
    if t[0] in "[{":
        return None
    if t[0] in "\"'":
        q = t[0]
        j = 1
        while j < len(t):
            if t[j] == "\\" and q == '"':
                j += 2
                continue
            if t[j] == q:
                break
            j += 1
        key, rest = _scalar(t[: j + 1]), t[j + 1 :].lstrip()
        if not rest.startswith(":"):
            return None
        return key, rest[1:].strip()
    m = re.match(r"(.*?):(?:\s+(.*))?$", t)
    if not m or t.startswith(("- ",)) or t == "-" or re.search(r"\s#", m.group(1)):
        return None
    return m.group(1).strip(), (m.group(2) or "").strip()

class Y:
    def __init__(self, text):
        self.lines = text.split("\n")
        self.i = 0

    def _sig(self, i):
        while i < len(self.lines):
            raw = self.lines[i]
            t = raw.strip()
            if t and not t.startswith("#"):
                return i, len(raw) - len(raw.lstrip(" ")), t
            i += 1
        return None

    def node(self, ind):
        s = self._sig(self.i)
        if s is None or s[1] < ind:
            return None
        i, col, t = s
        self.i = i
        if t == "-" or t.startswith("- "):
            return self.seq(col)
        if _split_key(t) is not None:
            return self.map(col)
        self.i = i + 1
        return _scalar(t)

    def block(self, ind, style):
        out, i, bind = [], self.i, None
        while i < len(self.lines):
            raw = self.lines[i]
            if raw.strip() == "":
                out.append("")
                i += 1
                continue
            col = len(raw) - len(raw.lstrip(" "))
            if col <= ind:
                break
            if bind is None:
                bind = col
            if col < bind:
                break
            out.append(raw[bind:])
            i += 1
        self.i = i
        while out and out[-1] == "":
            out.pop()
        if style[0] == ">":
            text, para = [], []
            for l in out:
                if l == "" or l.startswith(" "):
                    if para:
                        text.append(" ".join(para))
                        para = []
                    text.append(l)
                else:
                    para.append(l)
            if para:
                text.append(" ".join(para))
            s = "\n".join(text)
        else:
            s = "\n".join(out)
        return s if style.endswith("-") else s + "\n"

    def value(self, rest, ind):
        if re.fullmatch(r"[|>][-+]?\d?", rest):
            return self.block(ind, rest)
        if rest == "":
            s = self._sig(self.i)
            if s is None:
                return None
            if s[1] > ind:
                return self.node(s[1])
            if s[1] == ind and (s[2] == "-" or s[2].startswith("- ")):
                return self.seq(ind)
            return None
        return _scalar(rest)

    def map(self, ind):
        d = {}
        while True:
            s = self._sig(self.i)
            if s is None or s[1] != ind or s[2] == "-" or s[2].startswith("- "):
                return d
            kv = _split_key(s[2])
            if kv is None:
                return d
            self.i = s[0] + 1
            d[kv[0]] = self.value(kv[1], ind)

    def seq(self, ind):
        out = []
        while True:
            s = self._sig(self.i)
            if s is None or s[1] != ind or not (s[2] == "-" or s[2].startswith("- ")):
                return out
            rest = s[2][1:].lstrip()
            if rest == "":
                self.i = s[0] + 1
                out.append(self.node(ind + 1))
                continue
            col = ind + (len(s[2]) - len(rest))
            self.lines[s[0]] = " " * col + rest
            self.i = s[0]
            out.append(self.node(col))

def load_all(text):
    if not os.environ.get("CM_NO_PYYAML"):  # CM_NO_PYYAML=1 forces the reader below (to test it)
        try:
            import yaml  # PyYAML, when present
            return [d for d in yaml.safe_load_all(text) if d is not None]
        except ImportError:
            pass
    docs, cur = [], []
    for line in text.split("\n"):
        if re.match(r"^---(\s|$)", line):
            docs.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur))
    out = []
    for d in docs:
        v = Y(d).node(0)
        if v is not None:
            out.append(v)
    return out

# ---------------------------------------------------------------- PromQL
FUNCS = set("""abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
clamp_max clamp_min cos cosh count_over_time days_in_month day_of_month day_of_week day_of_year deg delta deriv
exp floor histogram_avg histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar
histogram_sum holt_winters double_exponential_smoothing hour idelta increase irate label_join label_replace
last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month predict_linear
present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_desc sort_by_label
sort_by_label_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year
info limitk limit_ratio
sum min max avg group stddev stdvar count count_values bottomk topk quantile""".split())
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset", "inf", "nan", "atan2", "start", "end"}

def balanced(expr):
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    for ch in s:
        if ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            if not stack or stack[-1] != pairs[ch]:
                return f"unexpected '{ch}'"
            stack.pop()
    if stack:
        return f"unclosed '{stack[-1]}'"
    if s.count('"') % 2:
        return "unterminated string"
    return None

def expand_alternation(rx):
    """prefix(a|b)suffix with nested groups -> list of names, or None when rx is a real regex."""
    m = re.fullmatch(r"\^?([A-Za-z0-9_:]*)\(([A-Za-z0-9_:|]*)\)([A-Za-z0-9_:]*)\$?", rx)
    if m:
        return [m.group(1) + alt + m.group(3) for alt in m.group(2).split("|")]
    if re.fullmatch(r"\^?[A-Za-z0-9_:]+\$?", rx):
        return [rx.strip("^$")]
    if re.fullmatch(r"\^?[A-Za-z0-9_:|]+\$?", rx):
        return rx.strip("^$").split("|")
    return None

def metric_names(expr):
    """(metrics, functions, problems) referenced by a PromQL (or Grafana) expression."""
    names, funcs, problems = set(), set(), []
    for rx in re.findall(r'__name__\s*=~?\s*"((?:\\.|[^"\\])*)"', expr):
        alts = expand_alternation(rx)
        if alts is not None:
            names.update(alts)
        else:
            try:
                if not any(re.fullmatch(rx, k) for k in known | allowed):
                    problems.append(f"__name__=~\"{rx}\" matches no registered metric")
            except re.error as e:
                problems.append(f"bad __name__ regex {rx!r}: {e}")
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " 1 ", s)                      # Grafana variables
    s = re.sub(r"\{[^{}]*\}", " ", s)                                 # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)                               # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", r" \1 ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    s = re.sub(r"(?<![\w:])[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?[a-zA-Z]*", " ", s)
    for m in re.finditer(r"(?<![\w:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\(|\s+(?=(?:by|without)\s*\())?", s):
        word, call = m.group(1), m.group(2)
        if word.lower() in KEYWORDS:
            continue
        if call:
            funcs.add(word)
        else:
            names.add(word)
    return names, funcs, problems

def check_expr(where, expr):
    if not isinstance(expr, str) or not expr.strip():
        err(f"{where}: empty expression")
        return
    b = balanced(expr)
    if b:
        err(f"{where}: unbalanced expression ({b}): {' '.join(expr.split())}")
    lv = re.fullmatch(r"\s*label_values\((.*)\)\s*", expr, re.S)
    if lv:  # Grafana: label_values(label) or label_values(selector, label)
        inner = lv.group(1)
        depth, cut = 0, None
        for i, ch in enumerate(inner):
            depth += ch in "({["
            depth -= ch in ")}]"
            if ch == "," and depth == 0:
                cut = i
        if cut is None:
            return
        expr = inner[:cut]
    elif re.fullmatch(r"\s*(label_names|metrics|query_result)\(.*", expr, re.S):
        expr = re.sub(r"^\s*\w+\((.*)\)\s*$", r"\1", expr, flags=re.S)
    for metric, matchers in re.findall(r"(?<![\w:])([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^{}]*)\}", expr):
        if metric not in labels_of:
            continue
        for lab in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", re.sub(r'"(?:\\.|[^"\\])*"', '""', matchers)):
            if lab not in labels_of[metric] | TARGET_LABELS:
                err(f"{where}: {metric} has no label {lab} (it has {', '.join(sorted(labels_of[metric]))})")
    names, funcs, problems = metric_names(expr)
    for p in problems:
        err(f"{where}: {p}")
    for f in sorted(funcs - FUNCS):
        err(f"{where}: unknown PromQL function {f}()")
    for n in sorted(names):
        if n in known:
            continue
        if n in allowed:
            warn(f"{where}: uses {n}, which the operator does not register yet (--allow-metric)")
            continue
        close = difflib.get_close_matches(n, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        err(f"{where}: metric {n} is not registered by the operator (telemetry.rs){hint}")

# ---------------------------------------------------------------- the checks
def check_rules(doc):
    name = doc.get("metadata", {}).get("name", "?")
    groups = (doc.get("spec") or {}).get("groups") or []
    if not groups:
        err(f"PrometheusRule {name}: no rule groups")
    seen, alerts = set(), []
    for g in groups:
        for r in g.get("rules") or []:
            alert = r.get("alert") or r.get("record")
            where = f"alert {alert}" if r.get("alert") else f"record {alert}"
            if not alert:
                err(f"PrometheusRule {name} group {g.get('name')}: a rule without alert/record name")
                where = f"group {g.get('name')}"
            elif alert in seen and r.get("alert"):
                err(f"{where}: defined twice")
            seen.add(alert)
            check_expr(where, r.get("expr"))
            if not r.get("alert"):
                continue
            alerts.append(r)
            labels, ann = r.get("labels") or {}, r.get("annotations") or {}
            sev = labels.get("severity")
            if sev not in ("critical", "warning", "info"):
                err(f"{where}: labels.severity must be critical, warning or info (is {sev!r})")
            for a in ("summary", "description", "runbook_url"):
                if not str(ann.get(a) or "").strip():
                    err(f"{where}: annotation {a} is missing or empty")
            url = str(ann.get("runbook_url") or "")
            if url and not re.match(r"https?://\S+#\S+$", url):
                err(f"{where}: runbook_url {url!r} is not an http(s) URL with an #anchor")
            for a, v in ann.items():
                v = str(v)
                if v.count("{{") != v.count("}}"):
                    err(f"{where}: annotation {a} has unbalanced {{{{ }}}}")
                for lab in re.findall(r"\$labels\.(\w+)", v):
                    if lab not in label_names:
                        err(f"{where}: annotation {a} uses $labels.{lab}, which no series of the alert carries")
            if "for" in r and not re.fullmatch(r"\d+[smhdwy]", str(r["for"])):
                err(f"{where}: for: {r['for']!r} is not a Prometheus duration")
    return alerts

def check_dashboard(where, text):
    try:
        d = json.loads(text)
    except ValueError as e:
        err(f"{where}: dashboard JSON does not parse: {e}")
        return
    sv = d.get("schemaVersion")
    if not isinstance(sv, int) or sv < 36:
        err(f"{where}: schemaVersion {sv!r} < 36")
    if not d.get("uid"):
        err(f"{where}: no dashboard uid")
    tvars = (d.get("templating") or {}).get("list") or []
    dsv = [v for v in tvars if v.get("name") == "datasource"]
    if not dsv or dsv[0].get("type") != "datasource" or dsv[0].get("query") != "prometheus":
        err(f"{where}: needs a template variable `datasource` of type datasource, query prometheus")
    for v in tvars:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        check_expr(f"{where} variable ${v.get('name')}", q or "")
        if v.get("definition") and v["definition"] != q:
            check_expr(f"{where} variable ${v.get('name')} (definition)", v["definition"])
    ids = {}
    def walk(panels):
        for p in panels or []:
            yield p
            yield from walk(p.get("panels"))
    for p in walk(d.get("panels")):
        title = p.get("title", "?")
        pid = p.get("id")
        pw = f"{where} panel {pid} \"{title}\""
        if not isinstance(pid, int):
            err(f"{where} panel \"{title}\": no integer id")
        elif pid in ids:
            err(f"{pw}: id {pid} is also used by panel \"{ids[pid]}\"")
        else:
            ids[pid] = title
        if p.get("type") == "row":
            continue
        ds = p.get("datasource") or {}
        if isinstance(ds, dict) and ds.get("uid") not in ("${datasource}", "$datasource"):
            err(f"{pw}: datasource uid should be ${{datasource}} (is {ds.get('uid')!r})")
        targets = p.get("targets") or []
        if not targets and p.get("type") not in ("text", "news", "dashlist"):
            err(f"{pw}: no targets")
        refs = set()
        for t in targets:
            ref = t.get("refId", "?")
            if ref in refs:
                err(f"{pw}: refId {ref} used twice")
            refs.add(ref)
            check_expr(f"{pw} target {ref}", t.get("expr", ""))
    if not ids:
        err(f"{where}: no panels")

tmp = sys.argv[1]
docs, dashboards = [], []
inputs = sorted(f for f in os.listdir(tmp) if not f.endswith(".name"))
for f in inputs:
    text = open(os.path.join(tmp, f), encoding="utf-8").read()
    label = open(os.path.join(tmp, f.split(".")[0] + ".name"), encoding="utf-8").read().strip()
    if f.endswith(".json"):
        dashboards.append((label, text))
        continue
    try:
        docs.extend(d for d in load_all(text) if isinstance(d, dict))
    except Exception as e:  # noqa: BLE001
        err(f"{label}: cannot read the YAML: {e}")

rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
monitors = [d for d in docs if d.get("kind") == "ServiceMonitor"]
services = [d for d in docs if d.get("kind") == "Service"]
for d in docs:
    if d.get("kind") == "ConfigMap":
        for k, v in (d.get("data") or {}).items():
            if k.endswith(".json"):
                dashboards.append((f"ConfigMap {d.get('metadata', {}).get('name')} {k}", v or ""))

yaml_given = any(f.endswith(".yaml") for f in inputs)
if yaml_given:
    for kind, found in (("PrometheusRule", rules), ("ServiceMonitor", monitors), ("dashboard ConfigMap", dashboards)):
        if not found:
            err(f"no {kind} in the input: render with metrics.serviceMonitor.enabled=true, "
                "prometheusRule.enabled=true and dashboard.enabled=true")

alerts = []
for r in rules:
    alerts += check_rules(r)
for where, text in dashboards:
    check_dashboard(where, text)

metrics_services = {}
for s in services:
    ports = [p.get("name") for p in (s.get("spec") or {}).get("ports") or []]
    if "metrics" in ports:
        metrics_services[s["metadata"]["name"]] = s["metadata"].get("labels") or {}
for sm in monitors:
    name = sm.get("metadata", {}).get("name")
    eps = (sm.get("spec") or {}).get("endpoints") or []
    if not any(e.get("port") == "metrics" and e.get("path", "/metrics") == "/metrics" for e in eps):
        err(f"ServiceMonitor {name}: no endpoint on port `metrics`, path /metrics")
    sel = ((sm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    if metrics_services and not any(all(l.get(k) == v for k, v in sel.items())
                                     for l in metrics_services.values()):
        err(f"ServiceMonitor {name}: selector {sel} matches no Service with a `metrics` port")
for a in alerts:
    if a.get("alert") == "CaduceusOperatorDown":
        jobs = set(re.findall(r'job\s*=\s*"([^"]*)"', str(a.get("expr"))))
        if not jobs:
            err("alert CaduceusOperatorDown: expression does not select the scrape job (job=\"<Service>\")")
        elif metrics_services and not jobs <= set(metrics_services):
            err(f"alert CaduceusOperatorDown: job {sorted(jobs)} is not the metrics Service "
                f"{sorted(metrics_services)} (the ServiceMonitor's job name)")

for w in warnings:
    print(f"check-monitoring: warning: {w}", file=sys.stderr)
if errors:
    for e in errors:
        print(f"check-monitoring: FAIL: {e}", file=sys.stderr)
    print(f"check-monitoring: {len(errors)} problem(s)", file=sys.stderr)
    sys.exit(1)
print(f"check-monitoring: OK: {len(alerts)} alerts, {len(dashboards)} dashboard(s), "
      f"{len(monitors)} ServiceMonitor(s); {len(known)} metric names known from {os.path.basename(os.environ['CM_TELEMETRY'])}")
PY
