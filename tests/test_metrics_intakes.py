"""Several intakes in one Registry: each intake's counters exported under its `intake` label,
the global ones unlabelled, the flat snapshot (the `stats` line) summing them all, an
intake's totals kept after it is gone, unrouted events, the PROXY protocol counters per
listener, and how a labelled gauge's values fold into the flat and per-intake snapshots.

In-process, on a Registry written to by hand: the exposition parsed by prometheus-client's
own parser, so it is valid text format with one label set per metric name; then once on a real
daemon with two intakes, a drop route and an event no route takes."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from devtools.daemon import Daemon, base_config
from devtools.probe import wait_until
from devtools.traffic import octet_counted, send_tcp, traditional
from haproxy_forwarder import config, routing
from haproxy_forwarder.observability.accounting import balance, balance_by_intake
from haproxy_forwarder.observability.counters import (
    DEFAULT_INTAKE,
    DROP_REASONS,
    DURATION_BUCKETS,
    GLOBAL_FIELDS,
    INTAKE_FIELDS,
    SCALAR_FIELDS,
    SHARED_FIELDS,
    UNROUTED_REASONS,
    ListenerCounters,
    Registry,
)
from haproxy_forwarder.observability.prometheus import INTAKE_FAMILIES, metrics_registry
from tests.conftest import intake_section
from tests.fake_intake import VALID_KEY, FakeIntake
from tests.test_metrics import http_get

P = "haproxy_forwarder_"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(r: Registry) -> tuple[Samples, dict[str, set[frozenset[str]]]]:
    """({(sample, sorted labels): value}, {family: the label-name sets of its samples})."""
    text = generate_latest(metrics_registry(r)).decode()
    samples: Samples = {}
    label_sets: dict[str, set[frozenset[str]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
            label_sets.setdefault(fam.name, set()).add(frozenset(s.labels) - {"le"})
    return samples, label_sets


def value(m: Samples, name: str, **labels: str) -> float:
    return m[(P + name, tuple(sorted(labels.items())))]


def series(m: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in m.items() if n == P + name}


def two_intakes() -> Registry:
    """Intakes "siem" and "archive", each with its own counts, and a global listener."""
    r = Registry({"version": "test"})
    siem, archive = r.intake("siem"), r.intake("archive")
    siem.accepted_events += 10
    siem.delivered_events += 7
    siem.delivered_batches += 2
    siem.batches_sent += 3
    siem.retries += 1
    siem.dead_lettered(2, "rejected")
    siem.dropped(1, "spool_full")
    siem.spool.appended_events += 5
    siem.requests.observe(0.02, 200)
    siem.requests.observe(0.3, 401)
    siem.filtered_out += 4
    archive.accepted_events += 100
    archive.delivered_events += 90
    archive.requeued_events += 3
    archive.dropped(13, "shutdown")
    archive.spool.recovered_events += 6
    archive.requests.observe(1.5, None)
    archive.invalid_timestamps += 2
    g = r.counters
    g.filtered_out += 1
    g.reloads += 1
    g.accept_errors += 2
    lc = ListenerCounters("tcp://127.0.0.1:1514")
    lc.received_bytes += 99
    lc.framing("octet").frames += 3
    g.add_listener(lc)
    return r


def test_per_intake_families_carry_the_intake_name_and_their_own_values() -> None:
    m, label_sets = scrape(two_intakes())
    assert value(m, "accepted_events_total", intake="siem") == 10
    assert value(m, "accepted_events_total", intake="archive") == 100
    assert value(m, "delivered_events_total", intake="siem") == 7
    assert value(m, "delivered_events_total", intake="archive") == 90
    assert value(m, "retries_total", intake="siem") == 1
    assert value(m, "retries_total", intake="archive") == 0
    assert value(m, "requeued_events_total", intake="archive") == 3
    assert value(m, "dead_lettered_events_total", intake="siem", reason="rejected") == 2
    assert value(m, "dead_lettered_events_total", intake="archive", reason="rejected") == 0
    assert value(m, "dropped_events_total", intake="siem", reason="spool_full") == 1
    assert value(m, "dropped_events_total", intake="archive", reason="shutdown") == 13
    # Every reason present from the start, per intake (rate() works from the first scrape).
    for intake in ("siem", "archive"):
        for reason in DROP_REASONS:
            key = (P + "dropped_events_total",
                   tuple(sorted({"intake": intake, "reason": reason}.items())))
            assert key in m, key
    assert value(m, "spool_appended_events_total", intake="siem") == 5
    assert value(m, "spool_recovered_events_total", intake="archive") == 6
    # Intake requests: status classes, key rejections and latency, per intake.
    assert value(m, "intake_requests_total", intake="siem", status_class="2xx") == 1
    assert value(m, "intake_requests_total", intake="siem", status_class="4xx") == 1
    assert value(m, "intake_requests_total", intake="archive", status_class="network") == 1
    assert value(m, "intake_key_rejected_total", intake="siem") == 1
    assert value(m, "intake_key_rejected_total", intake="archive") == 0
    assert value(m, "intake_request_duration_seconds_count", intake="siem") == 2
    assert value(m, "intake_request_duration_seconds_bucket", intake="siem", le="0.25") == 1
    assert value(m, "intake_request_duration_seconds_bucket", intake="archive", le="1.0") == 0
    assert value(m, "intake_request_duration_seconds_bucket", intake="archive",
                 le="+Inf") == 1
    assert value(m, "intake_request_duration_seconds_sum", intake="archive") == 1.5
    assert len([k for k in series(m, "intake_request_duration_seconds_bucket")
                if ("intake", "siem") in k]) == len(DURATION_BUCKETS) + 1
    # One label set per family: per intake (with reason, status_class) or not at all.
    for family in INTAKE_FAMILIES:
        assert all("intake" in s for s in label_sets[P + family]), family
    for family, sets in label_sets.items():
        assert len(sets) == 1, (family, sets)
    # Never an unlabelled series of a per-intake family, nor a default intake nobody made.
    assert ("default" not in
            {dict(k).get("intake") for k in series(m, "delivered_events_total")})


def test_global_counters_stay_unlabelled_and_shared_ones_are_summed() -> None:
    m, _ = scrape(two_intakes())
    assert value(m, "reloads_total") == 1
    assert value(m, "accept_errors_total") == 2
    # Written by both sides (the intakes' collectors, a global reader): the sum, unlabelled.
    assert value(m, "filtered_out_total") == 1 + 4
    assert value(m, "invalid_timestamps_total") == 2
    assert value(m, "received_bytes_total", listener="tcp://127.0.0.1:1514") == 99
    assert value(m, "received_frames_total", listener="tcp://127.0.0.1:1514",
                 framing="octet") == 3


def test_the_flat_snapshot_sums_the_global_counters_and_every_intake() -> None:
    r = two_intakes()
    flat = r.snapshot()
    assert flat["accepted_events"] == 110
    assert flat["delivered_events"] == 97
    assert flat["dead_lettered_events"] == 2
    assert flat["dropped_events"] == 14
    assert flat["filtered_out"] == 5
    assert flat["spool_recovered_events"] == 6
    assert flat["reloads"] == 1 and flat["unrouted_events"] == 0
    assert flat["received_frames"] == 3 and flat["received_bytes"] == 99
    # The same names as a single registry's (the stats line of one intake is unchanged).
    one = Registry()
    assert set(flat) == set(one.snapshot())
    # Per intake: its own counters only; the global ones are not an intake's.
    siem = r.intake_snapshot("siem")
    assert siem["accepted_events"] == 10 and siem["delivered_events"] == 7
    assert siem["filtered_out"] == 4 and siem["spool_appended_events"] == 5
    assert "reloads" not in siem and "received_frames" not in siem
    archive = r.intake_snapshot("archive")
    assert archive["dropped_events"] == 13 and archive["spool_recovered_events"] == 6
    assert r.intake_snapshot("nothing")["delivered_events"] == 0  # unknown: all zero
    for f in INTAKE_FIELDS:
        assert flat[f] == siem[f] + archive[f], f
    assert r.total("delivered_events") == 97 and r.total("reloads") == 1


def test_an_intake_s_totals_survive_it_and_its_counters_object_stays() -> None:
    r = Registry()
    first = r.intake("siem")
    first.delivered_events += 5
    # A reload removes "siem" and adds it back: the same object, totals never go down.
    assert r.intake("siem") is first
    first.delivered_events += 1
    m, _ = scrape(r)
    assert value(m, "delivered_events_total", intake="siem") == 6
    # Not configured any more (nothing asks for it): still exported, still in the sum.
    r.intake("other").delivered_events += 1
    m, _ = scrape(r)
    assert value(m, "delivered_events_total", intake="siem") == 6
    assert r.snapshot()["delivered_events"] == 7
    assert list(r.intakes) == ["siem", "other"]


def test_counts_on_the_global_counters_of_an_intake_family_go_to_the_default_intake() -> None:
    # A Registry no pipeline registered an intake on (a tool, an in-process test): its
    # counters are the default intake's, so every per-intake family still has its series.
    r = Registry()
    r.counters.delivered_events += 3
    m, _ = scrape(r)
    assert value(m, "delivered_events_total", intake=DEFAULT_INTAKE) == 3
    assert value(m, "spool_acked_events_total", intake=DEFAULT_INTAKE) == 0
    assert value(m, "intake_requests_total", intake=DEFAULT_INTAKE, status_class="5xx") == 0
    assert r.intake_snapshot(DEFAULT_INTAKE)["delivered_events"] == 3
    # With intakes and nothing per intake on the global counters: no default series.
    r = Registry()
    r.intake("siem")
    r.counters.reloads += 1
    r.counters.filtered_out += 1
    m, _ = scrape(r)
    assert set(series(m, "delivered_events_total")) == {(("intake", "siem"),)}
    # ... but one as soon as something counts per-intake events there (the sum stays right).
    r.counters.dropped(2, "shutdown")
    m, _ = scrape(r)
    assert value(m, "dropped_events_total", intake=DEFAULT_INTAKE, reason="shutdown") == 2
    assert sum(series(m, "dropped_events_total").values()) == r.snapshot()["dropped_events"]
    # The default intake's own counters and the global ones add up.
    r.intake(DEFAULT_INTAKE).dropped(1, "shutdown")
    m, _ = scrape(r)
    assert value(m, "dropped_events_total", intake=DEFAULT_INTAKE, reason="shutdown") == 3
    assert DEFAULT_INTAKE == config.DEFAULT_INTAKE


def test_unrouted_events_are_global_by_reason_and_outside_the_identity() -> None:
    assert set(UNROUTED_REASONS) == set(get_args(routing.UnroutedReason))
    r = Registry()
    r.intake("siem").accepted_events += 4
    r.intake("siem").delivered_events += 4
    m, label_sets = scrape(r)
    # Present at 0 from the start, by reason.
    assert series(m, "unrouted_events_total") == {(("reason", "drop"),): 0,
                                                  (("reason", "no_route"),): 0}
    r.counters.unrouted(5, "drop")
    r.counters.unrouted(2, "no_route")
    r.counters.unrouted(1, "no_route")
    m, label_sets = scrape(r)
    assert value(m, "unrouted_events_total", reason="drop") == 5
    assert value(m, "unrouted_events_total", reason="no_route") == 3
    assert label_sets[P + "unrouted_events"] == {frozenset({"reason"})}
    flat = r.snapshot()
    assert flat["unrouted_events"] == 8
    assert balance({**flat, "events_held": 0})["events_unaccounted"] == 0


def test_proxy_protocol_counters_per_listener() -> None:
    r = Registry()
    tcp = ListenerCounters("tcp://0.0.0.0:1514")
    tcp.proxy_headers += 4
    tcp.proxy_refused["bad_signature"] = 2
    again = ListenerCounters("tcp://0.0.0.0:1514")  # the same listener after a reload
    again.proxy_headers += 1
    again.proxy_refused["truncated"] = 1
    again.proxy_refused["bad_signature"] = 1
    relp = ListenerCounters("relp://0.0.0.0:2514")
    udp = ListenerCounters("udp://0.0.0.0:514")
    for lc in (tcp, again, relp, udp):
        r.counters.add_listener(lc)
    m, _ = scrape(r)
    assert value(m, "proxy_headers_total", listener="tcp://0.0.0.0:1514") == 5
    assert value(m, "proxy_headers_total", listener="relp://0.0.0.0:2514") == 0
    assert (("listener", "udp://0.0.0.0:514"),) not in series(m, "proxy_headers_total")
    assert value(m, "proxy_refused_total", listener="tcp://0.0.0.0:1514",
                 reason="bad_signature") == 3
    assert value(m, "proxy_refused_total", listener="tcp://0.0.0.0:1514",
                 reason="truncated") == 1
    flat = r.snapshot()
    assert flat["proxy_headers"] == 5 and flat["proxy_refused"] == 4


def test_labelled_gauges_fold_by_their_combine() -> None:
    r = Registry()
    r.intake("siem")
    r.intake("archive")
    r.labelled_gauge("seconds_since_last_delivery", "intake",
                     lambda: {"siem": 12.0, "archive": 300.0}, combine=max)
    r.labelled_gauge("last_delivery_timestamp_seconds", "intake",
                     lambda: {"siem": 1000.0, "archive": 400.0}, combine=min)
    r.labelled_gauge("backlog_batches", "intake", lambda: {"siem": 2, "archive": 5})
    r.labelled_gauge("events_held", ("intake", "where"),
                     lambda: {("siem", "memory"): 1, ("siem", "spool"): 2,
                              ("archive", "memory"): 0, ("archive", "spool"): 40})
    r.labelled_gauge("listener_up", "listener", lambda: {})  # max() of nothing: 0
    flat = r.snapshot()
    assert flat["seconds_since_last_delivery"] == 300
    assert flat["last_delivery_timestamp_seconds"] == 400
    assert flat["backlog_batches"] == 7
    assert flat["events_held"] == 43
    assert flat["listener_up"] == 0
    siem = r.intake_snapshot("siem")
    assert siem["seconds_since_last_delivery"] == 12
    assert siem["backlog_batches"] == 2
    assert siem["events_held"] == 3  # summed over `where`
    assert "listener_up" not in siem
    m, label_sets = scrape(r)
    assert value(m, "seconds_since_last_delivery", intake="archive") == 300
    assert value(m, "events_held", intake="archive", where="spool") == 40
    assert label_sets[P + "events_held"] == {frozenset({"intake", "where"})}
    with pytest.raises(ValueError, match="registered twice"):
        r.labelled_gauge("backlog_batches", "intake", lambda: {})


def test_the_identity_per_intake_and_in_total() -> None:
    r = Registry()
    a, b = r.intake("a"), r.intake("b")
    a.accepted_events += 10
    a.delivered_events += 6
    a.dead_lettered(1, "rejected")
    b.spool.recovered_events += 5
    b.requeued_events += 2
    b.dropped(3, "spool_full")
    r.counters.unrouted(9, "no_route")  # never an intake's: not in any term
    held = {("a", "memory"): 1, ("a", "spool"): 2, ("b", "memory"): 0, ("b", "spool"): 4}
    r.labelled_gauge("events_held", ("intake", "where"), lambda: held)
    by_intake = balance_by_intake({n: r.intake_snapshot(n) for n in r.intakes})
    assert by_intake == {
        "a": {"events_in": 10, "events_out": 7, "events_held": 3, "events_unaccounted": 0},
        "b": {"events_in": 7, "events_out": 3, "events_held": 4, "events_unaccounted": 0},
    }
    assert balance(r.snapshot()) == {"events_in": 17, "events_out": 10, "events_held": 7,
                                     "events_unaccounted": 0}
    held[("b", "spool")] = 3  # one event of b unaccounted: only b says so
    by_intake = balance_by_intake({n: r.intake_snapshot(n) for n in r.intakes})
    assert by_intake["a"]["events_unaccounted"] == 0
    assert by_intake["b"]["events_unaccounted"] == 1


def test_every_scalar_is_exported_once_and_said_per_intake_or_not() -> None:
    _, label_sets = scrape(two_intakes())
    for name in SCALAR_FIELDS:
        assert P + name in label_sets, name
    # A counter added later must be put in one of the three (per intake, global, either).
    kinds = (INTAKE_FIELDS, GLOBAL_FIELDS, SHARED_FIELDS)
    assert sorted(f for kind in kinds for f in kind) == sorted(SCALAR_FIELDS)


# -- the real daemon with two intakes ------------------------------------------------------------


def test_a_daemon_with_two_intakes_labels_each_and_counts_the_unrouted(tmp_path: Path) -> None:
    other_key = "b" * 36
    with FakeIntake() as siem, FakeIntake(key=other_key) as archive:
        d = Daemon(tmp_path, base_config(
            tmp_path, filter={"programs": ["haproxy", "hapee", "nginx", "sshd"]},
            intakes={"siem": intake_section(siem),
                     "archive": intake_section(archive, key=other_key)},
            routes=[{"program": "haproxy", "intake": "siem"},
                    {"program": "nginx", "intake": "archive"},
                    {"program": "sshd", "drop": True}]))  # hapee: no route
        with d:
            frames = ([traditional("haproxy", f"h{i}") for i in range(3)]
                      + [traditional("nginx", "n"), traditional("sshd", "s1"),
                         traditional("sshd", "s2"), traditional("hapee", "x")])
            send_tcp(d.tcp_port, octet_counted(frames))
            assert siem.wait_for(3, 15) and archive.wait_for(1, 15)

            def settled() -> bool:
                m = parse_body(d)
                return (value(m, "delivered_events_total", intake="archive") == 1
                        and value(m, "unrouted_events_total", reason="no_route") == 1)

            assert wait_until(settled, 15)
            status, _, body = http_get(d.status_port, "/metrics")
            assert status == 200
            # The intakes' names label their series, never their keys.
            assert VALID_KEY.encode() not in body and other_key.encode() not in body
            m = parse_body(d)
            assert value(m, "accepted_events_total", intake="siem") == 3
            assert value(m, "accepted_events_total", intake="archive") == 1
            assert value(m, "delivered_events_total", intake="siem") == 3
            assert value(m, "intake_requests_total", intake="archive", status_class="2xx") >= 1
            assert value(m, "unrouted_events_total", reason="drop") == 2
            assert value(m, "unrouted_events_total", reason="no_route") == 1
            assert {dict(k).get("intake") for k in series(m, "delivered_events_total")} == {
                "siem", "archive"}
            stats = d.wait_log("stats", timeout=5)
            assert stats["accepted_events"] == 4 and stats["unrouted_events"] == 3
            assert stats["received_frames"] == 7
            assert stats["events_unaccounted"] == 0
            assert d.stop() == 0


def parse_body(d: Daemon) -> Samples:
    status, _, body = http_get(d.status_port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
