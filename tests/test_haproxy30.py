"""HAProxy 3.0 (Debian 13, run from the chroot of devtools/trixie.py) logging its own access
logs, in every log format it has, over UDP and over a TCP ring, to the real forwarder and the
fake Sekoia intake: what Sekoia's HAProxy parser needs arrives, byte for byte; the rest is
dropped and counted, as README ("What is sent") and docs/operations.md document.

Sekoia's HAProxy integration supports HAProxy 2.9 or later; tests/test_realpeers.py and
tests/test_integration.py run Debian 12's 2.6. Skipped with one line when the chroot cannot
be had (not root, no debootstrap, the Debian mirror unreachable): .ci/prepare-trixie builds
it before `make test`; otherwise the first test here builds it (40-60 s here, not counted
in the tests' timeout). The 28 tests take about 40 s.

Per format, over UDP (``log 127.0.0.1:P len 8192 format F local0``) and over a ring (``ring``
with ``format F`` and a ``server`` at the forwarder, ``log ring@fwd local0``; octet counting
as the shipped example, and the legacy LF framing):

- rfc5424, rfc3164, local carry the program name ``haproxy``: each line reaches the intake
  once, as the bare MSG, byte-identical to what HAProxy logged (compared with a copy HAProxy
  sends in ``format raw`` to a recorder of the test). Event time: the RFC 5424 header's (zoned,
  microseconds); rfc3164 and local have no year or zone: the forwarder's reception time.
- short, raw, priority, timed, iso carry no program name: every line is received and dropped
  as ``filtered_out`` (README names raw and short; the other three are the same case).
- Over the legacy LF ring, raw and iso lines start with a digit, which the forwarder reads as
  an octet count: ``framing_errors``, the connection closed (docs/operations.md,
  troubleshooting); nothing reaches the intake.

``test_haproxy30_wire_bytes`` pins what 3.0 puts on the wire in each format (as
test_realpeers does for 2.6), so a change in a later HAProxy shows there first. Compared by
hand (December 2026): HAProxy 3.0.11 writes, in all eight formats, the very bytes of Debian
12's 2.6.12 (short and timed with `<6>`, severity alone, where the others have `<134>`).
``test_haproxy30_via_rsyslog_8_2504_shipped_rule``: the shipped rsyslog rule with 8.2504.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from devtools.daemon import Daemon
from devtools.probe import samples, steady, wait_at_rest, wait_until
from tests.fake_intake import FakeIntake
from tests.realpeers import (
    RSYSLOG_RULE,
    RULE_LOCAL_FILE,
    RULE_PORT,
    RULE_TARGET,
    free_port,
    haproxy_cfg,
    http_get,
)
from tests.test_realpeers import (
    BSD_TS,
    RFC3339_US,
    TcpRecorder,
    UdpRecorder,
    httplog,
    lf_frames,
    octet_frames,
)
from tests.trixie_peers import TrixieRun, trixie_run

MakeDaemon = Callable[..., Daemon]

# The chroot's first build, when a test triggers it, happens in fixture setup: not timed.
pytestmark = pytest.mark.timeout(60, func_only=True)

FORMATS = ("rfc3164", "rfc5424", "local", "short", "raw", "priority", "timed", "iso")
TRANSPORTS = ("udp", "ring-octet-count", "ring-lf")
# Formats whose lines carry the program name `haproxy`, and where the event time comes from.
KEPT = {"rfc5424": "header", "rfc3164": "received", "local": "received"}
# Over a LF-framed TCP connection, a line starting with a digit reads as an octet count.
STARTS_WITH_DIGIT = ("raw", "iso")
REQUESTS = 20

HTTPLOG = re.compile(httplog().decode())
# The forwarder's reception time (no zone in the header): UTC, milliseconds.
RECEIVED_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# HAProxy's RFC 5424 time: microseconds and a zone.
ZONED_TS = re.compile(RFC3339_US.decode())

# What HAProxy 3.0.11 writes before the line, per format (%d: its pid); each UDP datagram
# then ends with one LF, each ring frame with nothing.
WIRE_HEAD = {
    "rfc3164": b"<134>" + BSD_TS + rb" localhost haproxy\[%d\]: ",
    "rfc5424": b"<134>1 " + RFC3339_US + rb" - haproxy %d - - ",
    "local": b"<134>" + BSD_TS + rb" haproxy\[%d\]: ",
    "short": b"<6>",  # severity only (facility 0), no timestamp, no tag
    "raw": b"",  # the line alone
    "priority": b"<134>",
    "timed": b"<6>" + RFC3339_US + b" ",
    "iso": RFC3339_US + b" ",
}


def wire_head(fmt: str, pid: int) -> bytes:
    return WIRE_HEAD[fmt].replace(b"%d", b"%d" % pid)


@pytest.fixture
def trixie(tmp_path: Path) -> Iterator[TrixieRun]:
    with trixie_run(tmp_path) as run:
        yield run


@pytest.fixture
def copy_recorder() -> Iterator[UdpRecorder]:
    rec = UdpRecorder()
    yield rec
    rec.close()


def ring_section(name: str, port: int, fmt: str, proto: str | None) -> str:
    return f"""
ring {name}
    format {fmt}
    maxlen 8192
    size 65536
    timeout connect 5s
    timeout server 10s
    server {name} 127.0.0.1:{port}{f" log-proto {proto}" if proto else ""}
"""


def send_requests(port: int, prefix: str, n: int = REQUESTS) -> list[str]:
    paths = [f"/{prefix}-{i}" for i in range(n)]
    for path in paths:
        assert http_get(port, path).endswith(b"\r\n\r\nok"), path
    return paths


def assert_recent(ts: str) -> None:
    when = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    assert abs(datetime.now(when.tzinfo) - when) < timedelta(minutes=1), ts


# ============================================================================ to the forwarder


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_haproxy30_to_forwarder(
    fmt: str, transport: str, trixie: TrixieRun, intake: FakeIntake, daemon: MakeDaemon,
    copy_recorder: UdpRecorder,
) -> None:
    d = daemon(intake)
    port = free_port()
    # The same lines, `format raw` (the line and a LF), to the test: what HAProxy logged.
    copy_line = f"log 127.0.0.1:{copy_recorder.port} len 8192 format raw local0"
    if transport == "udp":
        log_line, sections = f"log 127.0.0.1:{d.udp_port} len 8192 format {fmt} local0", ""
    else:
        proto = "octet-count" if transport == "ring-octet-count" else None
        log_line, sections = "log ring@fwd local0", ring_section("fwd", d.tcp_port, fmt, proto)
    cfg = haproxy_cfg(port, f"{log_line}\n    {copy_line}", sections=sections)
    hap = trixie.haproxy(cfg)
    paths = send_requests(port, f"{fmt}-{transport}")
    wait_until(lambda: len(copy_recorder.datagrams) >= REQUESTS, 10,
               f"{REQUESTS} copies of HAProxy's lines", detail=lambda: copy_recorder.datagrams)
    logged = sorted(dgram.removesuffix(b"\n").decode() for dgram in copy_recorder.datagrams)
    assert len(logged) == REQUESTS, logged
    assert sorted(HTTPLOG.fullmatch(line)["path"] for line in logged) == sorted(  # type: ignore[index]
        paths)

    if transport == "ring-lf" and fmt in STARTS_WITH_DIGIT:
        # The forwarder reads "127.0.0.1:..." / "2026-...": an octet count, then no SP.
        wait_until(lambda: samples(d.status_port).get("framing_errors_total", 0) >= 1, 10,
                   "a framing error", detail=d.stderr_text)
        hap.stop()  # no more reconnections
        m = wait_at_rest(d.status_port, detail=d.stderr_text)
        errors = d.events("framing_error")
        print(f"\n[{fmt} over the LF ring] {REQUESTS} lines logged; the forwarder counted "
              f"{m.get('framing_errors_total', 0):g} framing errors, "
              f"{m.get('received_frames_total', 0):g} frames, accepted none; first error: "
              f"{errors[0].get('error') if errors else None!r}")
        assert m.get("accepted_events_total", 0) == 0, m
        assert intake.events == []
        assert errors and "expected SP after MSG-LEN" in str(errors[0]), errors[:1]
        assert d.stop() == 0
        return

    m = wait_at_rest(d.status_port, REQUESTS, closed=False, detail=d.stderr_text)
    if fmt in KEPT:
        assert intake.wait_for(REQUESTS, 10), intake.event_texts()
    # Stopped first: the ring's connection closed, then the forwarder (exit 0) and, once it
    # is at rest again, whatever it could still have sent is at the intake.
    hap.stop()
    m = wait_at_rest(d.status_port, REQUESTS, detail=d.stderr_text)
    assert d.stop() == 0
    assert m.get("framing_errors_total", 0) == 0, m
    assert m["received_frames_total"] == REQUESTS, m
    if fmt not in KEPT:
        # no program name: received, dropped, counted
        assert m.get("filtered_out_total", 0) == REQUESTS, m
        assert m.get("accepted_events_total", 0) == 0, m
        assert intake.events == [], intake.event_texts()[:3]
        return

    events = intake.events
    assert m.get("filtered_out_total", 0) == 0, m
    assert m["accepted_events_total"] == m["delivered_events_total"] == REQUESTS, m
    # Byte-identical: each event is the line HAProxy logged, once (no PRI, time, host, tag).
    assert sorted(e.event for e in events) == logged
    assert Counter(e.event for e in events).most_common(1)[0][1] == 1
    if KEPT[fmt] == "header":
        assert all(ZONED_TS.fullmatch(e.timestamp or "") for e in events), events[0]
        assert_recent(events[0].timestamp or "")
    else:
        assert all(RECEIVED_TS.fullmatch(e.timestamp or "") for e in events), events[0]


# ============================================================================ through rsyslog


def test_haproxy30_via_rsyslog_8_2504_shipped_rule(
    trixie: TrixieRun, intake: FakeIntake, daemon: MakeDaemon, copy_recorder: UdpRecorder,
) -> None:
    """HAProxy 3.0 -> unix socket -> rsyslog 8.2504 with the shipped rule
    (config/rsyslog/haproxy-forwarder.conf: octet-counted TCP, traditional template) -> the
    forwarder: every line once, byte-identical, timed at reception (no zone in the header)."""
    d = daemon(intake)
    rule = RSYSLOG_RULE.read_text()
    local_copy = trixie.inner_path("haproxy.log")
    for old, new in ((RULE_TARGET, 'target="127.0.0.1"'), (RULE_PORT, f'port="{d.tcp_port}"'),
                     (RULE_LOCAL_FILE, local_copy)):
        assert old in rule, f"{RSYSLOG_RULE} changed: {old!r} not found"
        rule = rule.replace(old, new)
    rs = trixie.rsyslog(rule)
    port = free_port()
    copy_line = f"log 127.0.0.1:{copy_recorder.port} len 8192 format raw local0"
    hap = trixie.haproxy(haproxy_cfg(port, f"log {rs.socket_inner} local0\n    {copy_line}"))
    local = trixie.host_path(local_copy)

    def taken() -> int:
        return local.read_bytes().count(b"\n") if local.exists() else 0

    paths = []
    for i in range(REQUESTS):
        # A unix datagram socket queues 10 datagrams; HAProxy drops a line that finds it
        # full: stay within 6 of what rsyslog has taken (tests/test_integration.py, WINDOW).
        wait_until(lambda i=i: taken() >= i - 6, 10, f"rsyslog's local copy at {i - 6} lines")
        paths += send_requests(port, f"rsyslog-{i}", 1)
    assert intake.wait_for(REQUESTS, 15), intake.event_texts()
    hap.stop()
    rs.stop()  # its connection closed: at rest, nothing more can come
    m = wait_at_rest(d.status_port, REQUESTS, detail=d.stderr_text)
    assert d.stop() == 0
    wait_until(lambda: len(copy_recorder.datagrams) >= REQUESTS, 10, "the copies")
    logged = sorted(dgram.removesuffix(b"\n").decode() for dgram in copy_recorder.datagrams)
    assert sorted(HTTPLOG.fullmatch(line)["path"] for line in logged) == sorted(  # type: ignore[index]
        paths)
    events = intake.events
    assert sorted(e.event for e in events) == logged
    assert m["received_frames_total"] == m["delivered_events_total"] == REQUESTS, m
    assert all(RECEIVED_TS.fullmatch(e.timestamp or "") for e in events), events[0]


# ============================================================================ the wire bytes


@pytest.mark.parametrize("transport", ["udp", "ring-octet-count"])
def test_haproxy30_wire_bytes(transport: str, trixie: TrixieRun) -> None:
    """Every format at once (one log target each, to its own recorder), two requests."""
    port = free_port()
    if transport == "udp":
        recorders: dict[str, UdpRecorder | TcpRecorder] = {f: UdpRecorder() for f in FORMATS}
        log_lines = [f"log 127.0.0.1:{r.port} len 8192 format {f} local0"
                     for f, r in recorders.items()]
        sections = ""
    else:
        recorders = {f: TcpRecorder() for f in FORMATS}
        log_lines = [f"log ring@r{i} local0" for i in range(len(FORMATS))]
        sections = "".join(ring_section(f"r{i}", r.port, f, "octet-count")
                           for i, (f, r) in enumerate(recorders.items()))
    try:
        cfg = haproxy_cfg(port, "\n    ".join(log_lines), sections=sections)
        hap = trixie.haproxy(cfg)
        paths = send_requests(port, f"wire-{transport}", 2)

        def frames(rec: UdpRecorder | TcpRecorder) -> list[bytes]:
            if isinstance(rec, UdpRecorder):
                return list(rec.datagrams)
            return octet_frames(rec.data(), strict=False)

        for fmt, rec in recorders.items():
            wait_until(lambda r=rec: len(frames(r)) >= 2, 10, f"2 {fmt} frames")  # type: ignore[misc]
        pid = hap.pid
        hap.stop()
    finally:
        for rec in recorders.values():
            rec.close()
    tail = b"\n" if transport == "udp" else b""
    for fmt, rec in recorders.items():
        got = frames(rec)
        if isinstance(rec, TcpRecorder):
            assert b"\n" not in rec.data(), (fmt, rec.data())
        assert len(got) == 2, (fmt, got)
        seen = []
        for frame in got:
            m = re.fullmatch(wire_head(fmt, pid) + httplog() + tail, frame)
            assert m, (fmt, frame)
            seen.append(m["path"].decode())
        assert sorted(seen) == paths, (fmt, seen)


def test_haproxy30_lf_ring_short_lines(trixie: TrixieRun) -> None:
    """The legacy LF ring: each line then a LF (what the forwarder splits on)."""
    rec = TcpRecorder()
    try:
        port = free_port()
        cfg = haproxy_cfg(port, "log ring@fwd local0",
                          sections=ring_section("fwd", rec.port, "rfc5424", None))
        hap = trixie.haproxy(cfg)
        paths = send_requests(port, "lf", 3)
        wait_until(lambda: len(lf_frames(rec.data(), strict=False)) >= 3, 10, "3 LF frames")
        wait_until(steady(rec.data, 0.3), 5, "nothing more from HAProxy")
        pid = hap.pid
    finally:
        rec.close()
    frames = lf_frames(rec.data())
    got = []
    for frame in frames:
        m = re.fullmatch(wire_head("rfc5424", pid) + httplog(), frame)
        assert m, frame
        got.append(m["path"].decode())
    assert sorted(got) == paths
