"""systemd supervision: the sd_notify datagrams the real daemon sends to a socket of the test,
and the shipped unit checked by systemd's own tools (verify, security score).

No systemd runs here: the test plays its part, binding the $NOTIFY_SOCKET datagram socket and
reading what arrives, as systemd's manager does.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools import REPO
from devtools.daemon import Daemon, base_config
from devtools.traffic import octet_counted, send_tcp, traditional
from haproxy_forwarder.systemd import Notifier, monotonic_usec, notify_address, watchdog_usec
from tests.conftest import intake_section
from tests.fake_intake import FakeIntake

UNIT = REPO / "systemd" / "haproxy-forwarder.service"
INSTALLED_BINARY = "/usr/bin/haproxy-forwarder"
MAX_EXPOSURE = 2.0


@dataclass
class Message:
    at: float  # time.monotonic() when it was read
    fields: dict[str, str]


class NotifySocket:
    """What systemd binds for a Type=notify service: an AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[Message] = []

    @property
    def env_value(self) -> str:
        """$NOTIFY_SOCKET as systemd writes it: abstract names with '@' for the NUL."""
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def _read(self, timeout: float) -> Message | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        msg = Message(time.monotonic(), fields)
        self.messages.append(msg)
        return msg

    def wait(self, has: Callable[[dict[str, str]], bool], timeout: float = 15.0) -> Message:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self._read(left)
            if msg is not None and has(msg.fields):
                return msg
        raise AssertionError(f"no such notification in {timeout}s; got {self.fields_seen()}")

    def collect(self, seconds: float) -> list[Message]:
        """Everything that arrives in the next `seconds`."""
        deadline = time.monotonic() + seconds
        got = []
        while (left := deadline - time.monotonic()) > 0:
            msg = self._read(left)
            if msg is not None:
                got.append(msg)
        return got

    def fields_seen(self) -> list[dict[str, str]]:
        return [m.fields for m in self.messages[-10:]]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotifySocket]:
    # A short directory: AF_UNIX paths are limited to 108 bytes.
    ns = NotifySocket(str(tmp_path_factory.mktemp("sd") / "notify"))
    yield ns
    ns.close()


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    ns = NotifySocket(f"\0haproxy-forwarder-test/{os.getpid()}/{time.monotonic_ns()}")
    yield ns
    ns.close()


def is_watchdog(f: dict[str, str]) -> bool:
    return f.get("WATCHDOG") == "1"


def make_daemon(tmp: Path, fi: FakeIntake, env: dict[str, str], **sections: Any) -> Daemon:
    sections["intake"] = {**intake_section(fi, retry_max=0.5), **sections.get("intake", {})}
    return Daemon(tmp, base_config(tmp, **sections), env=env)


def start_until_ready(d: Daemon, ns: NotifySocket) -> Message:
    """Start the daemon and, the moment READY=1 arrives, connect to what it says it listens on.

    Every listener must already answer then: systemd starts the units ordered after this one
    (HAProxy's rsyslog) as soon as READY=1 is read.
    """
    with ThreadPoolExecutor(1) as pool:
        started = pool.submit(d.start)
        ready = ns.wait(lambda f: "READY" in f, timeout=20.0)
        listening = [r for r in d.logs() if r.get("event") == "listening"]
        assert {r["proto"] for r in listening} == {"tcp", "udp", "http"}, listening
        for rec in listening:
            if rec["proto"] in ("tcp", "http"):
                socket.create_connection(("127.0.0.1", rec["port"]), timeout=2).close()
        started.result(timeout=20.0)
    assert ns.messages[0] is ready, f"READY=1 was not the first notification: {ns.fields_seen()}"
    assert ready.fields == {"READY": "1"}
    return ready


def healthz(d: Daemon) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{d.status_port}/healthz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# -- the real daemon against a notify socket ------------------------------------------------------


def test_ready_status_watchdog_stall_and_stopping(
    intake: FakeIntake, path_socket: NotifySocket, tmp_path: Path
) -> None:
    ns = path_socket
    watchdog_sec = 1.0
    d = make_daemon(tmp_path, intake,
                    {"NOTIFY_SOCKET": ns.env_value, "WATCHDOG_USEC": str(int(watchdog_sec * 1e6))},
                    status={"listen": "127.0.0.1:0", "stall_after": 1.0})
    start_until_ready(d, ns)
    try:
        # STATUS= right after READY, then refreshed (every stats_interval = 1 s here).
        first = ns.wait(lambda f: "STATUS" in f)
        assert re.fullmatch(r"in \d+ events/s, out \d+ events/s, backlog 0 batches, "
                            r"spool 0 events, last delivery \d+ s ago", first.fields["STATUS"])
        send_tcp(d.tcp_port, octet_counted(traditional("haproxy", f"e{i}") for i in range(500)))
        assert intake.wait_for(500), f"events at the intake: want 500, got {len(intake.events)}"
        rate = re.compile(r"in [1-9]\d* events/s")
        moving = ns.wait(lambda f: rate.match(f.get("STATUS", "")) is not None)
        assert "out " in moving.fields["STATUS"]

        # Pings at half WATCHDOG_USEC: always within the interval, and not a flood.
        pings = [m.at for m in ns.collect(2.5) if is_watchdog(m.fields)]
        assert len(pings) >= 3, ns.fields_seen()
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < watchdog_sec and min(gaps) > watchdog_sec / 4, gaps

        # Intake down with a backlog: after stall_after, /healthz fails and the pings stop.
        intake.set_down(True)
        send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "held back")]))
        ns.wait(lambda f: f.get("STATUS", "").startswith("STALLED: "))
        assert healthz(d) == 503
        assert d.wait_log("watchdog_withheld")["level"] == "error"
        silent = ns.collect(3 * watchdog_sec)
        assert not [m for m in silent if is_watchdog(m.fields)], [m.fields for m in silent]

        # Back up: delivered, and the pings resume without a restart.
        intake.set_down(False)
        ns.wait(is_watchdog, timeout=10.0)
        assert intake.wait_for(501), f"events at the intake: want 501, got {len(intake.events)}"
        assert healthz(d) == 200
    finally:
        assert d.stop(signal.SIGTERM) == 0
    ns.collect(0.2)
    assert len([m for m in ns.messages if m.fields.get("STOPPING") == "1"]) == 1
    assert d.events("notify_failed") == []


def test_abstract_socket_and_a_watchdog_meant_for_another_process(
    intake: FakeIntake, abstract_socket: NotifySocket, tmp_path: Path
) -> None:
    ns = abstract_socket
    assert ns.env_value.startswith("@")
    # systemd sets WATCHDOG_PID when a wrapper is the main process: its pings are not ours.
    d = make_daemon(tmp_path, intake, {"NOTIFY_SOCKET": ns.env_value,
                                       "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    start_until_ready(d, ns)
    try:
        seen = ns.collect(1.5)  # seven ping periods, had the watchdog been ours
        assert [m for m in seen if "STATUS" in m.fields], ns.fields_seen()
        assert not [m for m in seen if is_watchdog(m.fields)], ns.fields_seen()
        # `systemctl reload` (ExecReload= sends SIGHUP): RELOADING=1 with the time it began,
        # then READY=1 again when done.
        before = monotonic_usec()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        reloading = ns.wait(lambda f: f.get("RELOADING") == "1")
        assert int(reloading.fields["MONOTONIC_USEC"]) >= before
        ns.wait(lambda f: f.get("READY") == "1")
    finally:
        assert d.stop(signal.SIGTERM) == 0
    ns.collect(0.2)
    assert len([m for m in ns.messages if m.fields.get("STOPPING") == "1"]) == 1


def test_without_notify_socket_it_runs_as_before(
    intake: FakeIntake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    d = make_daemon(tmp_path, intake, {"WATCHDOG_USEC": "200000"}).start()
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "no systemd here")]))
    assert intake.wait_for(1), f"events at the intake: want 1, got {len(intake.events)}"
    assert d.stop() == 0
    assert [e.event for e in intake.events] == ["no systemd here"]
    assert d.events("notify_failed") == [] and d.events("watchdog_withheld") == []


def test_a_notify_socket_nobody_listens_on_is_logged_once(intake: FakeIntake,
                                                          tmp_path: Path) -> None:
    d = make_daemon(tmp_path, intake, {"NOTIFY_SOCKET": str(tmp_path / "gone"),
                                       "WATCHDOG_USEC": "200000"}).start()
    send_tcp(d.tcp_port, octet_counted([traditional("haproxy", "still forwarded")]))
    assert intake.wait_for(1), f"events at the intake: want 1, got {len(intake.events)}"
    time.sleep(1.0)  # the clock the feature needs: ten failed pings and a STATUS refresh
    assert d.stop() == 0
    assert [e.event for e in intake.events] == ["still forwarded"]
    assert len(d.events("notify_failed")) == 1


# -- Notifier on its own ------------------------------------------------------------------------


def test_notify_address_forms() -> None:
    assert notify_address("@/org/freedesktop/systemd1/notify/42") == (
        "\0/org/freedesktop/systemd1/notify/42")
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("") is None and notify_address(None) is None
    assert notify_address("vsock:2:1234") is None
    assert notify_address("relative/path") is None


def test_notifier_sends_each_message_to_an_abstract_socket(
    abstract_socket: NotifySocket,
) -> None:
    n = Notifier(environ={"NOTIFY_SOCKET": abstract_socket.env_value})
    assert n.enabled and n.watchdog_interval is None
    before = monotonic_usec()
    assert n.ready() and n.reloading() and n.status("two\nlines") and n.watchdog()
    assert n.stopping()
    after = monotonic_usec()
    got = [abstract_socket.wait(lambda f: True, timeout=2).fields for _ in range(5)]
    assert got[0] == {"READY": "1"}
    assert got[1]["RELOADING"] == "1" and before <= int(got[1]["MONOTONIC_USEC"]) <= after
    assert got[2] == {"STATUS": "two lines"}
    assert got[3] == {"WATCHDOG": "1"} and got[4] == {"STOPPING": "1"}
    n.close()


class Lines:
    """A logger that keeps what it was given (the Notifier's only collaborator here)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **kw: self.lines.append((level, event, kw))


def test_notifier_errors_are_logged_once_never_raised(tmp_path: Path) -> None:
    log = Lines()
    n = Notifier(log, environ={"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert n.enabled
    assert [n.watchdog() for _ in range(5)] == [False] * 5
    assert [(lvl, ev) for lvl, ev, _ in log.lines] == [("error", "notify_failed")]


def test_disabled_notifier_is_a_no_op() -> None:
    n = Notifier(environ={"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_interval is None
    assert not n.ready() and not n.watchdog()


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_us() -> None:
    me = os.getpid()
    assert watchdog_usec({"WATCHDOG_USEC": "30000000"}, me) == 30_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(me)}, me) == 30_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, me) is None
    assert watchdog_usec({"WATCHDOG_USEC": "0"}, me) is None
    assert watchdog_usec({"WATCHDOG_USEC": "soon"}, me) is None
    assert watchdog_usec({}, me) is None
    n = Notifier(environ={"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval == 15.0


# -- the shipped unit ---------------------------------------------------------------------------


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    return tool


def test_unit_verifies(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    # verify wants the binaries to exist: the venv's stands in for the package's.
    venv_binary = Path(REPO / ".venv" / "bin" / "haproxy-forwarder")
    if not venv_binary.exists():
        venv_binary = Path(shutil.which("haproxy-forwarder") or "/nonexistent")
    assert venv_binary.exists(), "haproxy-forwarder is not installed in the venv"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_BINARY, str(venv_binary)))
    r = subprocess.run([tool, "verify", "--man=no", str(copy)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_unit_exposure_is_at_most_2() -> None:
    tool = _systemd_analyze()
    r = subprocess.run([tool, "security", "--offline=yes", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-500:]
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


def test_unit_keeps_what_the_daemon_needs() -> None:
    """The settings the daemon depends on, which a hardening pass could silently drop."""
    directives = [line.strip() for line in UNIT.read_text().splitlines()
                  if line.strip() and not line.startswith("#")]
    for needed in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=always",
                   "UMask=0077", "StateDirectory=haproxy-forwarder",
                   "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                   "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                   "ExecReload=/bin/kill -HUP $MAINPID"):
        assert needed in directives, needed
