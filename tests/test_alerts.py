"""The alert rules and the Grafana dashboard in config/: valid for their tools, every alert
unit-tested by `promtool test rules`, and every metric they use one the real daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from devtools import REPO
from devtools.daemon import Daemon, base_config
from devtools.traffic import octet_counted, send_tcp, traditional
from tests.conftest import intake_section
from tests.fake_intake import FakeIntake
from tests.test_metrics import http_get
from tests.test_tls import SERVER_NAME, Pki

RULES = REPO / "config" / "prometheus" / "haproxy-forwarder-alerts.yml"
RULE_TESTS = REPO / "tests" / "prometheus" / "haproxy-forwarder-alerts-test.yml"
DASHBOARD = REPO / "config" / "grafana" / "haproxy-forwarder-dashboard.json"
README = REPO / "README.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`)")
# Metric names in PromQL: ours, and the process_* ones the daemon exports beside them.
METRIC = re.compile(r"\b(?:haproxy_forwarder|process)_[a-z_]+\b")


def alerts() -> dict[str, str]:
    """{alert name: expr} (one-line exprs: the file keeps them so, for this and for grep)."""
    text = RULES.read_text()
    names = re.findall(r"^\s+- alert: (\S+)$", text, re.M)
    exprs = re.findall(r"^\s+expr: (.+)$", text, re.M)
    assert len(names) == len(exprs) > 0
    return dict(zip(names, exprs, strict=True))


def dashboard_exprs(dash: dict[str, Any]) -> Iterator[str]:
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            yield var["definition"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[frozenset[str]]]:
    """{sample name: the label-name sets of its samples} of one real scrape (after some
    traffic and a delivery). A counter family declared with no sample yet (refusals by
    reason, before the first) counts as exported, with no label set."""
    tmp = tmp_path_factory.mktemp("alerts")
    with FakeIntake() as fi:
        # TLS and RELP listeners too, so that their series are in the scrape.
        cert, key = Pki(tmp, trustme.CA(), trustme.CA()).leaf(SERVER_NAME)
        cfg = base_config(tmp, intake=intake_section(fi),
                          tls={"cert_file": str(cert), "key_file": str(key)})
        cfg["listen"]["tls"] = ["127.0.0.1:0"]
        cfg["listen"]["relp"] = ["127.0.0.1:0"]
        d = Daemon(tmp, cfg)
        with d:
            send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "for the scrape")]))
            assert fi.wait_for(1, 15)
            status, _, body = http_get(d.status_port, "/metrics")
            assert status == 200
    out: dict[str, set[frozenset[str]]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        if fam.type == "counter":
            out.setdefault(fam.name + "_total", set())
        for s in fam.samples:
            out.setdefault(s.name, set()).add(frozenset(s.labels) - {"le"})
    return out


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    assert PROMTOOL is not None
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


@needs_promtool
def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say() -> None:
    assert PROMTOOL is not None
    out = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\S+)", RULE_TESTS.read_text()))
    assert tested == set(alerts())


def test_rules_and_dashboard_use_only_metrics_the_daemon_exports(
        exported: dict[str, set[frozenset[str]]]) -> None:
    used: dict[str, set[str]] = {}
    for name, expr in alerts().items():
        for metric in METRIC.findall(expr):
            used.setdefault(metric, set()).add(f"alert {name}")
    for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
        for metric in METRIC.findall(expr):
            used.setdefault(metric, set()).add("dashboard")
    assert len(used) >= 20  # the regex did find them
    missing = {m: sorted(where) for m, where in used.items() if m not in exported}
    assert not missing, f"not on the daemon's /metrics: {missing}"


# Series an alert compares one to one (`and`, `/`, `or`): the same labels on both sides, or the
# alert never matches; and the per-intake counters alerts group `by (intake)`.
PAIRED = (("haproxy_forwarder_seconds_since_last_delivery", "haproxy_forwarder_backlog_batches"),
          ("haproxy_forwarder_spool_bytes", "haproxy_forwarder_spool_max_bytes"))
PER_INTAKE = ("haproxy_forwarder_dead_lettered_events_total",
              "haproxy_forwarder_dropped_events_total",
              "haproxy_forwarder_intake_key_rejected_total",
              "haproxy_forwarder_spool_dropped_events_total",
              "haproxy_forwarder_spool_corrupt_records_total")


def test_series_an_alert_matches_one_to_one_have_the_same_labels(
        exported: dict[str, set[frozenset[str]]]) -> None:
    for left, right in PAIRED:
        assert exported[left] == exported[right], (left, exported[left], right,
                                                   exported[right])
    # spool_blocked `or` the spool's drops: one alert per intake only if both say which.
    assert exported["haproxy_forwarder_spool_blocked"] <= {frozenset(), frozenset({"intake"})}
    for name in PER_INTAKE:
        assert exported[name] and all("intake" in s for s in exported[name]), name


def test_dashboard_is_importable_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    (ds,) = dash["__inputs"]
    assert (ds["name"], ds["type"], ds["pluginId"]) == ("DS_PROMETHEUS", "datasource",
                                                        "prometheus")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("listener", "accepted", "delivered", "latency", "status class", "spool",
                  "backpressure", "dead letters", "build"):
        assert topic in titles, topic


def test_readme_says_what_to_do_for_every_alert() -> None:
    text = README.read_text()
    section = text.split("\n## Alerts\n", 1)[1].split("\n## ", 1)[0]
    for name in alerts():
        assert f"`{name}`" in section, name
