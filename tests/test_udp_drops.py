"""UDP losses made visible, and sender-chosen times kept out of the intake, on the real daemon.

A stopped daemon (SIGSTOP) cannot read: a flood overflows its socket's receive queue and the
kernel drops the rest. /metrics must then say exactly how many datagrams the intake is
missing. One daemon, with a tiny listen.udp_rcvbuf, serves every test here.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest

from devtools.daemon import Daemon, base_config
from devtools.probe import wait_until
from tests.conftest import intake_section
from tests.fake_intake import FakeIntake
from tests.test_metrics import scrape, total, value

RCVBUF = 4096
RECEIVED_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, FakeIntake]]:
    tmp = tmp_path_factory.mktemp("udp_drops")
    with FakeIntake() as fi:
        cfg = base_config(tmp, intake=intake_section(fi),
                          listen={"tcp": [], "udp": ["127.0.0.1:0"], "udp_rcvbuf": RCVBUF})
        d = Daemon(tmp, cfg).start()
        try:
            yield d, fi
        finally:
            d.stop()


@pytest.fixture
def clean(running: tuple[Daemon, FakeIntake]) -> tuple[Daemon, FakeIntake]:
    running[1].reset()
    return running


def send(port: int, datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for d in datagrams:
            s.sendto(d, ("127.0.0.1", port))


def test_rcvbuf_is_set_and_its_effective_size_logged(clean: tuple[Daemon, FakeIntake]) -> None:
    d, _ = clean
    (rec,) = d.events("udp_rcvbuf")
    assert rec["listener"] == f"udp://127.0.0.1:{d.udp_port}"
    assert rec["requested"] == RCVBUF
    # What the kernel says of the socket (iproute2's ss): the size the daemon logged.
    out = subprocess.run(["ss", "-H", "-u", "-a", "-m", "-n", "src", f"127.0.0.1:{d.udp_port}"],
                         capture_output=True, text=True, check=True).stdout
    rb = re.search(r"\brb(\d+)", out)
    assert rb is not None, out
    assert rec["effective"] == int(rb.group(1)) == 2 * RCVBUF  # Linux doubles it


def test_kernel_drops_are_what_the_intake_is_missing(clean: tuple[Daemon, FakeIntake]) -> None:
    d, fi = clean
    port, listener = d.udp_port, f"udp://127.0.0.1:{d.udp_port}"
    before = scrape(d.status_port)
    dropped0 = value(before, "udp_kernel_dropped_total", listener=listener)
    frames0 = total(before, "received_frames_total")
    n = 400
    os.kill(d.pid, signal.SIGSTOP)  # nothing reads: the queue fills, the kernel drops
    try:
        send(port, [b"<134>Nov 26 21:58:51 lb1 haproxy[1]: flood %d" % i for i in range(n)])
    finally:
        os.kill(d.pid, signal.SIGCONT)

    def settled() -> bool:
        m = scrape(d.status_port)
        read = total(m, "received_frames_total") - frames0
        dropped = value(m, "udp_kernel_dropped_total", listener=listener) - dropped0
        return read + dropped == n and len(fi.events) == read

    assert wait_until(settled), scrape(d.status_port)
    m = scrape(d.status_port)
    dropped = value(m, "udp_kernel_dropped_total", listener=listener) - dropped0
    delivered = {e.event for e in fi.events}
    assert len(delivered) == len(fi.events) == n - dropped
    assert 0 < dropped < n  # some queued (a few kB of buffer), most lost
    assert value(m, "udp_dropped_total", listener=listener) == 0  # not the backpressure drop
    # The `stats` log line reads the kernel's count too (summed over listeners).
    now = total(m, "udp_kernel_dropped_total")
    assert wait_until(lambda: any(r["udp_kernel_dropped"] == now for r in d.events("stats")))


def test_an_impossible_header_time_becomes_the_reception_time(
        clean: tuple[Daemon, FakeIntake]) -> None:
    d, fi = clean
    before = value(scrape(d.status_port), "invalid_timestamps_total")
    leap = "2024-02-29T23:59:60.5+14:00"
    for ts, msg in (("9999-99-99T99:99:99Z", "bad-date"), ("2026-11-26T21:58:51+99:99", "bad-zone"),
                    (leap, "leap")):
        # One at a time: the socket's queue holds only a few datagrams.
        k = len(fi.events)
        send(d.udp_port, [f"<134>1 {ts} lb1 haproxy 1 - - {msg}".encode()])
        assert fi.wait_for(k + 1, timeout=10)
    times = {e.event: e.timestamp or "" for e in fi.events}
    assert times["leap"] == leap
    assert RECEIVED_TS.fullmatch(times["bad-date"]) and RECEIVED_TS.fullmatch(times["bad-zone"])
    assert value(scrape(d.status_port), "invalid_timestamps_total") == before + 2
    assert wait_until(lambda: any(r["invalid_timestamps"] == before + 2
                                  for r in d.events("stats")))
