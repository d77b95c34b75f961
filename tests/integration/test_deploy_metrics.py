"""deploy/: every metric name (and every label value a selector names) in
the Grafana dashboard's PromQL and in the Prometheus alerts exists in a
real /metrics scrape of a running idemgate, so neither can drift from
METRICS(X). Histograms count under their _bucket, _sum and _count series
(the bare name is no series). Also: the dashboard is well-formed (unique
panel ids, a datasource and an expression on every target)."""

import json
import os
import re

import pytest

from idemtest.http import request
from idemtest.procs import free_port, wait_port

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "idemgate.json")
ALERTS = os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")

# Series Prometheus makes itself, and labels the scrape adds.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
TARGET_LABELS = {"job", "instance"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan", "atan2"}


# ---------------------------------------------------------------- PromQL

def _strip(expr):
    """expr without Grafana variables ($x, ${x}, [[x]]), comments and
    string literals (each string becomes "")."""
    expr = re.sub(r"#[^\n]*", "", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    return expr


def selectors(expr):
    """[(metric, {label: (op, value)})] of each vector selector of expr."""
    expr = re.sub(r"#[^\n]*", "", expr)
    out = []
    # A selector: a name, optional {matchers}; or {matchers} alone.
    string = r'"(?:[^"\\]|\\.)*"'
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{((?:[^{}\"]|%s)*)\}" % string, expr):
        name, body = m.group(1), m.group(2)
        matchers = {}
        for mm in re.finditer(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(%s)' % string, body):
            matchers[mm.group(1)] = (mm.group(2), json.loads(mm.group(3)))
        if name is None or name in KEYWORDS:
            name = matchers.get("__name__", ("=", None))[1]
        out.append((name, matchers))
    return out


def metric_names(expr):
    """The metric names expr reads: identifiers that are not functions,
    keywords, label lists (by/without/on/ignoring/group_*), matchers or
    durations."""
    s = _strip(expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)  # matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{[^}]*\}|\$[A-Za-z_]\w*", " ", s)
    names = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_:.])(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", s):
        tok, call = m.group(1), m.group(2)
        if tok[0].isdigit() or call or tok.lower() in KEYWORDS:
            continue
        names.add(tok)
    for name, _ in selectors(expr):
        if name:
            names.add(name)
    return names


def test_extractor():
    e = ('histogram_quantile(0.99, sum by (job, le) (rate(a_b_bucket{instance=~"$instance", '
         'x="}{"}[$__rate_interval]))) / on(instance) group_left b_total offset 5m > bool 1e-9 '
         'and c unless sum without (state) (d{state!="done"})')
    assert metric_names(e) == {"a_b_bucket", "b_total", "c", "d"}
    assert selectors('m{outcome="lost", state=~"a|b"}') == [
        ("m", {"outcome": ("=", "lost"), "state": ("=~", "a|b")})]


# ------------------------------------------------------------ the files

def dashboard_exprs():
    with open(DASHBOARD) as f:
        d = json.load(f)
    exprs = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels") or [])
            for t in p.get("targets") or []:
                exprs.append(("panel %r" % p.get("title"), t.get("expr", "")))
    walk(d.get("panels") or [])
    for v in (d.get("templating") or {}).get("list") or []:
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.match(r"\s*label_values\(\s*([^,)]*?)\s*(?:,\s*(\w+))?\s*\)\s*$", q)
        if m:
            exprs.append(("variable %s" % v.get("name"), m.group(1)))
        elif v.get("type") == "query":
            exprs.append(("variable %s" % v.get("name"), q))
    return exprs


def alert_exprs():
    with open(ALERTS) as f:
        text = f.read()
    n_alerts = len(re.findall(r"^\s*- alert:", text, re.M))
    try:
        import yaml
        doc = yaml.safe_load(text)
        exprs = [("alert %s" % r.get("alert") or r.get("record"), r["expr"])
                 for g in doc["groups"] for r in g["rules"]]
    except ImportError:
        # No python3-yaml: the expr: entries of this file are plain scalars
        # or | blocks.
        exprs = []
        lines = text.splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^(\s*)expr:\s*(\|[-+]?|>[-+]?)?\s*(.*)$", line)
            if not m:
                continue
            if m.group(2) is None:
                exprs.append(("line %d" % (i + 1), m.group(3)))
                continue
            body = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(m.group(1)):
                    break
                body.append(nxt)
            exprs.append(("line %d" % (i + 1), "\n".join(body)))
    assert len(exprs) == n_alerts, "found %d expressions for %d alerts" % (len(exprs), n_alerts)
    return exprs


def test_dashboard_shape():
    with open(DASHBOARD) as f:
        d = json.load(f)
    assert d.get("title") and d.get("uid") and isinstance(d.get("schemaVersion"), int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p.get("datasource") and p.get("targets"), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("expr", "").strip(), p["title"]
            assert metric_names(t["expr"]), "%s: no metric in %r" % (p["title"], t["expr"])
    # What the issue asks the dashboard to show.
    text = json.dumps(d)
    for needed in ("idemgate_requests_total", 'outcome=\\"replayed\\"', "histogram_quantile",
                   "idemgate_store_duration_seconds_bucket", "idemgate_store_errors_total",
                   "idemgate_connections_active", "idemgate_store_evictions_total",
                   "idemgate_exchanges{", "idemgate_client_connections{"):
        assert needed in text, needed


# ------------------------------------------------------- against /metrics

def scrape(idemgate):
    """The live exposition of an idemgate with the memory store (which adds
    its own rows to the ones every store has): {sample name: {label:
    {values}}} and the set of histogram base names."""
    admin = free_port()
    idemgate({"upstream": "http://127.0.0.1:9", "store": "memory",
              "admin": {"listen": "127.0.0.1:%d" % admin}})
    assert wait_port(admin)
    r = request(admin, "GET", "/metrics")
    assert r.status == 200
    series, histograms = {}, set()
    for line in r.body.decode().splitlines():
        m = re.match(r"#\s*TYPE\s+(\S+)\s+histogram", line)
        if m:
            histograms.add(m.group(1))
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s", line)
        assert m, line
        labels = series.setdefault(m.group(1), {})
        for lm in re.finditer(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""):
            labels.setdefault(lm.group(1), set()).add(lm.group(2))
    return series, histograms


def check_expr(where, expr, series, histograms):
    errors = []
    for name in sorted(metric_names(expr)):
        if name in SYNTHETIC:
            continue
        if name in histograms:
            errors.append("%s: %s is a histogram: use %s_bucket, _sum or _count"
                          % (where, name, name))
        elif name not in series:
            errors.append("%s: %s is not in /metrics" % (where, name))
    for name, matchers in selectors(expr):
        if name not in series:
            continue
        for label, (op, value) in matchers.items():
            if label in TARGET_LABELS or label == "__name__" or "$" in value:
                continue
            have = series[name].get(label)
            if have is None:
                errors.append("%s: %s has no label %s" % (where, name, label))
            elif op == "=" and value not in have:
                errors.append("%s: %s{%s=%r}: no such value (%s)"
                              % (where, name, label, value, ", ".join(sorted(have))))
            elif op == "=~" and not any(re.fullmatch(value, v) for v in have):
                errors.append("%s: %s{%s=~%r} matches no value (%s)"
                              % (where, name, label, value, ", ".join(sorted(have))))
            elif op == "=~":
                for alt in value.split("|"):
                    if re.fullmatch(r"[A-Za-z0-9_]+", alt) and alt not in have:
                        errors.append("%s: %s{%s=~...}: %r is no value (%s)"
                                      % (where, name, label, alt, ", ".join(sorted(have))))
            elif op == "!=" and value not in have:
                errors.append("%s: %s{%s!=%r}: no such value" % (where, name, label, value))
    return errors


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_exists(idemgate, source):
    series, histograms = scrape(idemgate)
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    assert exprs
    errors, names = [], set()
    for where, expr in exprs:
        errors += check_expr(where, expr, series, histograms)
        names |= metric_names(expr)
    assert not errors, "\n".join(errors)
    print("%s: %d expressions, %d metric names, all in /metrics" % (source, len(exprs), len(names)))


def test_a_planted_drift_is_caught(idemgate):
    """The check is not vacuous: a misspelled metric, a bare histogram name
    and an unknown label value are each reported."""
    series, histograms = scrape(idemgate)
    errs = check_expr("t", 'rate(idemgate_request_total[5m])', series, histograms)
    assert errs and "idemgate_request_total" in errs[0]
    errs = check_expr("t", 'rate(idemgate_store_duration_seconds[5m])', series, histograms)
    assert errs and "histogram" in errs[0]
    errs = check_expr("t", 'idemgate_requests_total{outcome="replay"}', series, histograms)
    assert errs and "replay" in errs[0]
    errs = check_expr("t", 'idemgate_requests_total{outcome=~"lost|store_errors"}', series,
                      histograms)
    assert errs and "store_errors" in errs[0]
    assert not check_expr("t", 'sum by (le) (rate(idemgate_upstream_duration_seconds_bucket'
                          '{instance=~"$instance"}[$__rate_interval]))', series, histograms)
