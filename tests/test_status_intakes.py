"""`haproxy-forwarder status` with several intakes (issue 19): the totals summed over the
`intake` label as before, and one line (one "intakes" entry in --json) per intake: rates in
and out, backlog, last delivery, failing, paused; never a key.

The report built and laid out from canned /healthz and /metrics answers, then the real daemon
with two intakes on two FakeIntakes (distinct keys), one of them down."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import Daemon, base_config, run_cli
from devtools.probe import wait_until
from devtools.traffic import octet_counted, send_tcp, traditional
from haproxy_forwarder import statusreport as sr
from tests.conftest import intake_section
from tests.fake_intake import FakeIntake
from tests.test_cli import _rows

P = "haproxy_forwarder_"
NOW = 1_800_000_000.0
# Distinct 32-character keys, one per intake: neither may ever be printed.
KEY_SIEM = "S1em" * 8
KEY_ARCHIVE = "Arch" * 8


def metrics_text(siem: dict[str, float], archive: dict[str, float]) -> str:
    """A /metrics body as the daemon writes it with the intakes "siem" and "archive": per-intake
    counters (one with a `reason`), per-intake gauges, and unlabelled or otherwise labelled
    series."""
    lines = [f'{P}build_info{{version="9.9",ingest="native"}} 1',
             f'{P}received_frames_total{{listener="tcp://127.0.0.1:1514",framing="octet"}} 40',
             f"{P}paused 0",
             f'{P}events_held{{where="memory"}} 0',
             f'{P}events_held{{where="spool"}} {siem["held"] + archive["held"]}']
    for name, v in (("siem", siem), ("archive", archive)):
        lines += [
            f'{P}accepted_events_total{{intake="{name}"}} {v["accepted"]}',
            f'{P}delivered_events_total{{intake="{name}"}} {v["delivered"]}',
            f'{P}dead_lettered_events_total{{intake="{name}",reason="rejected"}} {v["dead"]}',
            f'{P}dead_lettered_events_total{{intake="{name}",reason="too_large"}} 0',
            f'{P}dropped_events_total{{intake="{name}",reason="shutdown"}} 0',
            f'{P}requeued_events_total{{intake="{name}"}} 0',
            f'{P}spool_recovered_events_total{{intake="{name}"}} 0',
            f'{P}spool_dropped_events_total{{intake="{name}"}} 0',
            f'{P}backlog_batches{{intake="{name}"}} {v["backlog"]}',
            f'{P}in_memory_batches{{intake="{name}"}} {v["memory"]}',
            f'{P}spool_batches{{intake="{name}"}} {v["backlog"] - v["memory"]}',
            f'{P}spool_events{{intake="{name}"}} {v["held"]}',
            f'{P}spool_bytes{{intake="{name}"}} {100 * v["held"]}',
            f'{P}spool_oldest_age_seconds{{intake="{name}"}} {v["age"]}',
            f'{P}intake_failing{{intake="{name}"}} {v["failing"]}',
            f'{P}intake_paused{{intake="{name}"}} {v["paused"]}',
            f'{P}last_delivery_timestamp_seconds{{intake="{name}"}} {v["last"]}',
            f'{P}seconds_since_last_delivery{{intake="{name}"}} {NOW - v["last"]}',
        ]
    return "\n".join(lines) + "\n"


SIEM = {"accepted": 30, "delivered": 30, "dead": 0, "backlog": 0, "memory": 0, "held": 0,
        "age": 0, "failing": 0, "paused": 0, "last": NOW - 2.0}
ARCHIVE = {"accepted": 10, "delivered": 4, "dead": 1, "backlog": 3, "memory": 1, "held": 5,
           "age": 42.5, "failing": 1, "paused": 1, "last": NOW - 600.0}
HEALTH = {"status": "failing",
          "reasons": ["intake archive: 3 batches waiting and nothing delivered for 600 s"],
          "intake_failing": True, "backlog_batches": 3, "seconds_since_last_delivery": 600.0,
          # The daemon's order (the config's), not the alphabet's.
          "intakes": {"siem": {"intake_failing": False, "backlog_batches": 0,
                               "seconds_since_last_delivery": 2.0},
                      "archive": {"intake_failing": True, "backlog_batches": 3,
                                  "seconds_since_last_delivery": 600.0}}}


def scrape(text: str, at: float) -> sr.Scrape:
    parsed = sr.parse(text)
    return sr.Scrape(at, parsed.values, parsed.build, parsed.intakes)


def canned() -> dict[str, Any]:
    """The report of two scrapes 2 s apart: siem took in and delivered 20 events meanwhile,
    archive took in 4 and delivered none."""
    first = scrape(metrics_text({**SIEM, "accepted": 10, "delivered": 10},
                                {**ARCHIVE, "accepted": 6}), 100.0)
    last = scrape(metrics_text(SIEM, ARCHIVE), 102.0)
    return sr.summarise("http://127.0.0.1:9514", False, HEALTH, last, first, NOW)


def test_the_totals_sum_the_intakes_and_fold_times_and_ages() -> None:
    report = canned()
    assert report["health"] == "failing"
    assert report["totals"]["accepted_events"] == 40
    assert report["totals"]["delivered_events"] == 34
    assert report["totals"]["dead_lettered_events"] == 1
    assert report["totals"]["received_frames"] == 40
    assert report["rates"]["accepted_events_per_second"] == 12.0  # (20 + 4) / 2 s
    assert report["rates"]["delivered_events_per_second"] == 10.0
    assert report["backlog"] == {"in_memory_batches": 1, "spool_batches": 2, "spool_events": 5,
                                 "spool_bytes": 500, "spool_oldest_age_seconds": 42.5}
    # The latest delivery of any intake (a sum of two timestamps would be no time at all).
    assert report["last_delivery_seconds_ago"] == 2.0
    assert report["delivered_since_start"] is True
    assert report["intake_failing"] is True and report["backpressure"] is False
    assert report["accounting"] == {"events_in": 40, "events_out": 35, "events_held": 5,
                                    "events_unaccounted": 0}


def test_one_entry_per_intake_with_its_own_figures() -> None:
    intakes = canned()["intakes"]
    assert list(intakes) == ["siem", "archive"]
    assert intakes["siem"] == {
        "intake_failing": False, "paused": False, "reasons": [],
        "rates": {"accepted_events_per_second": 10.0, "delivered_events_per_second": 10.0},
        "backlog": {"backlog_batches": 0, "in_memory_batches": 0, "spool_batches": 0,
                    "spool_events": 0},
        "last_delivery_seconds_ago": 2.0, "delivered_since_start": True,
        "totals": {"accepted_events": 30, "delivered_events": 30, "dead_lettered_events": 0,
                   "dropped_events": 0},
    }
    archive = intakes["archive"]
    assert archive["intake_failing"] is True and archive["paused"] is True
    assert archive["reasons"] == ["3 batches waiting and nothing delivered for 600 s"]
    assert archive["rates"] == {"accepted_events_per_second": 2.0,
                                "delivered_events_per_second": 0.0}
    assert archive["backlog"] == {"backlog_batches": 3, "in_memory_batches": 1,
                                  "spool_batches": 2, "spool_events": 5}
    assert archive["last_delivery_seconds_ago"] == 600.0
    assert archive["totals"]["dead_lettered_events"] == 1


def test_render_has_one_line_per_intake() -> None:
    text = sr.render(canned())
    rows, reasons = _rows(text)
    assert reasons == ["intake archive: 3 batches waiting and nothing delivered for 600 s"]
    assert rows["intake"] == "failing"  # the total, as before
    assert rows["output"] == "10.0 events/s delivered"
    assert rows["intake siem"] == ("ok, in 10.0 events/s, out 10.0 events/s, backlog 0 batches "
                                   "(spool 0 events), last delivery 2.0 s ago, not paused")
    assert rows["intake archive"] == ("failing, in 2.0 events/s, out 0.0 events/s, backlog 3 "
                                      "batches (spool 5 events), last delivery 10 min ago, "
                                      "paused")
    lines = text.splitlines()
    assert lines.index("  intake siem     " + rows["intake siem"]) < lines.index(
        "  intake archive  " + rows["intake archive"])  # the daemon's order, one column


def test_render_of_what_is_not_known() -> None:
    report = canned()
    report["rates"] = {k: None for k in report["rates"]}  # --once
    entry = report["intakes"]["archive"]
    entry["rates"] = {"accepted_events_per_second": None, "delivered_events_per_second": None}
    entry.update(intake_failing=None, paused=None, last_delivery_seconds_ago=None,
                 delivered_since_start=False)
    entry["backlog"].update(backlog_batches=1, spool_events=None)  # dry-run: no spool
    report["intakes"]["siem"].update(last_delivery_seconds_ago=None, delivered_since_start=None)
    rows, _ = _rows(sr.render(report))
    assert rows["output"] == "n/a (--once)"
    assert rows["intake archive"] == ("n/a, in n/a, out n/a, backlog 1 batch, nothing delivered "
                                      "since start, paused n/a")
    assert "last delivery n/a" in rows["intake siem"]


def test_a_daemon_without_intake_labels_has_no_intake_entries() -> None:
    # An older daemon: unlabelled series, no "intakes" in /healthz. The totals as they were.
    text = (f"{P}accepted_events_total 5\n{P}delivered_events_total 5\n"
            f"{P}last_delivery_timestamp_seconds {NOW - 3}\n{P}intake_failing 0\n")
    report = sr.summarise("http://x:1", True, {"status": "ok", "reasons": []},
                          scrape(text, 1.0), None, NOW)
    assert report["intakes"] == {}
    assert report["totals"]["accepted_events"] == 5
    assert report["last_delivery_seconds_ago"] == 3.0
    assert not [label for label in _rows(sr.render(report))[0] if label.startswith("intake ")]


# -- the real daemon ------------------------------------------------------------------------------


def _daemon(tmp: Path, siem: FakeIntake, archive: FakeIntake, **status: Any) -> Daemon:
    """Two intakes routed by program: haproxy to siem, nginx to archive."""
    cfg = base_config(
        tmp, filter={"programs": ["haproxy", "nginx"]}, status=status,
        intakes={"siem": intake_section(siem, key=KEY_SIEM),
                 "archive": intake_section(archive, key=KEY_ARCHIVE, retry_max=0.5)},
        routes=[{"program": "haproxy", "intake": "siem"},
                {"program": "nginx", "intake": "archive"}])
    return Daemon(tmp, cfg)


def _send(d: Daemon, haproxy: int, nginx: int) -> None:
    send_tcp(d.tcp_port, octet_counted(
        [traditional("haproxy", f"h{i}") for i in range(haproxy)]
        + [traditional("nginx", f"n{i}") for i in range(nginx)]))


def _no_key(*texts: str) -> None:
    for text in texts:
        assert KEY_SIEM not in text and KEY_ARCHIVE not in text


def _spool_events(d: Daemon, intake: str) -> float:
    scraped = sr.scrape(f"http://127.0.0.1:{d.status_port}")
    return scraped.intakes.get(intake, {}).get(P + "spool_events", -1.0)


def test_status_with_one_intake_down_marks_it_and_exits_1(tmp_path: Path) -> None:
    with FakeIntake(key=KEY_SIEM) as siem, FakeIntake(key=KEY_ARCHIVE) as archive:
        archive.set_down(True)
        with _daemon(tmp_path, siem, archive, stall_after=0.5) as d:
            _send(d, haproxy=6, nginx=4)
            assert siem.wait_for(6, 15)
            url = f"http://127.0.0.1:{d.status_port}"
            wait_until(lambda: _spool_events(d, "archive") == 4, 15, "archive's 4 spooled",
                       detail=d.stderr_text)
            wait_until(lambda: not sr.health(url)[0], 15, "/healthz failing")
            res = run_cli("status", "--url", url)  # two scrapes: the rates
            assert res.returncode == 1, res.stdout + res.stderr
            _no_key(res.stdout, res.stderr)
            rows, reasons = _rows(res.stdout)
            assert rows["health"] == "failing"
            assert reasons and all(r.startswith("intake archive: ") for r in reasons), reasons
            assert rows["received"] == "10 frames, 10 events accepted"
            assert rows["delivered"] == "6 events"
            assert rows["intake"] == "failing"
            assert re.fullmatch(r"ok, in 0\.0 events/s, out 0\.0 events/s, backlog 0 batches "
                                r"\(spool 0 events\), last delivery \d+\.\d s ago, not paused",
                                rows["intake siem"]), rows["intake siem"]
            assert re.fullmatch(r"failing, in 0\.0 events/s, out 0\.0 events/s, backlog 1 "
                                r"batch \(spool 4 events\), nothing delivered since start, "
                                r"not paused", rows["intake archive"]), rows["intake archive"]
            res = run_cli("status", "--url", url, "--json", "--once")
            assert res.returncode == 1
            _no_key(res.stdout, res.stderr)
            report = json.loads(res.stdout)
            assert list(report["intakes"]) == ["siem", "archive"]
            s, a = report["intakes"]["siem"], report["intakes"]["archive"]
            assert s["intake_failing"] is False and a["intake_failing"] is True
            assert s["totals"]["delivered_events"] == 6 and a["totals"]["accepted_events"] == 4
            assert a["totals"]["delivered_events"] == 0 and a["delivered_since_start"] is False
            assert a["backlog"]["spool_events"] == 4 and s["backlog"]["spool_events"] == 0
            assert a["reasons"] and s["reasons"] == []
            assert a["paused"] is False
            assert report["totals"]["delivered_events"] == 6
            assert report["backlog"]["spool_events"] == 4
            assert d.stop() == 0


def test_an_intake_failing_before_health_says_so_exits_0(tmp_path: Path) -> None:
    # status.stall_after (300 s) not reached: /healthz is still ok, so is the exit code; the
    # intake's line says it fails.
    with FakeIntake(key=KEY_SIEM) as siem, FakeIntake(key=KEY_ARCHIVE) as archive:
        archive.set_down(True)
        with _daemon(tmp_path, siem, archive) as d:
            _send(d, haproxy=2, nginx=3)
            assert siem.wait_for(2, 15)
            wait_until(lambda: _spool_events(d, "archive") == 3, 15, "archive's 3 spooled",
                       detail=d.stderr_text)
            res = run_cli("status", "--url", f"http://127.0.0.1:{d.status_port}", "--once")
            assert res.returncode == 0, res.stdout + res.stderr
            _no_key(res.stdout, res.stderr)
            rows, reasons = _rows(res.stdout)
            assert rows["health"] == "ok" and reasons == []
            assert rows["intake archive"].startswith("failing, in n/a, out n/a, backlog 1 batch")
            assert rows["intake siem"].startswith("ok, ")
            assert d.stop() == 0


@pytest.mark.parametrize("once", [True, False])
def test_a_single_intake_is_the_default_one(tmp_path: Path, once: bool) -> None:
    with FakeIntake() as fi:
        cfg = base_config(tmp_path, intake=intake_section(fi))
        with Daemon(tmp_path, cfg) as d:
            send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "x")] * 3))
            assert fi.wait_for(3, 15)
            url = f"http://127.0.0.1:{d.status_port}"
            wait_until(lambda: sr.scrape(url).values.get(P + "delivered_events_total") == 3, 15)
            res = run_cli("status", "--url", url, "--json", *(["--once"] if once else []))
            assert res.returncode == 0, res.stderr
            report = json.loads(res.stdout)
            assert list(report["intakes"]) == ["default"]
            entry = report["intakes"]["default"]
            assert entry["totals"]["delivered_events"] == report["totals"]["delivered_events"] == 3
            assert entry["intake_failing"] is False is report["intake_failing"]
            if not once:
                assert entry["rates"]["delivered_events_per_second"] == 0.0
            assert d.stop() == 0
