"""A low open-files limit: idle status connections cannot starve the syslog listeners of
descriptors, and when syslog connections do use them up, that is logged (rate-limited) and
counted (issue 11, item 6, "Descriptors").

The daemon runs under a hard RLIMIT_NOFILE (it raises its soft limit up to the hard one, so
both are set), with the default listen.max_connections far above what fits.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.daemon import Daemon, base_config
from devtools.probe import metric, wait_until
from devtools.traffic import octet_counted, send_tcp, traditional

NOFILE = 128


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("descriptors")
    # No per-address cap: every test connection comes from 127.0.0.1.
    cfg = base_config(tmp, listen={"tcp": ["127.0.0.1:0"], "udp": [],
                                   "max_connections_per_address": 100_000},
                      log={"format": "json", "stats_interval": 60.0})
    spawn = functools.partial(subprocess.Popen, preexec_fn=_low_nofile)
    d = Daemon(tmp, cfg, args=("--dry-run",), spawn=spawn).start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.stop()


def _connect(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(s)
    return socks


def _close(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def _open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _delivered(d: Daemon, tag: str, n: int, timeout: float = 10.0) -> None:
    wait_until(lambda: sum(tag in str(r) for r in d.stdout_lines()) >= n, timeout,
               f"{n} {tag!r} events on stdout", step=0.05,
               detail=lambda: d.stderr_text()[-2000:])


def test_idle_status_connections_leave_syslog_working(daemon: Daemon) -> None:
    assert daemon.events("fd_limit_low")  # the limit really is too low for the config
    idle = _connect(daemon.status_port, NOFILE + 20)  # more than the daemon could ever hold
    try:
        # Sent while the idle ones are open (they would be held up to the 5 s read timeout).
        with contextlib.suppress(OSError):  # refused: shown by the assertion below
            send_tcp(daemon.tcp_port, octet_counted(
                [traditional("haproxy", f"through-status-flood {i}") for i in range(20)]))
        _delivered(daemon, "through-status-flood", 20)
        # Past the cap they were closed at once: the daemon holds only a few more descriptors.
        assert _open_fds(daemon.pid) < NOFILE - 40
        assert not daemon.events("descriptors_exhausted")
    finally:
        _close(idle)


def test_running_out_of_descriptors_is_logged_once_and_counted(daemon: Daemon) -> None:
    flood = _connect(daemon.tcp_port, NOFILE + 20)
    try:
        first = daemon.wait_log("descriptors_exhausted")
        assert first["accept_errors"] >= 1 and "nofile 128" in first["reason"]
        # /metrics still answers (descriptors are kept for it) and counts every refusal.
        def counted() -> float | None:
            n = metric(daemon.status_port, "accept_errors_total")
            return n if n >= 20 else None

        errors = wait_until(counted, 5, "20 accept errors counted on /metrics", step=0.05)
        # Rate-limited: the next ones come as one line with a count, seconds later.
        summary = _wait_summary(daemon)
        assert isinstance(summary["suppressed"], int) and summary["suppressed"] >= 1
        assert len(daemon.events("descriptors_exhausted")) <= 2 < errors
    finally:
        _close(flood)
    # Once the flood is gone, senders get in again.
    wait_until(lambda: _open_fds(daemon.pid) <= NOFILE - 40, 5,
               f"the daemon back under {NOFILE - 40} descriptors",
               detail=lambda: _open_fds(daemon.pid))
    with contextlib.suppress(ConnectionError):
        send_tcp(daemon.tcp_port, octet_counted(
            [traditional("haproxy", f"after-flood {i}") for i in range(5)]))
    _delivered(daemon, "after-flood", 5)


def _wait_summary(d: Daemon, timeout: float = 10.0) -> dict[str, object]:
    lines = wait_until(lambda: [r for r in d.events("descriptors_exhausted") if "suppressed" in r],
                       timeout, "the rate-limited summary line", step=0.1)
    return lines[0]
