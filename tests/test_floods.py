"""Connection floods against the real daemon: honest senders still get in, memory stays bounded.

Attackers come from several loopback addresses (Linux routes all of 127.0.0.0/8 to lo), as a
flood from many hosts would, so listen.max_connections_per_address does not stop them alone.
Figures (peak RSS from VmHWM, CPU seconds) are printed for the record; only the memory bound is
asserted (a bound, not a timing).
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from devtools.probe import peak_rss
from devtools.traffic import octet_counted, traditional
from tests.fake_intake import FakeIntake
from tests.test_hostile import (
    MakeDaemon,
    _connect,
    _good_lines,
    _tag,
    _wait_events,
    closed_by_peer,
    hp,
    stop_counters,
)

MIB = 1024 * 1024
# The bound: peak RSS under listen.max_buffered_bytes + 80 MiB.
RSS_MARGIN = 80 * MIB
CLK_TCK = os.sysconf("SC_CLK_TCK")


@pytest.fixture(autouse=True)
def _enough_descriptors() -> Iterator[None]:
    """A thousand client sockets in this process: raise the soft open-files limit (the daemon
    raises its own to max_connections + a margin)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if want < 2300:
        pytest.skip(f"open-files hard limit {hard} is too low for 1,000+ client sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def attackers(port: int, n: int, per_address: int) -> list[socket.socket]:
    """`n` connections, `per_address` from each of 127.0.0.2, 127.0.0.3, ..."""
    out = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((f"127.0.0.{2 + i // per_address}", 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        out.append(s)
    return out


class Trickle:
    """One byte a second on every socket still open, in a thread; counts those the daemon
    closed (a reset or a broken pipe when writing)."""

    def __init__(self, socks: list[socket.socket], every: float = 1.0) -> None:
        self.open = list(socks)
        self.closed = 0
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.open:
            s.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            still = []
            for s in self.open:
                try:
                    s.send(b"x")
                    still.append(s)
                except OSError:
                    self.closed += 1
                    s.close()
            self.open = still


def park(socks: list[socket.socket], frame_len: int, held: int) -> int:
    """Each socket starts an octet-counted frame of `frame_len` bytes and sends `held` of them;
    returns how many the daemon hung up on while doing so."""
    chunk = f"{frame_len} ".encode() + b"<134>" + b"p" * (held - 5)
    hung_up = 0
    for s in socks:
        try:
            s.sendall(chunk)
        except OSError:
            hung_up += 1
    return hung_up


def honest(port: int, tag: str, n: int, slices: int = 1, pause: float = 0.0) -> list[str]:
    """`n` events on one connection, in `slices` writes `pause` seconds apart."""
    lines = _good_lines(tag, n)
    step = -(-n // slices)
    with _connect(port) as s:
        for i in range(0, n, step):
            s.sendall(octet_counted(traditional("haproxy", x) for x in lines[i:i + step]))
            time.sleep(pause)  # the sender's pace: traffic spread in time, not a wait
        s.shutdown(socket.SHUT_WR)
        closed_by_peer(s, 30)
    return lines


def test_slow_frames_from_1000_connections_cannot_pin_memory(intake: FakeIntake,
                                                            daemon: MakeDaemon) -> None:
    """The issue's scale: 1,000 connections each park ~100 KiB of a 250 KB frame and then
    trickle a byte a second, while an honest sender sends 50k messages."""
    cap = 32 * MIB  # the default listen.max_buffered_bytes, said here for the bound
    d = daemon(intake, listen={"max_buffered_bytes": cap},
               batch={"max_delay": 0.2, "max_events": 5000})
    rss0, cpu0 = peak_rss(d.pid), cpu_seconds(d.pid)
    socks = attackers(d.tcp_port, 1000, per_address=50)
    t0 = time.monotonic()
    try:
        hung_up = park(socks, 250_000, 100 * 1024)
        with Trickle(socks) as trickle:
            # Spread over ~5 s, so that the trickle goes on all along.
            lines = honest(d.tcp_port, _tag(), 50_000, slices=10, pause=0.5)
            _wait_events(intake, lines, timeout=60, d=d)
            shed_seen = trickle.closed
    finally:
        for s in socks:
            s.close()
    peak, cpu = peak_rss(d.pid), cpu_seconds(d.pid) - cpu0
    c = stop_counters(d)
    print(f"\nslow flood: 1000 connections x 100 KiB parked, 50k honest events in "
          f"{time.monotonic() - t0:.1f} s; peak RSS {peak / MIB:.1f} MiB (at start "
          f"{rss0 / MIB:.1f}, bound {(cap + RSS_MARGIN) / MIB:.0f}); daemon CPU {cpu:.2f} s; "
          f"shed {c['connections_shed']} (client saw {hung_up} + {shed_seen})")
    # 1000 x 100 KiB is ~98 MiB: past the 32 MiB cap, the largest holders were closed.
    assert c["connections_shed"] >= 600
    assert peak < cap + RSS_MARGIN
    # Rate-limited: the first at once, then one line per 5 s with how many were suppressed.
    shed_lines = d.events("connection_shed")
    assert 2 <= len(shed_lines) <= 3
    assert sum(e.get("suppressed", 1) for e in shed_lines) == c["connections_shed"]


def test_idle_flood_at_max_connections_lets_honest_senders_in(intake: FakeIntake,
                                                             daemon: MakeDaemon) -> None:
    """1,024 connections that never send (the default max_connections), then 60 honest
    senders (all from 127.0.0.1: under its per-address cap), one connection each, all open at
    once: every one gets in by evicting a silent one."""
    d = daemon(intake, batch={"max_delay": 0.2, "max_events": 5000})
    cpu0 = cpu_seconds(d.pid)
    t = _tag()
    socks = attackers(d.tcp_port, 1024, per_address=64)
    try:
        # The 65th from one address is refused outright (listen.max_connections_per_address).
        one_more = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        one_more.bind(("127.0.0.2", 0))
        one_more.connect(("127.0.0.1", d.tcp_port))
        assert closed_by_peer(one_more, 5)
        one_more.close()
        expected: list[str] = []
        senders = []
        for i in range(60):  # all open at once: each needs a slot
            lines = _good_lines(f"{t} s{i}", 800)
            expected += lines
            senders.append(_connect(d.tcp_port))
            senders[-1].sendall(octet_counted(traditional("haproxy", x) for x in lines))
        _wait_events(intake, expected, timeout=60, d=d)
        for s in senders:
            assert not closed_by_peer(s, 0.01)  # kept: they sent frames
            s.close()
        # The oldest silent connections made the room.
        assert sum(closed_by_peer(s, 0.5) for s in socks[:60]) == 60
        assert not closed_by_peer(socks[-1], 0.2)
    finally:
        for s in socks:
            s.close()
    peak, cpu = peak_rss(d.pid), cpu_seconds(d.pid) - cpu0
    c = stop_counters(d)
    print(f"\nidle flood: 1024 silent connections, 60 senders x 800 events; peak RSS "
          f"{peak / MIB:.1f} MiB; daemon CPU {cpu:.2f} s; evicted {c['connections_evicted']}")
    assert c["connections_evicted"] == 60 and c["connections_refused"] == 1
    assert peak < 32 * MIB + RSS_MARGIN
    evicted = d.events("connection_evicted_idle")  # rate-limited, counted
    assert len(evicted) == 2 and sum(e.get("suppressed", 1) for e in evicted) == 60


@pytest.mark.parametrize("key", ["idle_timeout", "evict_idle_after"])  # and its old name
def test_idle_timeout_closes_tricklers_and_silent_ones_not_senders(intake: FakeIntake,
                                                                  daemon: MakeDaemon,
                                                                  key: str) -> None:
    """idle_timeout counts from the last complete frame: a byte a second does not keep a
    connection, a frame now and then does."""
    d = daemon(intake, listen={key: 1.0})
    t = _tag()
    silent = attackers(d.tcp_port, 10, per_address=64)
    trickling = attackers(d.tcp_port, 10, per_address=64)
    sender = _connect(d.tcp_port)
    lines = []
    try:
        with Trickle(trickling, every=0.2) as trickle:
            for i in range(12):  # a frame every 0.25 s for 3 s, past the timeout thrice
                lines.append(f"{t} kept {i}")
                sender.sendall(octet_counted([hp(lines[-1])]))
                time.sleep(0.25)  # the clock idle_timeout is about: the scenario, not a wait
            closed_tricklers = trickle.closed + sum(closed_by_peer(s, 0.1) for s in trickle.open)
        assert closed_tricklers == 10
        assert sum(closed_by_peer(s, 1) for s in silent) == 10
        sender.shutdown(socket.SHUT_WR)
        assert closed_by_peer(sender)
    finally:
        for s in silent:
            s.close()
        sender.close()
    _wait_events(intake, lines, d=d)
    c = stop_counters(d)
    assert c["connections_idle_closed"] == 20
    idle = d.events("connection_idle_closed")  # rate-limited, counted
    assert len(idle) <= 3 and sum(e.get("suppressed", 1) for e in idle) == 20
