#!/usr/bin/env python3
"""Checks the chart's RBAC, NetworkPolicies and admission policies in a render against its values.

    check-policies.py RENDERED.yaml [-f VALUES.yaml]... [--set-json KEY=JSON]... [--release-namespace NS]

The values are merged over the chart's values.yaml as Helm does (maps merge, lists and scalars replace),
then every rule below is checked; each violation is printed and the exit status is 1. Needs PyYAML.

RBAC: no wildcard; the ClusterRole grants only fl.caduceus.dev resources; one Role in the release
namespace (Secrets, ConfigMaps, events, the Lease), one in each study and each hospital namespace, each
with exactly the rules the operator needs, and nothing else namespaced; every binding names only the
chart's ServiceAccount. The Deployment runs as that ServiceAccount (UID/GID/fsGroup 65532) with
CADUCEUS_WATCH_NAMESPACES = the served namespaces; the ServiceAccount mounts no token by default.

NetworkPolicies (networkPolicy.enabled): a default deny in every served namespace (defaultDeny); every
egress rule names its peers; DNS only to the configured DNS pods or CIDRs; the operator reaches only the
API server's CIDRs on its ports; trainers reach only aggregators of the study namespaces on 50051 and
accept nothing; aggregators accept only trainers of the hospital namespaces on 50051 and reach only DNS.

Admission (admissionPolicy.enabled): the round-jobs and round-pods ValidatingAdmissionPolicies deny
(failurePolicy Fail, validationActions [Deny]), name the operator's and the Job controller's users, and
are bound to exactly the served namespaces.

Roles (`role`, docs/sites.md): `all` as above. `coordinator`: no hospital namespaces; no HospitalClient
rights in the ClusterRole, a Role in namespaces.sites for the mirrors instead; the gateway Service and
container port, the gateway and sites env; NetworkPolicies open the gateway and aggregator ports to
networkPolicy.sitesFrom. `site`: no ClusterRole at all, no Service, no study or round rights anywhere; a
Role in the hospital's namespace (site.hospital) and one in its own, whose Secrets have no delete or
watch; no Pods, no Services; NetworkPolicies reach the coordinator's CIDRs only.
"""

import argparse
import copy
import json
import os
import sys

try:
    import yaml
except ImportError:
    sys.exit("check-policies.py needs PyYAML (pip install pyyaml, or apt-get install python3-yaml)")

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.dirname(HERE)
GRPC = 50051
MANAGED = {"app.kubernetes.io/managed-by": "caduceus-operator"}
ROUND_ACCOUNTS = ["caduceus-aggregator", "caduceus-trainer"]

# (apiGroup, resource) -> verbs, per Role. The operator's needs (operator/src), nothing more.
CLUSTER_RULES = {
    ("fl.caduceus.dev", "federatedstudies"): {"get", "list", "watch", "patch", "update"},
    # patch: the finalizer that keeps a hospital while its privacy ledger is not empty.
    ("fl.caduceus.dev", "hospitalclients"): {"get", "list", "watch", "patch"},
    ("fl.caduceus.dev", "trainingrounds"): {"get", "list", "watch", "create", "patch", "delete"},
    ("fl.caduceus.dev", "federatedstudies/status"): {"get", "patch", "update"},
    ("fl.caduceus.dev", "hospitalclients/status"): {"get", "patch", "update"},
    ("fl.caduceus.dev", "trainingrounds/status"): {"get", "patch", "update"},
    ("fl.caduceus.dev", "federatedstudies/finalizers"): {"update"},
    ("fl.caduceus.dev", "hospitalclients/finalizers"): {"update"},
    ("fl.caduceus.dev", "trainingrounds/finalizers"): {"update"},
}
OWN_RULES = {
    ("", "secrets"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
ROUND_RULES = {
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"get", "list"},
    ("", "secrets"): {"get", "list", "create", "patch", "delete"},
    ("", "serviceaccounts"): {"get", "create", "patch"},
    ("", "persistentvolumeclaims"): {"get", "list"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
STUDY_RULES = {**ROUND_RULES, ("", "services"): {"get", "create", "patch"}}
HOSPITAL_RULES = dict(ROUND_RULES)

# Role coordinator: HospitalClients only in the sites namespace (the hospitals' mirrors).
COORDINATOR_CLUSTER_RULES = {k: v for k, v in CLUSTER_RULES.items() if not k[1].startswith("hospitalclients")}
SITES_RULES = {
    ("fl.caduceus.dev", "hospitalclients"): {"get", "list", "watch", "create", "update", "patch", "delete"},
    ("fl.caduceus.dev", "hospitalclients/status"): {"get", "patch", "update"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
# Role site: its HospitalClient and trainers in the hospital's namespace; nothing of studies or rounds.
SITE_HOSPITAL_RULES = {
    ("fl.caduceus.dev", "hospitalclients"): {"get", "list", "watch", "patch"},
    ("fl.caduceus.dev", "hospitalclients/status"): {"get", "patch", "update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "secrets"): {"get", "create", "update", "patch", "delete"},
    ("", "serviceaccounts"): {"get", "create", "patch"},
    ("", "persistentvolumeclaims"): {"get"},
    ("events.k8s.io", "events"): {"create", "patch"},
}


def site_own_rules(join_secret):
    # The join Secret, caduceus-site-identity and the study keys (listed by label): no delete, no watch.
    return {
        ("", "secrets"): {"get", "list", "create", "update"},
        ("", "configmaps"): OWN_RULES[("", "configmaps")],
        ("events.k8s.io", "events"): {"create", "patch"},
    }


errors = []


def err(msg):
    errors.append(msg)


def merge(base, over):
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def set_path(values, dotted, value):
    keys = dotted.split(".")
    cur = values
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    if isinstance(value, dict) and isinstance(cur.get(keys[-1]), dict):
        merge(cur[keys[-1]], value)  # as Helm merges --set-json maps
    else:
        cur[keys[-1]] = value


def fullname(values, release="caduceus"):
    if values.get("fullnameOverride"):
        return values["fullnameOverride"][:63].rstrip("-")
    return release if "caduceus" in release else f"{release}-caduceus"


def rules_of(obj, names_allowed=False):
    """{(group, resource[, resourceNames]): verbs} of a Role or ClusterRole; duplicates are an error."""
    out = {}
    where = f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
    for r in obj.get("rules") or []:
        for key in ("verbs", "resources", "apiGroups"):
            if "*" in (r.get(key) or []):
                err(f"{where}: wildcard in {key}")
        if (r.get("resourceNames") and not names_allowed) or r.get("nonResourceURLs"):
            err(f"{where}: unexpected resourceNames/nonResourceURLs {r}")
        names = tuple(sorted(r.get("resourceNames") or []))
        for g in r.get("apiGroups") or []:
            for res in r.get("resources") or []:
                key = (g, res, names) if names else (g, res)
                if key in out:
                    err(f"{where}: {g}/{res} granted twice")
                out[key] = set(r.get("verbs") or [])
    return out


def same_rules(where, got, want):
    for key in sorted(set(got) | set(want)):
        g, w = got.get(key, set()), want.get(key, set())
        if g != w:
            err(f"{where}: {key[0] or 'core'}/{key[1]}: verbs {sorted(g)}, want {sorted(w)}")


def selector_matches_exactly(sel, labels):
    return sel == {"matchLabels": labels}


def peers_str(p):
    return json.dumps(p, sort_keys=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("-f", "--values", action="append", default=[])
    ap.add_argument("--set-json", action="append", default=[], help="KEY=JSON, applied after the files")
    ap.add_argument("--release-namespace", default="caduceus-system")
    ap.add_argument("--release", default="caduceus")
    a = ap.parse_args()

    with open(os.path.join(CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    for vf in a.values:
        with open(vf) as f:
            merge(values, yaml.safe_load(f) or {})
    for kv in a.set_json:
        k, v = kv.split("=", 1)
        set_path(values, k, json.loads(v))
    with open(a.rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]

    rel_ns = a.release_namespace
    name = fullname(values, a.release)
    sa = values["serviceAccount"].get("name") or name
    role = values["role"]
    if role == "site":
        site_ns = values["site"]["hospital"].split("/")[0]
        studies, hospitals = [], [site_ns]
    elif role == "coordinator":
        studies, hospitals = values["namespaces"]["studies"], []
    else:
        studies = values["namespaces"]["studies"]
        hospitals = values["namespaces"]["hospitals"]
    sites_ns = values["namespaces"]["sites"]
    served = list(dict.fromkeys(studies + hospitals))
    watched = served + ([sites_ns] if role == "coordinator" and sites_ns not in served else [])
    leader = values["leaderElection"]["enabled"] or int(values["replicaCount"]) > 1
    np = values["networkPolicy"]

    def of_kind(kind):
        return [d for d in docs if d.get("kind") == kind]

    # ---------------------------------------------------------------- RBAC
    if values["rbac"]["create"]:
        crs = of_kind("ClusterRole")
        want_crs = [] if role == "site" else [name]
        if [c["metadata"]["name"] for c in crs] != want_crs:
            err(f"want ClusterRoles {want_crs}, got {[c['metadata']['name'] for c in crs]}")
        for c in crs:
            got = rules_of(c)
            for g, res in got:
                if g != "fl.caduceus.dev":
                    err(f"ClusterRole {name} grants {g or 'core'}/{res} cluster-wide")
            same_rules(f"ClusterRole {name}", got, COORDINATOR_CLUSTER_RULES if role == "coordinator" else CLUSTER_RULES)
        own = site_own_rules(values["site"]["joinSecret"]) if role == "site" else OWN_RULES
        want_roles = {(rel_ns, name): {**own, **(LEASE_RULES if leader else {})}}
        for ns in studies:
            want_roles[(ns, f"{name}-study")] = STUDY_RULES
        for ns in hospitals:
            want_roles[(ns, f"{name}-hospital")] = SITE_HOSPITAL_RULES if role == "site" else HOSPITAL_RULES
        if role == "coordinator":
            want_roles[(sites_ns, f"{name}-sites")] = SITES_RULES
        roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in of_kind("Role")}
        for key in sorted(set(roles) - set(want_roles)):
            err(f"unexpected Role {key[0]}/{key[1]}")
        for key, want in sorted(want_roles.items()):
            if key not in roles:
                err(f"no Role {key[1]} in namespace {key[0]}")
                continue
            got = rules_of(roles[key])
            same_rules(f"Role {key[0]}/{key[1]}", got, want)
            if role == "site":
                for k in got:
                    if k[0] == "fl.caduceus.dev" and not k[1].startswith("hospitalclients"):
                        err(f"Role {key[0]}/{key[1]} grants {k[1]} to a site")
                    if k[1] in ("services", "pods"):
                        err(f"Role {key[0]}/{key[1]} grants {k[1]} to a site")
            if key[0] != rel_ns and ("", "configmaps") in got:
                err(f"Role {key[0]}/{key[1]} grants ConfigMaps outside the release namespace")
        bindings = of_kind("RoleBinding") + of_kind("ClusterRoleBinding")
        bound = set()
        for b in bindings:
            where = f"{b['kind']} {b['metadata'].get('namespace', '')}/{b['metadata']['name']}"
            subj = [(s.get("kind"), s.get("name"), s.get("namespace")) for s in b.get("subjects") or []]
            if subj != [("ServiceAccount", sa, rel_ns)]:
                err(f"{where}: subjects {subj}, want only ServiceAccount {rel_ns}/{sa}")
            ref = b["roleRef"]
            if b["kind"] == "RoleBinding":
                if ref.get("kind") != "Role":
                    err(f"{where}: binds a {ref.get('kind')}, want a Role of its namespace")
                bound.add((b["metadata"]["namespace"], ref["name"]))
            elif ref.get("name") != name or ref.get("kind") != "ClusterRole":
                err(f"{where}: roleRef {ref}")
        for key in sorted(set(want_roles) - bound):
            err(f"Role {key[0]}/{key[1]} is not bound")
    elif of_kind("ClusterRole") or of_kind("Role"):
        err("rbac.create is false but the render has RBAC objects")

    deps = of_kind("Deployment")
    if len(deps) != 1:
        err(f"want one Deployment, got {len(deps)}")
    for d in deps:
        pod = d["spec"]["template"]["spec"]
        if pod.get("serviceAccountName") != sa:
            err(f"Deployment runs as {pod.get('serviceAccountName')}, want {sa}")
        sc = pod.get("securityContext") or {}
        for k, v in {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532}.items():
            if sc.get(k) != v:
                err(f"Deployment pod securityContext.{k} = {sc.get(k)!r}, want {v!r}")
        env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env") or []}
        if env.get("CADUCEUS_WATCH_NAMESPACES") != ",".join(watched):
            err(f"CADUCEUS_WATCH_NAMESPACES = {env.get('CADUCEUS_WATCH_NAMESPACES')!r}, want {','.join(watched)!r}")
        gw = values["gateway"]
        want_env = {
            "CADUCEUS_ROLE": None if role == "all" else role,
            "CADUCEUS_GATEWAY_LISTEN": f"0.0.0.0:{gw['port']}" if role == "coordinator" else None,
            "CADUCEUS_GATEWAY_ADDRESS": gw["address"] if role == "coordinator" else None,
            "CADUCEUS_GATEWAY_SERVER_NAME": ",".join(gw["serverNames"]) if role == "coordinator" and gw["serverNames"] else None,
            "CADUCEUS_SITES_NAMESPACE": sites_ns if role == "coordinator" else None,
            "CADUCEUS_HOSPITAL": values["site"]["hospital"] if role == "site" else None,
            "CADUCEUS_JOIN_SECRET": values["site"]["joinSecret"] if role == "site" else None,
        }
        for k, v in want_env.items():
            if env.get(k) != v:
                err(f"Deployment env {k} = {env.get(k)!r}, want {v!r} (role {role})")
        ports = {p["name"]: p["containerPort"] for p in pod["containers"][0].get("ports") or []}
        want_ports = {"metrics": values["metrics"]["port"], **({"gateway": gw["port"]} if role == "coordinator" else {})}
        if ports != want_ports:
            err(f"container ports {ports}, want {want_ports} (role {role})")
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    want_services = set()
    if role != "site" and values["metrics"]["service"]["enabled"]:
        want_services.add(f"{name}-metrics")
    if role == "coordinator":
        want_services.add(f"{name}-gateway")
    if set(services) != want_services:
        err(f"Services {sorted(services)}, want {sorted(want_services)} (role {role})")
    g = services.get(f"{name}-gateway")
    if g is not None:
        spec = g["spec"]
        if spec.get("type") != gw["service"]["type"] or [(p["name"], p["port"], p["targetPort"]) for p in spec["ports"]] != [("gateway", gw["port"], "gateway")]:
            err(f"gateway Service: type {spec.get('type')}, ports {spec['ports']}, want {gw['service']['type']} gateway:{gw['port']}")
    for s in of_kind("ServiceAccount"):
        if s.get("automountServiceAccountToken") is not False:
            err(f"ServiceAccount {s['metadata']['name']} mounts its token by default")

    # ---------------------------------------------------------------- NetworkPolicies
    pols = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in of_kind("NetworkPolicy")}
    if not np["enabled"]:
        if pols:
            err("networkPolicy.enabled is false but the render has NetworkPolicies")
    else:
        dns_peers = [{"namespaceSelector": np["dns"]["namespaceSelector"], "podSelector": np["dns"]["podSelector"]}]
        dns_peers += [{"ipBlock": {"cidr": c}} for c in np["dns"].get("cidrs") or []]
        dns_ports = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
        grpc_ports = [{"protocol": "TCP", "port": GRPC}]

        def is_dns(rule):
            return rule.get("ports") == dns_ports

        # With tracing on, every policy with egress (operator, aggregators, trainers) also reaches the collector.
        otlp = None
        if str(values.get("tracing", {}).get("otlpEndpoint") or ""):
            otlp = {"to": np["tracing"]["to"], "ports": [{"protocol": "TCP", "port": x} for x in np["tracing"]["ports"]]}
            if not otlp["to"]:
                err("tracing.otlpEndpoint is set but networkPolicy.tracing.to is empty")

        def check_egress(where, p, want_other):
            """Every egress rule names its peers; DNS goes to the DNS pods only; want_other: the non-DNS rules."""
            if otlp is not None:
                want_other = want_other + [otlp]
            rules = p["spec"].get("egress")
            if "Egress" not in p["spec"].get("policyTypes", []):
                err(f"{where}: Egress not in policyTypes")
            dns = [r for r in rules or [] if is_dns(r)]
            other = [r for r in rules or [] if not is_dns(r)]
            if len(dns) != 1 or dns[0].get("to") != dns_peers:
                err(f"{where}: DNS egress {dns}, want exactly to {dns_peers} on {dns_ports}")
            for r in rules or []:
                if not r.get("to"):
                    err(f"{where}: an egress rule without `to` allows every destination: {r}")
                for peer in r.get("to") or []:
                    if peer == {} or peer.get("ipBlock", {}).get("cidr") in ("0.0.0.0/0", "::/0"):
                        err(f"{where}: egress to anywhere: {peer}")
                    if 53 in [x.get("port") for x in r.get("ports") or []] and not is_dns(r):
                        err(f"{where}: port 53 outside the DNS rule: {r}")
            if sorted(map(peers_str, other)) != sorted(map(peers_str, want_other)):
                err(f"{where}: egress {other}, want {want_other}")

        coord_to = [{"ipBlock": {"cidr": c}} for c in np["coordinator"]["cidrs"]]
        op_key = (rel_ns, f"{name}-operator")
        if op_key not in pols:
            err(f"no NetworkPolicy {op_key[1]} in {rel_ns}")
        else:
            p = pols[op_key]
            api = {"to": [{"ipBlock": {"cidr": c}} for c in np["apiServer"]["cidrs"]],
                   "ports": [{"protocol": "TCP", "port": port} for port in np["apiServer"]["ports"]]}
            if not np["apiServer"]["cidrs"]:
                err("the operator's API server egress has no CIDR")
            want_other = [api]
            if role == "site":
                if not coord_to:
                    err("the site agent's coordinator egress has no CIDR")
                want_other.append({"to": coord_to, "ports": [{"protocol": "TCP", "port": np["coordinator"]["gatewayPort"]}]})
            check_egress(f"NetworkPolicy {rel_ns}/{op_key[1]}", p, want_other)
            ing = p["spec"].get("ingress") or []
            want_from = np.get("metricsFrom") or None
            want_ing = [{"ports": [{"protocol": "TCP", "port": values["metrics"]["port"]}], **({"from": want_from} if want_from else {})}]
            if role == "coordinator":
                sites_from = np.get("sitesFrom") or None
                want_ing.append({"ports": [{"protocol": "TCP", "port": values["gateway"]["port"]}],
                                 **({"from": sites_from} if sites_from else {})})
            if ing != want_ing:
                err(f"NetworkPolicy {rel_ns}/{op_key[1]}: ingress {ing}, want {want_ing}")

        want = {op_key}
        for ns in served:
            key = (ns, "caduceus-default-deny")
            if not np["defaultDeny"]:
                if key in pols:
                    err(f"networkPolicy.defaultDeny is false but {ns} has {key[1]}")
                continue
            want.add(key)
            p = pols.get(key)
            if p is None:
                err(f"no default-deny NetworkPolicy in served namespace {ns}")
            elif p["spec"] != {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}:
                err(f"NetworkPolicy {ns}/{key[1]} is not a pure default deny: {p['spec']}")
        trainers_of = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": h}},
                        "podSelector": {"matchLabels": dict(MANAGED, **{"app.kubernetes.io/component": "trainer"})}}
                       for h in hospitals]
        aggregators_of = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": s}},
                           "podSelector": {"matchLabels": dict(MANAGED, **{"app.kubernetes.io/component": "aggregator"})}}
                          for s in studies]
        for ns in studies:
            key = (ns, "caduceus-aggregator")
            want.add(key)
            p = pols.get(key)
            if p is None:
                err(f"no NetworkPolicy caduceus-aggregator in study namespace {ns}")
                continue
            where = f"NetworkPolicy {ns}/caduceus-aggregator"
            if not selector_matches_exactly(p["spec"]["podSelector"], dict(MANAGED, **{"app.kubernetes.io/component": "aggregator"})):
                err(f"{where}: selects {p['spec']['podSelector']}")
            if role == "coordinator":
                sites_from = np.get("sitesFrom") or None
                want_ing = [{"ports": grpc_ports, **({"from": sites_from} if sites_from else {})}]
            else:
                want_ing = [{"from": trainers_of, "ports": grpc_ports}]
            if p["spec"].get("ingress") != want_ing:
                err(f"{where}: ingress {p['spec'].get('ingress')}, want {want_ing}")
            check_egress(where, p, [])
        for ns in hospitals:
            key = (ns, "caduceus-trainer")
            want.add(key)
            p = pols.get(key)
            if p is None:
                err(f"no NetworkPolicy caduceus-trainer in hospital namespace {ns}")
                continue
            where = f"NetworkPolicy {ns}/caduceus-trainer"
            if not selector_matches_exactly(p["spec"]["podSelector"], dict(MANAGED, **{"app.kubernetes.io/component": "trainer"})):
                err(f"{where}: selects {p['spec']['podSelector']}")
            if p["spec"].get("ingress") != [] or "Ingress" not in p["spec"].get("policyTypes", []):
                err(f"{where}: trainers must accept no connection: {p['spec'].get('ingress')}")
            if role == "site":
                agg_ports = [{"protocol": "TCP", **{k: v for k, v in x.items() if v is not None}}
                             for x in np["coordinator"]["aggregatorPorts"]]
                check_egress(where, p, [{"to": coord_to, "ports": agg_ports}])
            else:
                check_egress(where, p, [{"to": aggregators_of, "ports": grpc_ports}])
        for key in sorted(set(pols) - want):
            err(f"unexpected NetworkPolicy {key[0]}/{key[1]}")

    # ---------------------------------------------------------------- admission
    vaps = {v["metadata"]["name"]: v for v in of_kind("ValidatingAdmissionPolicy")}
    vapbs = {v["metadata"]["name"]: v for v in of_kind("ValidatingAdmissionPolicyBinding")}
    adm = values["admissionPolicy"]
    if not adm["enabled"]:
        if vaps or vapbs:
            err("admissionPolicy.enabled is false but the render has admission policies")
    else:
        operator = f"system:serviceaccount:{rel_ns}:{sa}"
        want_users = {f"{name}-round-jobs": operator, f"{name}-round-pods": adm["jobControllerUsername"]}
        if set(vaps) != set(want_users) or set(vapbs) != set(want_users):
            err(f"admission policies {sorted(vaps)}, bindings {sorted(vapbs)}, want {sorted(want_users)}")
        for pname, user in want_users.items():
            v, b = vaps.get(pname), vapbs.get(pname)
            if v is None or b is None:
                continue
            spec = v["spec"]
            if spec.get("failurePolicy") != "Fail":
                err(f"ValidatingAdmissionPolicy {pname}: failurePolicy {spec.get('failurePolicy')}, want Fail")
            rules = spec["matchConstraints"]["resourceRules"]
            want_res = ["jobs"] if pname.endswith("jobs") else ["pods"]
            if [r["resources"] for r in rules] != [want_res] or rules[0]["operations"] != ["CREATE", "UPDATE"]:
                err(f"ValidatingAdmissionPolicy {pname}: resourceRules {rules}")
            conds = " ".join(c["expression"] for c in spec.get("matchConditions") or [])
            if "app.kubernetes.io/managed-by" not in conds or "oldObject" not in conds:
                err(f"ValidatingAdmissionPolicy {pname}: matchConditions must select the label, also when an update adds it")
            first = spec["validations"][0]["expression"]
            if first != f"request.userInfo.username == '{user}'":
                err(f"ValidatingAdmissionPolicy {pname}: first validation {first!r}, want the user {user}")
            text = " ".join(x["expression"] for x in spec["validations"])
            for acc in ROUND_ACCOUNTS:
                if f"'{acc}'" not in text:
                    err(f"ValidatingAdmissionPolicy {pname}: does not limit the ServiceAccount to {ROUND_ACCOUNTS}")
            if "automountServiceAccountToken == false" not in text:
                err(f"ValidatingAdmissionPolicy {pname}: does not require automountServiceAccountToken: false")
            bs = b["spec"]
            if bs.get("policyName") != pname or bs.get("validationActions") != ["Deny"]:
                err(f"ValidatingAdmissionPolicyBinding {pname}: {bs}")
            sel = bs.get("matchResources", {}).get("namespaceSelector")
            want_sel = {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": served}]}
            if sel != want_sel:
                err(f"ValidatingAdmissionPolicyBinding {pname}: namespaceSelector {sel}, want {want_sel}")

    for e in errors:
        print(f"ERROR: {a.rendered}: {e}", file=sys.stderr)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
