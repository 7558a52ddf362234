"""The deployment files: Prometheus alert rules, the Grafana dashboard, and the Dockerfile.

The metric names in the rules and the dashboard are checked against what the gateway's own
registry exports, so a renamed metric or a typo fails here rather than in production.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import need_programs
from gateway.shell.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "gateway-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gateway-dashboard.json"
DOCKERFILE = ROOT / "Dockerfile"

SEVERITIES = {"info", "warning", "critical"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Metrics the files may name that the gateway does not export: Prometheus's own.
NON_GATEWAY_METRICS = {"up"}
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                   "offset", "bool", "atan2", "inf", "nan"}


# ---------------------------------------------------------------- loading

def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    """Every panel, rows' collapsed panels included, rows themselves left out."""
    out = []
    for panel in dashboard()["panels"]:
        if panel.get("type") == "row":
            out.extend(panel.get("panels", []))
        else:
            out.append(panel)
    return out


def all_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every expression in both files."""
    exprs = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules() if "expr" in r]
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            exprs.append((f"panel {panel.get('title')!r}", target["expr"]))
    for var in dashboard()["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            # Grafana's label_values(SELECTOR, LABEL): the selector is PromQL, the label is not
            match = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query)
            exprs.append((f"variable {var['name']}", match.group(1) if match else query))
    return exprs


def exported_names() -> set[str]:
    """The series names a scrape of the gateway can carry, from its own registry.

    The text parser reports a counter `gateway_requests_total` as family `gateway_requests`
    and a labelled metric with no children yet has no samples, so names are completed by
    type: counters answer to NAME_total, histograms to NAME_bucket/_sum/_count.
    """
    text = Metrics().render().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.add(family.name)
            names.update(family.name + suffix for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(family.name)
    return names


def strip_histogram_suffix(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def gateway_names(expr: str) -> set[str]:
    """Identifiers starting with gateway_, histogram suffixes removed."""
    return {strip_histogram_suffix(n) for n in re.findall(r"(?<![A-Za-z0-9_:])gateway_[A-Za-z0-9_:]*", expr)}


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (any prefix), by removing all else."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    e = re.sub(r"\{[^{}]*\}", " ", e)  # label matchers
    e = re.sub(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*", " ", e)  # Grafana variables
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", e)
    names = set()
    for match in re.finditer(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", e):
        name, is_call = match.group(1), match.group(2)
        if is_call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


# ---------------------------------------------------------------- (a) alert rules

def test_alert_rules_structure():
    doc = yaml.safe_load(ALERTS.read_text())
    assert isinstance(doc, dict) and set(doc) == {"groups"}
    assert doc["groups"], "no rule groups"
    group_names = [g["name"] for g in doc["groups"]]
    assert len(group_names) == len(set(group_names)), f"duplicate group names: {group_names}"
    seen = set()
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules", "labels", "query_offset"}, group.keys()
        assert group["rules"], f"group {group['name']} has no rules"
        for rule in group["rules"]:
            name = rule.get("alert")
            assert isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), rule
            assert name not in seen, f"duplicate alert {name}"
            seen.add(name)
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule.keys()
            assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), name
            assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", str(rule.get("for", ""))), f"{name}: for {rule.get('for')!r}"
            assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity"
            annotations = rule.get("annotations", {})
            assert annotations.get("summary"), f"{name}: no summary"
            assert annotations.get("description"), f"{name}: no description"
            for text in list(annotations.values()) + list(rule["labels"].values()):
                assert text.count("{{") == text.count("}}"), f"{name}: unbalanced template in {text!r}"
            assert rule["expr"].count("(") == rule["expr"].count(")"), f"{name}: unbalanced parentheses"


def test_alert_rules_cover_the_required_signals():
    rules = alert_rules()
    by_metric: dict[str, list[dict]] = {}
    for rule in rules:
        for name in metric_names(rule["expr"]):
            by_metric.setdefault(name, []).append(rule)
    for metric in ("gateway_certificate_expiry_timestamp_seconds", "gateway_denied_total", "gateway_requests_total",
                   "gateway_ready", "up", "gateway_tls_handshake_failures_total", "gateway_rate_limited_total",
                   "gateway_audit_records_dropped_total", "gateway_config_reloads_total"):
        assert metric in by_metric, f"no alert on {metric}"

    expiry = by_metric["gateway_certificate_expiry_timestamp_seconds"]
    assert any("14 * 86400" in r["expr"] for r in expiry)
    assert all("$labels.certificate" in r["annotations"]["summary"] for r in expiry)
    assert any(r["labels"]["severity"] == "critical" for r in expiry), "no critical alert once expired"
    assert any(r["labels"]["severity"] != "critical" for r in expiry), "no early warning before expiry"
    assert any('status=~"5.."' in r["expr"] for r in by_metric["gateway_requests_total"])
    assert any(re.search(r"gateway_ready\s*==\s*0", r["expr"]) and r["for"] == "2m" for r in by_metric["gateway_ready"])
    assert any(re.search(r"\bup\s*(\{[^}]*\})?\s*==\s*0", r["expr"]) for r in by_metric["up"])
    assert any(re.search(r"increase\(gateway_audit_records_dropped_total\[5m\]\)\s*>\s*0", r["expr"])
               for r in by_metric["gateway_audit_records_dropped_total"])
    assert any('result="error"' in r["expr"] and "[15m]" in r["expr"]
               for r in by_metric["gateway_config_reloads_total"])


def need_promtool() -> str:
    """promtool (Debian's prometheus package); under CI=true its absence is a failure, not a skip."""
    need_programs("promtool")   # Debian's prometheus package
    return shutil.which("promtool")


def test_what_the_files_tell_operators_says_changed_files_are_picked_up():
    """Files are watched (reload.watch_s); SIGHUP is the other way, not the only one."""
    texts = [v for r in alert_rules() for v in r.get("annotations", {}).values()]
    texts += [p.get("description", "") for p in dashboard_panels()]
    lonely = [t for t in texts if "SIGHUP" in t and "watch" not in t]
    assert not lonely, lonely


def test_alert_rules_promtool():
    result = subprocess.run([need_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_on_what_they_should_and_only_that():
    """promtool's unit tests of the rules: misuse denials alert, order_not_visible does not, and more."""
    tests = Path(__file__).resolve().parent / "promtool" / "gateway-alerts.test.yml"
    result = subprocess.run([need_promtool(), "test", "rules", str(tests)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- (b) dashboard

def test_dashboard_structure():
    d = dashboard()
    assert isinstance(d.get("schemaVersion"), int) and d["schemaVersion"] >= 36
    assert d.get("title") and d.get("uid")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    client = variables["client"]
    query = client["query"]["query"] if isinstance(client["query"], dict) else client["query"]
    assert query == "label_values(gateway_requests_total, client)"
    assert client["datasource"]["uid"] == "${DS_PROMETHEUS}"

    panels = dashboard_panels()
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        title = panel.get("title")
        assert title, panel
        assert panel.get("datasource", {}).get("uid") == "${DS_PROMETHEUS}", title
        assert panel.get("targets"), f"panel {title!r} has no targets"
        ref_ids = [t.get("refId") for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"panel {title!r}: duplicate refIds"
        for target in panel["targets"]:
            assert isinstance(target.get("expr"), str) and target["expr"].strip(), f"panel {title!r}: empty expr"
            assert target["expr"].count("(") == target["expr"].count(")"), f"panel {title!r}: unbalanced parentheses"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title


def test_dashboard_covers_the_required_panels():
    exprs = " ".join(e for where, e in all_exprs() if where.startswith("panel"))
    for metric in ("gateway_requests_total", "gateway_denied_total", "gateway_would_deny_total",
                   "gateway_rate_limited_total", "gateway_tls_handshake_failures_total",
                   "gateway_certificate_expiry_timestamp_seconds", "gateway_audit_records_total",
                   "gateway_ready", "gateway_config_reloads_total"):
        assert metric in exprs, f"no panel shows {metric}"
    for histogram in ("gateway_request_duration_seconds", "gateway_upstream_duration_seconds"):
        for q in ("0.5", "0.95", "0.99"):
            assert re.search(rf"histogram_quantile\({q},[^;]*?rate\({histogram}_bucket(\{{[^}}]*\}})?\[", exprs), (histogram, q)
    assert 'client=~"$client"' in exprs


def test_dashboard_has_job_and_instance_variables():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    for name in ("job", "instance"):
        var = variables[name]
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert var["type"] == "query" and re.fullmatch(rf"label_values\(gateway_\w+.*, {name}\)", query), name
        assert var["multi"] and var["includeAll"] and var["datasource"]["uid"] == "${DS_PROMETHEUS}", name


def test_every_panel_query_filters_by_job_and_instance():
    """Several gateways are told apart: each selector of a gateway metric carries both variables."""
    unfiltered = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            for match in re.finditer(r"\b(gateway_\w+)(\{[^}]*\})?", target["expr"]):
                selector = match.group(2) or ""
                if 'job=~"$job"' not in selector or 'instance=~"$instance"' not in selector:
                    unfiltered.append(f"{panel['title']!r}: {match.group(0)}")
    assert not unfiltered, "selectors without job/instance:\n" + "\n".join(unfiltered)


def test_latency_panels_do_not_pretend_to_filter_by_client():
    """The duration histograms have no client label: their panels must neither filter nor group by it."""
    latency = [p for p in dashboard_panels()
               if any("_duration_seconds" in t["expr"] for t in p["targets"])]
    assert len(latency) >= 4
    for panel in latency:
        exprs = " ".join(t["expr"] for t in panel["targets"])
        legends = " ".join(t.get("legendFormat", "") for t in panel["targets"])
        assert "client" not in exprs and "client" not in legends, panel["title"]
        assert "client" not in panel["title"].lower(), panel["title"]
        assert "$client" not in panel.get("description", ""), panel["title"]
        assert "no client label" in panel.get("description", ""), panel["title"]


# ---------------------------------------------------------------- (c) metric names

def test_metric_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (le, operation) (rate(gateway_request_duration_seconds_bucket'
            '{client=~"$client", x="gateway_not_a_metric"}[$__rate_interval]))) and on(instance) up offset 5m'
            ' > 3 * sum without (reason) (gatway_typo_total)')
    assert gateway_names(expr) == {"gateway_request_duration_seconds", "gateway_not_a_metric"}
    assert metric_names(expr) == {"gateway_request_duration_seconds_bucket", "up", "gatway_typo_total"}


def test_exported_names_come_from_the_registry():
    names = exported_names()
    assert "gateway_requests_total" in names
    assert "gateway_request_duration_seconds" in names
    assert "gateway_ready" in names
    assert "gateway_requests_totl" not in names


def test_every_gateway_metric_named_exists():
    exported = exported_names()
    missing = []
    for where, expr in all_exprs():
        for name in sorted(gateway_names(expr)):
            if name not in exported:
                missing.append(f"{where}: {name}")
    assert not missing, "metrics the gateway does not export:\n" + "\n".join(missing)


def test_every_metric_selected_exists():
    """Catches typos the gateway_ pattern cannot see (`gatway_...`), and strays like `requests_total`."""
    exported = exported_names() | NON_GATEWAY_METRICS
    unknown = []
    for where, expr in all_exprs():
        for name in sorted(metric_names(expr)):
            if strip_histogram_suffix(name) not in exported and name not in exported:
                unknown.append(f"{where}: {name}")
    assert not unknown, "unknown metric names:\n" + "\n".join(unknown)


def test_files_name_every_exported_metric():
    """The other way round: nothing the gateway exports is left off both files."""
    named = set()
    for _, expr in all_exprs():
        named |= {strip_histogram_suffix(n) for n in metric_names(expr)}
    roots = set()
    for family in text_string_to_metric_families(Metrics().render().decode()):
        if family.name.endswith("_created"):
            continue
        roots.add(family.name + "_total" if family.type == "counter" else family.name)
    assert not roots - named, f"exported but neither shown nor alerted on: {sorted(roots - named)}"


# ---------------------------------------------------------------- (d) Dockerfile

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        buf = ""
    if buf.strip():
        keyword, _, args = buf.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def split_args(args: str) -> list[str]:
    """Exec (JSON) form or shell form."""
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def strip_flags(words: list[str]) -> tuple[dict[str, str], list[str]]:
    flags, rest = {}, []
    for w in words:
        if w.startswith("--") and not rest:
            key, _, value = w[2:].partition("=")
            flags[key] = value
        else:
            rest.append(w)
    return flags, rest


def test_dockerfile_copy_sources_exist():
    copies = [(k, a) for k, a in dockerfile_instructions() if k in ("COPY", "ADD")]
    assert copies, "no COPY"
    missing = []
    for keyword, args in copies:
        flags, words = strip_flags(split_args(args))
        if "from" in flags:  # from another stage or image, not the build context
            continue
        assert len(words) >= 2, f"{keyword} {args}"
        for source in words[:-1]:
            if keyword == "ADD" and re.match(r"https?://|git@", source):
                continue
            if any(ch in source for ch in "*?["):
                if not list(ROOT.glob(source)):
                    missing.append(source)
            elif not (ROOT / source).exists():
                missing.append(source)
    assert not missing, f"COPY sources missing from the repository: {missing}"


def test_dockerfile_runs_as_non_root_user():
    instructions = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    final = instructions[last_from:]
    users = [(i, a.split(":")[0].strip()) for i, (k, a) in enumerate(final) if k == "USER"]
    assert users, "no USER in the final stage: the process runs as root"
    last_user_index, user = users[-1]
    assert user not in ("root", "0", ""), f"USER {user}"
    runs = [i for i, (k, _) in enumerate(final) if k == "RUN"]
    assert not runs or last_user_index > max(runs), "USER must come after the last RUN"


def test_dockerfile_healthcheck_on_healthz():
    checks = [a for k, a in dockerfile_instructions() if k == "HEALTHCHECK"]
    assert checks, "no HEALTHCHECK"
    assert not any(a.strip().upper() == "NONE" for a in checks)
    assert "/healthz" in checks[-1], checks[-1]
    assert re.search(r"(^|\s)CMD(\s|\[)", checks[-1]), checks[-1]


def test_dockerfile_runs_gateway_serve():
    instructions = dockerfile_instructions()
    entrypoint = [split_args(a) for k, a in instructions if k == "ENTRYPOINT"]
    cmd = [split_args(a) for k, a in instructions if k == "CMD"]
    argv = (entrypoint[-1] if entrypoint else []) + (cmd[-1] if cmd else [])
    if argv[:2] == ["/bin/sh", "-c"] or argv[:2] == ["sh", "-c"]:
        argv = shlex.split(argv[2])
    if argv[:3] in (["python", "-m", "gateway"], ["python3", "-m", "gateway"]):
        argv = ["gateway"] + argv[3:]
    assert argv and Path(argv[0]).name == "gateway" and argv[1:2] == ["serve"], f"runs {argv}"


def test_dockerfile_base_image_is_slim_python():
    froms = [a for k, a in dockerfile_instructions() if k == "FROM"]
    assert froms, "no FROM"
    _, words = strip_flags(froms[-1].split())
    image = words[0]
    match = re.fullmatch(r"(?:docker\.io/)?(?:library/)?python:3\.(\d+)(?:\.\d+)?-slim(?:-[a-z]+)?(?:@sha256:[0-9a-f]{64})?",
                         image)
    assert match, f"base image {image} is not python:3.X-slim"
    assert int(match.group(1)) >= 11, f"base image {image} is older than Python 3.11"


def test_dockerfile_pins_the_base_image_and_uses_exec_forms():
    froms = [a for k, a in dockerfile_instructions() if k == "FROM"]
    image = strip_flags(froms[-1].split())[1][0]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), f"unpinned: {image}"
    check = [a for k, a in dockerfile_instructions() if k == "HEALTHCHECK"][-1]
    assert re.search(r"CMD \[", check), "HEALTHCHECK is not in exec form"
    json.loads(check[check.index("CMD") + 3:])  # a JSON array: no shell in between


def test_the_image_carries_no_example_policies_keys_or_data():
    copies = [split_args(a) for k, a in dockerfile_instructions() if k in ("COPY", "ADD")]
    sources = [s for words in copies for s in strip_flags(words)[1][:-1]]
    assert not any(s.startswith(("policies", "certs", "data")) for s in sources), sources
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, "the build context is not deny-all"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "requirements.lock", "requirements-build.lock", "gateway",
                       "deploy/container-config.yaml", "directory.yaml"}
