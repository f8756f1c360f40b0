"""The status endpoint under idle and slow clients (issue 17): /healthz and /readyz answer
whatever other clients of the status port do. Real daemon, loopback sockets."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable

import pytest

from devtools.daemon import Daemon
from devtools.probe import wait_until
from tests.fake_intake import FakeIntake

pytestmark = pytest.mark.timeout(90)

MakeDaemon = Callable[..., Daemon]


def probe(port: int, path: str, timeout: float = 2.0) -> tuple[int, dict[str, object]]:
    """(status, JSON body) of one GET, or (0, {}) if the daemon did not answer in time."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:  # reset, refused, timed out: not answered
        return 0, {}
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return 0, {}
    return int(head.split(b" ", 2)[1]), json.loads(body) if body else {}


class SlowClients:
    """Keeps `n` connections to the status port open, each sending its request one byte a
    second and never finishing it; a connection the daemon closes is opened again at once.
    Bounded: stops after `seconds`, or at stop()."""

    def __init__(self, port: int, n: int, seconds: float = 40.0) -> None:
        self.port, self.n, self.seconds = port, n, seconds
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SlowClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _open(self) -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        except OSError:
            return None
        s.setblocking(False)
        self.opened += 1
        return s

    def _run(self) -> None:
        held: list[socket.socket] = []
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            for s in list(held):
                try:
                    s.send(b"G")  # a request head that never ends
                except OSError:  # closed by the daemon: replaced below
                    held.remove(s)
                    s.close()
            while len(held) < self.n and not self._stop.is_set():
                s = self._open()
                if s is None:
                    break
                held.append(s)
            self._stop.wait(0.05)
        for s in held:
            s.close()


def test_healthz_answers_through_idle_and_slow_clients(intake: FakeIntake,
                                                       daemon: MakeDaemon) -> None:
    """Before: 16 sockets held open to the status port made /healthz time out (0 of 40)."""
    d = daemon(intake)
    port = d.status_port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    try:
        with SlowClients(port, 32) as slow:
            # The attack is in place before the probes.
            wait_until(lambda: slow.opened >= 32, 10, "32 slow clients connected",
                       detail=lambda: slow.opened)
            answers = [probe(port, "/healthz" if i % 2 else "/readyz") for i in range(40)]
            # The slow clients the probes displaced are back at once: the attack went on.
            wait_until(lambda: slow.opened > 40, 5, "the displaced slow clients back",
                       detail=lambda: slow.opened)
    finally:
        for s in idle:
            s.close()
    assert [a[0] for a in answers] == [200] * 40, answers
    assert all(a[1].get("status") in ("ok", "ready") for a in answers), answers
    line = d.wait_log("status_connection_evicted")
    assert line["state"] == "sending its request" and line["peer"].startswith("127.0.0.1:")
    # Rate-limited: many evictions, few lines.
    assert len(d.events("status_connection_evicted")) <= 3
    # /metrics still answers too.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert s.recv(12) == b"HTTP/1.1 200"


def test_the_connections_held_stay_bounded(intake: FakeIntake, daemon: MakeDaemon) -> None:
    """Eviction keeps the cap: 100 idle connections leave the daemon holding at most 16."""
    from pathlib import Path

    d = daemon(intake)
    before = len(list(Path(f"/proc/{d.pid}/fd").iterdir()))
    idle = [socket.create_connection(("127.0.0.1", d.status_port), timeout=5)
            for _ in range(100)]
    try:
        assert probe(d.status_port, "/healthz")[0] == 200
        held = len(list(Path(f"/proc/{d.pid}/fd").iterdir())) - before
        assert held <= 16 + 2, held  # the cap, and the probe's own on its way out
        closed = 0
        for s in idle:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed >= 100 - 16, closed
    finally:
        for s in idle:
            s.close()
