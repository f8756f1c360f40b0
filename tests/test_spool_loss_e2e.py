"""Issue 17, with the real daemon (devtools/daemon.py) and the fake HTTPS intake: a damaged
sealed segment and a batch deleted by drop_oldest while being sent, then a SIGTERM. Every event
sent is delivered once or counted as dropped; the sum is checked to the event.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import Daemon
from devtools.probe import wait_at_rest, wait_until
from devtools.traffic import send_tcp
from haproxy_forwarder.spool import HEADER_SIZE
from haproxy_forwarder.spool import format as fmt
from tests.fake_intake import FakeIntake
from tests.test_metrics import scrape, value
from tests.test_spool_e2e import last_stats, stream
from tests.test_spool_loss import seg_path, v1_spool

MakeDaemon = Callable[..., Daemon]
KIB = 1024


def counted(d: Daemon, name: str, field: str = "events") -> int:
    return sum(int(r[field]) for r in d.events(name))


def flip_only_record(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    parsed = fmt.parse_at(raw, 0)
    assert parsed is not None and parsed.length == len(raw)  # the only record
    raw[HEADER_SIZE + (len(raw) - HEADER_SIZE) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.fixture
def damaged_v1(tmp_path: Path) -> tuple[list[dict[str, Any]], Path]:
    held = v1_spool(tmp_path / "spool")
    flip_only_record(seg_path(tmp_path / "spool", 4))
    return held, seg_path(tmp_path / "spool", 4)


def test_daemon_quarantines_a_damaged_sealed_segment_and_counts_it(
    intake: FakeIntake, daemon: MakeDaemon, damaged_v1: tuple[list[dict[str, Any]], Path],
) -> None:
    held, bad = damaged_v1
    d = daemon(intake)
    rec = d.wait_log("spool_recovered_with_corruption")
    assert rec["truncated"] == [] and [q["segment"] for q in rec["quarantined"]] == [bad.name]
    assert (rec["corrupt_records"], rec["corrupt_events"]) == (1, 4)
    want = [e for i, h in enumerate(held) if i != 4 for e in h["events"]]
    assert intake.wait_for(len(want), 20), f"{len(intake.events)} of {len(want)} delivered"
    wait_at_rest(d.status_port, detail=d.stderr_text)  # a duplicate would be there now
    assert collections.Counter(intake.event_texts()) == collections.Counter(want)
    m = scrape(d.status_port)
    assert value(m, "spool_corrupt_records_total", intake="default") == 1
    assert value(m, "spool_corrupt_events_total", intake="default") == 4
    assert value(m, "spool_recovered_events_total", intake="default") == len(want) + 4
    assert (bad.parent.parent / "quarantine" / bad.name).exists()
    assert d.stop() == 0


def test_daemon_counts_a_damaged_sealed_segment_as_dropped(
    intake: FakeIntake, daemon: MakeDaemon, damaged_v1: tuple[list[dict[str, Any]], Path],
) -> None:
    d = daemon(intake)
    d.wait_log("spool_recovered_with_corruption")
    m = scrape(d.status_port)
    assert d.stop() == 0
    assert value(m, "dropped_events_total", intake="default", reason="spool_corrupt") == 4


def test_sigterm_after_drop_oldest_deleted_the_batch_being_sent_loses_nothing_silently(
    intake: FakeIntake, daemon: MakeDaemon,
) -> None:
    """The issue's case: a slow intake holds a spooled batch in a worker, drop_oldest deletes
    its segment, SIGTERM: that batch was written nowhere and counted nowhere (4,000 events).

    Now: every event sent is delivered once by the next run, or counted as dropped (by
    drop_oldest, in `spool_dropped_events` / `spool_full_dropped_in_flight`, or at shutdown).
    """
    n = 4000
    payload, sent = stream(0, n, pad=300)  # ~40 KB per batch: one record per 32 KiB segment
    intake.set_delay(120)  # the first request hangs: its batch stays held by the worker
    d = daemon(intake, shutdown_timeout=1.0, intake={"concurrency": 1, "retry_max": 1.0},
               batch={"max_events": 100, "max_delay": 0.05},
               spool={"mode": "always", "max_size": 256 * KIB, "when_full": "drop_oldest"})
    threading.Thread(target=send_tcp, args=(d.tcp_port, payload), daemon=True).start()
    wait_until(lambda: last_stats(d).get("accepted_events") == n
               and last_stats(d).get("spool_evicted_inflight", 0) >= 1, 30,
               "all accepted and the batch being sent deleted by drop_oldest",
               detail=lambda: last_stats(d))
    held = len(intake.requests)
    assert held == 1, "one request on the wire, the one that hangs"
    # Deleted from disk, held in memory: the backlog gauges say so.
    wait_until(lambda: last_stats(d).get("in_memory_batches") == 1, 5,
               "a stats line with the one batch held in memory", detail=lambda: last_stats(d))
    assert d.stop() == 0
    intake.set_down(True)  # the hanging request is dropped: it delivered nothing
    first = d.events("stopped")[-1]
    (incomplete,) = d.events("shutdown_incomplete")
    assert incomplete["spooled_events"] >= 100  # the held batch, written again

    intake.set_down(False)
    intake.set_delay(0)
    d2 = daemon(intake, spool={"when_full": "drop_oldest", "max_size": 256 * KIB})
    wait_until(lambda: last_stats(d2).get("spool_events") == 0
               and last_stats(d2).get("in_memory_batches") == 0, 30,
               "the second run's spool drained", detail=lambda: last_stats(d2))
    wait_at_rest(d2.status_port, detail=d2.stderr_text)  # a duplicate would be there now
    assert d2.stop() == 0
    second = d2.events("stopped")[-1]
    got = collections.Counter(intake.event_texts())
    assert max(got.values()) == 1, "duplicates"
    assert set(got) <= set(sent)
    dropped = sum(
        r["spool_dropped_events"] for r in (first, second)
    ) + counted(d, "spool_full_dropped_in_flight") + incomplete["dropped_events"]
    assert len(got) + dropped == n, (
        f"delivered {len(got)} + dropped {dropped} != sent {n}: "
        f"{n - len(got) - dropped} lost without a counter"
    )
    # What the second run found on disk is its input: delivered, nothing missing.
    assert second["spool_recovered_events"] == second["delivered_events"]
