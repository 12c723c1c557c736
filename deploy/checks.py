#!/usr/bin/env python3
"""Consistency checks of deploy/, run by deploy/check.sh (one sub-command per check).

Needs Python 3.11 (tomllib) and PyYAML, except `prometheusrule`, which only reads text:

    python3 deploy/checks.py prometheusrule > deploy/kubernetes/base/prometheusrule.yaml

regenerates the PrometheusRule from deploy/prometheus/alerts.yml.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUSRULE = DEPLOY / "kubernetes" / "base" / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "tamio-bridge.json"
RUNBOOKS = DEPLOY / "RUNBOOKS.md"
METRICS_DOC = REPO / "docs" / "observability.md"
DEFAULT_SETTINGS = REPO / "config" / "default.toml"

# Kinds that the Kubernetes JSON schemas do not cover (Prometheus Operator CRDs).
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

PROMETHEUSRULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by `python3 deploy/checks.py prometheusrule`:
# edit alerts.yml, then regenerate. deploy/check.sh fails when the two differ.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: tamio-bridge
  labels:
    app.kubernetes.io/name: tamio-bridge
spec:
"""


class Failure(Exception):
    pass


def yaml():
    import yaml as _yaml  # PyYAML, installed by check.sh

    return _yaml


# --- PrometheusRule ---------------------------------------------------------------------------


def render_prometheusrule() -> str:
    """alerts.yml without its leading comment block, indented under `spec:`."""
    lines = ALERTS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = [("  " + line) if line.strip() else "" for line in lines[start:]]
    return PROMETHEUSRULE_HEADER + "\n".join(body) + "\n"


def cmd_prometheusrule() -> None:
    sys.stdout.write(render_prometheusrule())


def cmd_prometheusrule_sync() -> None:
    expected = render_prometheusrule()
    actual = PROMETHEUSRULE.read_text()
    if actual != expected:
        raise Failure(
            f"{PROMETHEUSRULE.relative_to(REPO)} differs from what alerts.yml generates; run\n"
            "  python3 deploy/checks.py prometheusrule > deploy/kubernetes/base/prometheusrule.yaml"
        )
    rule = yaml().safe_load(actual)
    alerts = yaml().safe_load(ALERTS.read_text())
    if rule["spec"] != alerts:
        raise Failure("PrometheusRule spec does not parse to the same groups as alerts.yml")
    print(f"{PROMETHEUSRULE.relative_to(REPO)} is alerts.yml, identical")


# --- Alert annotations and runbooks -----------------------------------------------------------


def github_anchor(heading: str) -> str:
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    anchors = set()
    for line in RUNBOOKS.read_text().splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            anchors.add(github_anchor(m.group(1)))
        for explicit in re.findall(r'<a (?:id|name)="([^"]+)"', line):
            anchors.add(explicit)
    return anchors


def cmd_alert_annotations() -> None:
    doc = yaml().safe_load(ALERTS.read_text())
    anchors = runbook_anchors()
    problems = []
    names = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            name = rule["alert"]
            names.append(name)
            ann = rule.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                if not str(ann.get(key, "")).strip():
                    problems.append(f"{name}: annotation `{key}` missing")
            if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
                problems.append(f"{name}: label `severity` missing or not critical/warning/info")
            url = str(ann.get("runbook_url", ""))
            expected = f"deploy/RUNBOOKS.md#{name.lower()}"
            if not url.endswith(expected):
                problems.append(f"{name}: runbook_url is {url!r}, expected it to end in {expected!r}")
            elif name.lower() not in anchors:
                problems.append(f"{name}: deploy/RUNBOOKS.md has no heading `{name}` (anchor #{name.lower()})")
    if len(set(names)) != len(names):
        problems.append("alert names are not unique")
    if problems:
        raise Failure("\n".join(problems))
    print(f"{len(names)} alerts, each with summary, description, severity and a runbook in deploy/RUNBOOKS.md")


# --- Metric names -----------------------------------------------------------------------------


def exported_metrics() -> tuple[set[str], set[str]]:
    """(names, histogram names) from the `## Metrics` table of docs/observability.md."""
    text = METRICS_DOC.read_text()
    m = re.search(r"^## Metrics\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not m:
        raise Failure("docs/observability.md has no `## Metrics` section")
    names, histograms = set(), set()
    for line in m.group(1).splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        found = re.findall(r"`((?:tamio_bridge|process)_[a-z0-9_]+)`", cells[0])
        names.update(found)
        if len(cells) > 1 and cells[1] == "histogram":
            histograms.update(found)
    if not names:
        raise Failure("no metric names found in docs/observability.md `## Metrics`")
    return names, histograms


METRIC_FILES = [
    ALERTS,
    DEPLOY / "prometheus" / "alerts.test.yml",
    PROMETHEUSRULE,
    DASHBOARD,
]


def cmd_metric_names() -> None:
    names, histograms = exported_metrics()
    allowed = set(names)
    for h in histograms:
        allowed.update({h + "_bucket", h + "_count", h + "_sum"})
    problems = []
    used = set()
    for path in METRIC_FILES:
        for name in sorted(set(re.findall(r"\b(?:tamio_bridge|process)_[a-z0-9_]+\b", path.read_text()))):
            used.add(name)
            if name not in allowed:
                problems.append(f"{path.relative_to(REPO)}: {name} is not a metric of the bridge")
    if problems:
        raise Failure("\n".join(problems) + "\n(the names are those of docs/observability.md `## Metrics`)")
    print(f"{len(used)} metric names used, all listed in docs/observability.md `## Metrics`")


# --- Grafana ----------------------------------------------------------------------------------


def cmd_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text())
    problems = []
    if not dash.get("uid") or not dash.get("title"):
        problems.append("dashboard needs a uid and a title")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problems.append("dashboard needs a `datasource` variable of type datasource")
    ids = []
    exprs = 0
    for panel in dash.get("panels", []):
        ids.append(panel.get("id"))
        title = panel.get("title", f"panel {panel.get('id')}")
        if "gridPos" not in panel:
            problems.append(f"{title}: no gridPos")
        if panel.get("type") == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{title}: datasource is not ${{datasource}}")
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"{title}: no queries")
        for t in targets:
            expr = t.get("expr", "")
            if not expr.strip():
                problems.append(f"{title}: a query without expr")
                continue
            exprs += 1
            if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
                problems.append(f"{title}: unbalanced brackets in {expr!r}")
            for var in re.findall(r"\$([a-z_]+)", expr):
                if var not in variables and not var.startswith("__"):
                    problems.append(f"{title}: unknown variable ${var}")
        if not panel.get("description"):
            problems.append(f"{title}: no description")
    if len(ids) != len(set(ids)) or None in ids:
        problems.append("panel ids are missing or not unique")
    if problems:
        raise Failure("\n".join(problems))
    print(f"{len(ids)} panels, {exprs} queries")


def cmd_dashboard_rules(out: str) -> None:
    """Writes the dashboard's queries as recording rules, for `promtool check rules` to parse."""
    dash = json.loads(DASHBOARD.read_text())
    rules = []
    for panel in dash.get("panels", []):
        for t in panel.get("targets", []):
            expr = t.get("expr", "")
            expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            expr = re.sub(r'=~"\$[a-z_]+"', '=~".+"', expr)
            rules.append({"record": f"dashboard:panel_{panel['id']}:{t.get('refId', 'A')}", "expr": expr})
    Path(out).write_text(yaml().safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    print(f"{len(rules)} dashboard queries written as recording rules")


def cmd_grafana_provisioning() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml().safe_load((prov / "datasources" / "prometheus.yaml").read_text())
    db = yaml().safe_load((prov / "dashboards" / "tamio-bridge.yaml").read_text())
    compose = yaml().safe_load((DEPLOY / "compose.yaml").read_text())
    problems = []
    if ds.get("apiVersion") != 1 or not ds.get("datasources"):
        problems.append("datasources file: apiVersion 1 with a `datasources` list expected")
    else:
        d = ds["datasources"][0]
        if d.get("type") != "prometheus" or d.get("url") != "http://prometheus:9090":
            problems.append("datasource must be of type prometheus at http://prometheus:9090")
    if db.get("apiVersion") != 1 or not db.get("providers"):
        problems.append("dashboards file: apiVersion 1 with a `providers` list expected")
    else:
        path = db["providers"][0].get("options", {}).get("path")
        mounts = compose["services"]["grafana"].get("volumes", [])
        targets = {m.split(":")[1] for m in mounts}
        if not any(t == f"{path}/tamio-bridge.json" for t in targets):
            problems.append(f"provider path {path} does not hold the mounted dashboard ({targets})")
    if problems:
        raise Failure("\n".join(problems))
    print("datasource and dashboard provider match compose.yaml's mounts")


# --- Bridge settings files --------------------------------------------------------------------

SETTINGS_FILES = [
    DEPLOY / "compose" / "bridge.toml",
    DEPLOY / "kubernetes" / "base" / "bridge.toml",
    DEPLOY / "kubernetes" / "overlays" / "example" / "bridge.toml",
]
FREE_FORM = {("kafka", "librdkafka"), ("signature", "endpoints")}
# Settings that config/default.toml documents in a comment only (absent means "none").
OPTIONAL_SETTINGS = {("kafka", "sasl", "mechanism"): str}
BRIDGE_OWN_LIBRDKAFKA = {"bootstrap.servers", "acks", "enable.idempotence"}
# Secrets that belong in a mounted file (`*_file`), never in a settings file.
SECRET_SETTINGS = [("kafka", "sasl", "password"), ("kafka", "tls", "key_password")]


def deep_merge(into: dict, values: dict) -> dict:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def merged_settings(path: Path) -> dict:
    return deep_merge(tomllib.loads(DEFAULT_SETTINGS.read_text()), tomllib.loads(path.read_text()))


def setting_files(settings: dict) -> list[tuple[str, str, bool, bool]]:
    """(setting, path, holds a secret, re-read on reload) of every file the settings name."""
    files = []
    sig = settings.get("signature", {})
    for path in sig.get("secret_files", []):
        files.append(("signature.secret_files", path, True, True))
    for endpoint, values in sig.get("endpoints", {}).items():
        for path in values.get("secret_files", []):
            files.append((f'signature.endpoints."{endpoint}".secret_files', path, True, True))
    server = settings.get("server", {})
    for key, secret in (("tls_cert_file", False), ("tls_key_file", True)):
        if server.get(key):
            files.append((f"server.{key}", server[key], secret, True))
    kafka = settings.get("kafka", {})
    for key, secret in (("ca_file", False), ("cert_file", False), ("key_file", True)):
        if kafka.get("tls", {}).get(key):
            files.append((f"kafka.tls.{key}", kafka["tls"][key], secret, False))
    if kafka.get("sasl", {}).get("password_file"):
        files.append(("kafka.sasl.password_file", kafka["sasl"]["password_file"], True, False))
    for key in ("redis_password_file", "redis_sentinel_password_file"):
        if settings.get("dedup", {}).get(key):
            files.append((f"dedup.{key}", settings["dedup"][key], True, False))
    return files


def cmd_settings() -> None:
    defaults = tomllib.loads(DEFAULT_SETTINGS.read_text())
    problems = []
    for path in SETTINGS_FILES:
        rel = path.relative_to(REPO)
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            problems.append(f"{rel}: {e}")
            continue
        for section, values in doc.items():
            if section not in defaults or not isinstance(values, dict):
                problems.append(f"{rel}: unknown section [{section}]")
                continue
            for key, value in values.items():
                if (section, key) in FREE_FORM:
                    continue
                if key not in defaults[section]:
                    problems.append(f"{rel}: unknown setting {section}.{key}")
                elif type(value) is not type(defaults[section][key]):
                    problems.append(f"{rel}: {section}.{key} has the wrong type")
                elif isinstance(value, dict):
                    # A sub-table such as [kafka.tls] or [kafka.sasl].
                    for sub, subvalue in value.items():
                        name = f"{section}.{key}.{sub}"
                        expected = OPTIONAL_SETTINGS.get((section, key, sub))
                        if expected is None and sub in defaults[section][key]:
                            expected = type(defaults[section][key][sub])
                        if expected is None:
                            problems.append(f"{rel}: unknown setting {name}")
                        elif type(subvalue) is not expected:
                            problems.append(f"{rel}: {name} has the wrong type")
        lib = doc.get("kafka", {}).get("librdkafka", {})
        for key, value in lib.items():
            if not isinstance(value, str):
                problems.append(f"{rel}: kafka.librdkafka.\"{key}\" must be a string")
            if key in BRIDGE_OWN_LIBRDKAFKA:
                problems.append(f"{rel}: kafka.librdkafka.\"{key}\" is set by the bridge itself")
        structured = [f"kafka.{s}" for s in ("tls", "sasl") if s in doc.get("kafka", {})]
        passthrough = [k for k in lib if k == "security.protocol" or k.startswith(("ssl.", "sasl."))]
        if structured and passthrough:
            problems.append(
                f"{rel}: {', '.join(structured)} and kafka.librdkafka {', '.join(passthrough)} "
                "together (the bridge refuses to start)"
            )
        merged = merged_settings(path)
        if merged["kafka"]["delivery_timeout_ms"] >= merged["server"]["request_timeout_ms"]:
            problems.append(f"{rel}: kafka.delivery_timeout_ms must be below server.request_timeout_ms")
        sig = doc.get("signature", {})
        if sig.get("secrets") or any(e.get("secrets") for e in sig.get("endpoints", {}).values()):
            problems.append(
                f"{rel}: holds signing secrets; they come from a mounted Secret "
                "(signature.secret_files) or the environment"
            )
        for section, table, key in SECRET_SETTINGS:
            if doc.get(section, {}).get(table, {}).get(key):
                problems.append(f"{rel}: holds {section}.{table}.{key}; use a file from a mounted Secret")
        if any(k.endswith("password") for k in lib):
            problems.append(f"{rel}: holds a password in kafka.librdkafka; use kafka.sasl.password_file")
        dedup = doc.get("dedup", {})
        for key in ("redis_password", "redis_sentinel_password"):
            if dedup.get(key):
                problems.append(f"{rel}: holds dedup.{key}; use dedup.{key}_file")
        url = dedup.get("redis_url", "")
        authority = url.split("://", 1)[-1].split("/", 1)[0]
        if "@" in authority and ":" in authority.rsplit("@", 1)[0]:
            problems.append(f"{rel}: dedup.redis_url holds a password; use dedup.redis_password_file")
    if problems:
        raise Failure("\n".join(problems))
    print(f"{len(SETTINGS_FILES)} settings files parse and use only known settings")


def shutdown_budget_secs(settings_path: Path) -> float:
    """SIGTERM's deadlines in turn: requests in flight, the producer's flush and, with the
    shared duplicate store, its writes (each within kafka.flush_timeout_ms)."""
    s = merged_settings(settings_path)
    flushes = 2 if s.get("dedup", {}).get("store", "memory") == "redis" else 1
    return (s["server"]["drain_timeout_ms"] + flushes * s["kafka"]["flush_timeout_ms"]) / 1000


# --- Kubernetes -------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml().safe_load_all(path.read_text()) if d]


def cmd_k8s_split(rendered: str, core_out: str) -> None:
    """Writes the kinds the Kubernetes schemas cover to core_out; names the skipped CRDs."""
    docs = load_docs(Path(rendered))
    core = [d for d in docs if d["kind"] not in CRD_KINDS]
    skipped = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs if d["kind"] in CRD_KINDS)
    Path(core_out).write_text(yaml().safe_dump_all(core, sort_keys=False))
    print(f"{len(core)} resources to validate; not in the schemas, skipped: {', '.join(skipped) or 'none'}")


def selector_matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def cmd_k8s_policy(rendered: str, settings: str) -> None:
    docs = load_docs(Path(rendered))
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    problems = []

    def one(kind: str) -> dict:
        items = by_kind.get(kind, [])
        if len(items) != 1:
            raise Failure(f"expected one {kind}, found {len(items)}")
        return items[0]

    dep = one("Deployment")
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    if not selector_matches(dep["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("Deployment selector does not match its pod labels")
    psc = spec.get("securityContext", {})
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod seccompProfile is not RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("pod mounts a service account token it does not need")
    (container,) = spec["containers"]
    csc = container.get("securityContext", {})
    if not (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if csc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if csc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if "ALL" not in csc.get("capabilities", {}).get("drop", []):
        problems.append("capabilities do not drop ALL")
    image = container["image"]
    if ":" not in image.rsplit("/", 1)[-1] and "@" not in image or image.endswith(":latest"):
        problems.append(f"image {image} has no pinned tag")

    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if ports.get("http") != 8080 or ports.get("admin") != 9090:
        problems.append(f"container ports must be http=8080 and admin=9090, are {ports}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or ports.get(get.get("port"), get.get("port")) != 9090:
            problems.append(f"{probe} must GET {path} on the admin port 9090")

    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    if sleep <= 0:
        problems.append("no preStop sleep")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    budget = shutdown_budget_secs(Path(settings))
    if grace <= sleep + budget:
        problems.append(
            f"terminationGracePeriodSeconds {grace} must exceed preStop {sleep} s + drain and "
            f"flush deadlines {budget} s"
        )

    res = container.get("resources", {})
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(part, {}):
                problems.append(f"resources.{part}.{r} missing")

    mounts = container.get("volumeMounts", [])
    volumes = {v["name"]: v for v in spec.get("volumes", [])}

    def mounted(path: str) -> tuple[dict, dict, str] | None:
        """(mount, volume, key in the volume) of the file `path`, the most specific mount."""
        best = None
        for m in mounts:
            mp = m["mountPath"].rstrip("/")
            if m.get("subPath"):
                if path == mp:
                    found = (m, volumes.get(m["name"], {}), m["subPath"])
                else:
                    continue
            elif path.startswith(mp + "/"):
                found = (m, volumes.get(m["name"], {}), path[len(mp) + 1 :])
            else:
                continue
            if best is None or len(mp) > len(best[0]["mountPath"].rstrip("/")):
                best = found
        return best

    def volume_keys(vol: dict) -> tuple[str, list[str] | None]:
        """(what the volume is, the keys it projects: None for a Secret's, not in the output)."""
        if "configMap" in vol:
            name = vol["configMap"]["name"]
            cms = [c for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"] == name]
            keys = list(cms[0].get("data", {})) if cms else []
            items = vol["configMap"].get("items")
            return f"ConfigMap {name}", [i["path"] for i in items] if items else keys
        if "secret" in vol:
            items = vol["secret"].get("items")
            return f"Secret {vol['secret']['secretName']}", [i["path"] for i in items] if items else None
        return "", None

    # A mount inside another volume's directory would hide in, or collide with, its files.
    for outer in mounts:
        if outer.get("subPath"):
            continue
        for inner in mounts:
            if inner["mountPath"].startswith(outer["mountPath"].rstrip("/") + "/"):
                problems.append(
                    f"{inner['mountPath']} is mounted inside the volume {outer['name']} "
                    f"at {outer['mountPath']}"
                )

    args = container.get("args", [])
    # What the bridge reads: the settings file checked here (compared below with the
    # ConfigMap's copy when the output holds it).
    settings_doc = tomllib.loads(Path(settings).read_text())
    if "--config" not in args:
        problems.append("the bridge is not given --config")
    else:
        cfg = args[args.index("--config") + 1]
        found = mounted(cfg)
        if found is None:
            problems.append(f"{cfg} is on no volume mount")
        else:
            mount, vol, key = found
            what, keys = volume_keys(vol)
            if not what:
                problems.append(f"volume {mount['name']} is neither a ConfigMap nor a Secret")
            elif keys is not None and key not in keys:
                problems.append(f"{what} with key {key} is not in the output")
            elif "configMap" in vol:
                name = vol["configMap"]["name"]
                (cm,) = [c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == name]
                if tomllib.loads(cm["data"][key]) != settings_doc:
                    problems.append(f"the mounted {cfg} (ConfigMap {name}) is not {settings}")

    # Every file the settings name is on a mount: secrets on a Secret volume, files the bridge
    # re-reads on a whole-directory mount (a subPath mount never sees the Secret's updates).
    merged = deep_merge(tomllib.loads(DEFAULT_SETTINGS.read_text()), settings_doc)
    named_files = setting_files(merged)
    for setting, path, secret, reloaded in named_files:
        found = mounted(path)
        if found is None:
            problems.append(f"{setting} {path} is on no volume mount")
            continue
        mount, vol, key = found
        what, keys = volume_keys(vol)
        if secret and "secret" not in vol:
            problems.append(f"{setting} {path} holds a secret but is not on a Secret volume")
        elif secret and vol["secret"].get("defaultMode", 0o644) & 0o007:
            problems.append(f"{setting} {path}: Secret volume {mount['name']} is readable by others (defaultMode)")
        elif not what:
            problems.append(f"{setting} {path}: volume {mount['name']} is neither a ConfigMap nor a Secret")
        elif keys is not None and key not in keys:
            problems.append(f"{setting} {path}: {what} has no key {key}")
        if reloaded and mount.get("subPath"):
            problems.append(f"{setting} {path} is mounted with subPath: updates would never reach it")
        if not mount.get("readOnly"):
            problems.append(f"{setting} {path}: mount {mount['name']} is not readOnly")

    env = {e["name"]: e for e in container.get("env", [])}
    secret_env = env.get("TAMIO_BRIDGE__SIGNATURE__SECRETS")
    if secret_env is not None and not secret_env.get("valueFrom", {}).get("secretKeyRef"):
        problems.append("TAMIO_BRIDGE__SIGNATURE__SECRETS does not come from a secretKeyRef")
    if secret_env is None and not any(f[0].startswith("signature.") for f in named_files):
        problems.append(
            "no signing secret: neither signature.secret_files on a mounted Secret nor "
            "TAMIO_BRIDGE__SIGNATURE__SECRETS from a secretKeyRef"
        )

    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    for name, svc in services.items():
        if not selector_matches(svc["spec"].get("selector", {}), pod_labels):
            problems.append(f"Service {name} selects no bridge pod")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ports and p.get("targetPort") not in ports.values():
                problems.append(f"Service {name} targets port {p.get('targetPort')}, not a container port")
    if len(services) != 2:
        problems.append(f"expected the ingress and the metrics Service, found {sorted(services)}")

    pdb = one("PodDisruptionBudget")
    if not selector_matches(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        problems.append("PodDisruptionBudget selects no bridge pod")
    hpa = one("HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    if ref["kind"] != "Deployment" or ref["name"] != dep["metadata"]["name"]:
        problems.append("HorizontalPodAutoscaler does not scale the Deployment")
    if hpa["spec"].get("minReplicas", 1) < 2:
        problems.append("HorizontalPodAutoscaler minReplicas below 2")
    if "replicas" in dep["spec"]:
        problems.append("Deployment sets replicas although the HorizontalPodAutoscaler owns them")

    sm = one("ServiceMonitor")
    sel = sm["spec"]["selector"]["matchLabels"]
    scraped = [s for s in services.values() if selector_matches(sel, s["metadata"].get("labels", {}))]
    if len(scraped) != 1:
        problems.append(f"ServiceMonitor selects {len(scraped)} Services, expected the metrics one")
    else:
        svc = scraped[0]
        svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            port = svc_ports.get(ep.get("port"))
            if not port or ports.get(port["targetPort"], port["targetPort"]) != 9090:
                problems.append(f"ServiceMonitor endpoint {ep.get('port')} is not the admin port")
            if ep.get("path", "/metrics") != "/metrics":
                problems.append("ServiceMonitor path is not /metrics")
        job = svc["metadata"]["labels"].get(sm["spec"].get("jobLabel", ""), svc["metadata"]["name"])
        if job != "tamio-bridge":
            problems.append(f"scraped as job={job}; the alert rules expect job=tamio-bridge")
    rule = one("PrometheusRule")
    if rule["spec"] != yaml().safe_load(ALERTS.read_text()):
        problems.append("PrometheusRule spec differs from alerts.yml")

    if problems:
        raise Failure("\n".join(problems))
    print(
        f"Deployment, {len(services)} Services, PDB, HPA, ServiceMonitor and PrometheusRule "
        f"consistent (grace {grace} s > {sleep} s + {budget:g} s)"
    )


# --- Compose ----------------------------------------------------------------------------------


def cmd_compose() -> None:
    compose = yaml().safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    problems = []
    for name, svc in services.items():
        image = svc.get("image", "")
        if "build" not in svc and (":" not in image or image.endswith(":latest")):
            problems.append(f"{name}: image {image!r} is not pinned to a version")
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                if not (DEPLOY / src).exists():
                    problems.append(f"{name}: mounts {src}, which does not exist")
    bridge = services["bridge"]
    build = bridge["build"]
    context = (DEPLOY / build["context"]).resolve()
    if not (context / build["dockerfile"]).exists():
        problems.append("bridge: build.dockerfile does not exist in build.context")
    if not bridge.get("read_only"):
        problems.append("bridge: root filesystem is not read-only")
    if str(bridge.get("user", "")).split(":")[0] in ("", "0", "root"):
        problems.append("bridge: runs as root")
    if "ALL" not in bridge.get("cap_drop", []):
        problems.append("bridge: capabilities not dropped")
    if bridge.get("stop_signal") != "SIGTERM":
        problems.append("bridge: stop_signal is not SIGTERM")
    grace = bridge.get("stop_grace_period", "10s")
    grace_s = float(grace.rstrip("s")) if grace.endswith("s") and grace[:-1].isdigit() else 0
    budget = shutdown_budget_secs(DEPLOY / "compose" / "bridge.toml")
    if grace_s <= budget:
        problems.append(f"bridge: stop_grace_period {grace} must exceed {budget:g} s")
    if bridge.get("depends_on", {}).get("kafka-init", {}).get("condition") != "service_completed_successfully":
        problems.append("bridge: does not wait for the topic to be created")
    # The Kafka compose runs is the one the tests run (.ci/kafka/pom.xml pins it).
    pom = (DEPLOY.parent / ".ci" / "kafka" / "pom.xml").read_text()
    tested = re.search(r"<artifactId>kafka_2\.13</artifactId>\s*<version>([^<]+)</version>", pom)
    for name in ("kafka", "kafka-init"):
        image = services[name].get("image", "")
        if not tested or image != f"apache/kafka:{tested.group(1)}":
            problems.append(
                f"{name}: image {image!r} is not the Kafka the tests run "
                f"({tested.group(1) if tested else 'no version in .ci/kafka/pom.xml'})"
            )
    init = " ".join(services["kafka-init"]["command"])
    if "--partitions 6" not in init or "--topic tamio.tickets" not in init:
        problems.append("kafka-init: does not create tamio.tickets with 6 partitions")
    if problems:
        raise Failure("\n".join(problems))
    print(f"{len(services)} services; bridge hardened, images pinned, mounts present")


# --- Dockerfile -------------------------------------------------------------------------------


def cmd_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    froms = [i for i, line in enumerate(lines) if line.upper().startswith("FROM ")]
    problems = []
    if len(froms) < 2:
        problems.append("not multi-stage")
    final = lines[froms[-1] :] if froms else lines
    users = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problems.append("final stage does not switch to a non-root USER")
    elif not users[-1].split(":")[0].isdigit():
        problems.append("USER is not numeric (Kubernetes runAsNonRoot cannot verify a name)")
    if "STOPSIGNAL SIGTERM" not in final:
        problems.append("no STOPSIGNAL SIGTERM in the final stage")
    if not any(line.upper().startswith("ENTRYPOINT [") for line in final):
        problems.append("no exec-form ENTRYPOINT")
    if any(line.upper().startswith(("ADD ", "COPY . ")) for line in lines):
        problems.append("copies the whole context or uses ADD")
    for needed in ("COPY Cargo.toml Cargo.lock", "COPY src", "COPY config", "COPY tests/fixtures", "--locked"):
        if needed not in text:
            problems.append(f"missing `{needed}`")
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for path in ("!Cargo.toml", "!Cargo.lock", "!src/", "!config/", "!tests/fixtures/"):
        if path not in ignore:
            problems.append(f"Dockerfile.dockerignore does not let {path[1:]} in")
    for rel in ("Cargo.toml", "Cargo.lock", "src/main.rs", "config/default.toml",
                "tests/fixtures/whitelabel_ticket_created.json"):
        if not (REPO / rel).exists():
            problems.append(f"{rel}, needed by the build, does not exist")
    if problems:
        raise Failure("\n".join(problems))
    print("multi-stage, non-root numeric USER, STOPSIGNAL SIGTERM, exec ENTRYPOINT, build inputs present")


COMMANDS = {
    "prometheusrule": cmd_prometheusrule,
    "prometheusrule-sync": cmd_prometheusrule_sync,
    "alert-annotations": cmd_alert_annotations,
    "metric-names": cmd_metric_names,
    "dashboard": cmd_dashboard,
    "dashboard-rules": cmd_dashboard_rules,
    "grafana-provisioning": cmd_grafana_provisioning,
    "settings": cmd_settings,
    "k8s-split": cmd_k8s_split,
    "k8s-policy": cmd_k8s_policy,
    "compose": cmd_compose,
    "dockerfile": cmd_dockerfile,
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: {sys.argv[0]} {{{'|'.join(COMMANDS)}}} [args]", file=sys.stderr)
        return 2
    try:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    except Failure as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
