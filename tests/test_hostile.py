"""Hostile bytes and floods: the daemon keeps running and other connections are untouched.

After every attack a well-behaved connection must still deliver its events exactly once to the
fake intake, and the daemon process must still be alive. Counters are read from the `stopped`
log line the daemon writes on SIGTERM.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from devtools.daemon import Daemon
from devtools.probe import samples, steady, wait_at_rest, wait_until
from devtools.traffic import (
    haproxy_line,
    lf_framed,
    octet_counted,
    send_tcp,
    send_udp,
    traditional,
)
from tests.fake_intake import FakeIntake

MakeDaemon = Callable[..., Daemon]
SMALL = 2048  # listen.max_message_size for the tests that need frames over it


# -- helpers -------------------------------------------------------------------------------------


def _tag() -> str:
    return uuid.uuid4().hex[:10]


def _wait_events(intake: FakeIntake, want: Iterable[str], timeout: float = 20.0, *,
                 d: Daemon | None = None) -> None:
    """Each wanted event arrives exactly once (and nothing else carrying the same tags).

    Given the daemon `d`, "no duplicate on its way" is the daemon at rest (nothing held, all
    accounted for); without it, no new event at the intake for 0.3 s."""
    want_c = collections.Counter(want)

    def got() -> collections.Counter[str]:
        return collections.Counter(e for e in intake.event_texts() if e in want_c)

    def diff() -> str:
        have = got()
        missing, extra = list((want_c - have).elements()), list((have - want_c).elements())
        return f"missing {missing[:3]} ({len(missing)}), extra {extra[:3]}"

    wait_until(lambda: got() >= want_c, timeout, f"{len(want_c)} distinct events at the intake",
               step=0.05, detail=diff)
    if d is not None:
        wait_at_rest(d.status_port, closed=False, detail=d.stderr_text)
    else:
        wait_until(steady(lambda: len(intake.events), 0.3), 10,
                   "no new event at the intake for 0.3 s", step=0.05)
    assert got() == want_c, diff()


def read(d: Daemon, name: str) -> float:
    """A counter of the daemon, summed over its labels (listeners)."""
    return samples(d.status_port)[name]


def wait_read(d: Daemon, name: str, at_least: float) -> None:
    """Wait until the daemon has read what was sent: `name` (received_frames_total,
    received_bytes_total, connections_open...) at `at_least`."""
    wait_until(lambda: read(d, name) >= at_least, 10, f"{name} >= {at_least}",
               detail=lambda: read(d, name))


def _good_lines(tag: str, n: int) -> list[str]:
    return [f"{tag} {haproxy_line(i)}" for i in range(n)]


def assert_healthy(d: Daemon, intake: FakeIntake, n: int = 30) -> list[str]:
    """The daemon runs and a new well-behaved TCP connection delivers exactly once."""
    assert d.proc is not None and d.proc.poll() is None, d.stderr_text()[-2000:]
    lines = _good_lines(_tag(), n)
    send_tcp(d.tcp_port, octet_counted(traditional("haproxy", x) for x in lines))
    _wait_events(intake, lines, d=d)
    assert d.proc.poll() is None
    return lines


def assert_only(intake: FakeIntake, expected: list[str]) -> None:
    """Everything the intake got is exactly `expected` (no garbage event slipped through)."""
    got = collections.Counter(intake.event_texts())
    want = collections.Counter(expected)
    assert got == want, (
        f"missing {list((want - got).elements())[:3]}, extra {list((got - want).elements())[:3]}"
    )


def stop_counters(d: Daemon) -> dict[str, Any]:
    assert d.stop() == 0
    assert "Traceback" not in d.stderr_text()
    return d.events("stopped")[-1]


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def closed_by_peer(s: socket.socket, timeout: float = 5.0) -> bool:
    """True when the daemon closes the connection (EOF or reset) within timeout."""
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def blast(port: int, payload: bytes, chunk: int = 65536) -> None:
    """Send hostile bytes; the daemon may hang up on us at any point, which is fine."""
    with contextlib.suppress(OSError), _connect(port) as s:
        for off in range(0, len(payload), chunk):
            s.sendall(payload[off : off + chunk])
        s.shutdown(socket.SHUT_WR)
        closed_by_peer(s, 10)


def run_threads(targets: list[Callable[[], None]], timeout: float = 60.0) -> None:
    errors: list[BaseException] = []

    def wrap(f: Callable[[], None]) -> Callable[[], None]:
        def inner() -> None:
            try:
                f()
            except BaseException as exc:  # reported in the test thread
                errors.append(exc)
        return inner

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "sender thread hung"
    if errors:
        raise errors[0]


def hp(msg: str) -> bytes:
    return traditional("haproxy", msg)


# -- regressions for the peers' bugs (/work/shared/peers.md) ------------------------------------


def test_vector_4852_lf_message_starting_with_digit_stays_lf(intake: FakeIntake,
                                                             daemon: MakeDaemon) -> None:
    """An LF connection keeps its framing although later frames start with digits."""
    d = daemon(intake)
    t = _tag()
    frames = [
        hp(f"{t} first, decides LF"),
        # HAProxy "iso"-like line: no PRI, the frame itself starts with digits.
        f"2026-11-26T21:58:51+01:00 lb1 haproxy[4242]: 42 {t} starts with a digit".encode(),
        hp(f"5 {t} MSG starts with a count-like digit"),
        f"17 <134>Nov 26 21:58:51 lb1 haproxy[1]: {t} looks octet-counted".encode(),
        hp(f"{t} last"),
    ]
    with _connect(d.tcp_port) as s:
        for n, f in enumerate(frames, 1):  # one read per frame: reads begin with digit lines
            s.sendall(f + b"\n")
            wait_read(d, "received_frames_total", n)
        s.shutdown(socket.SHUT_WR)
        assert closed_by_peer(s)
    _wait_events(intake, [
        f"{t} first, decides LF",
        f"42 {t} starts with a digit",
        f"5 {t} MSG starts with a count-like digit",
        f"{t} last",
    ], d=d)
    assert not d.events("framing_error")
    assert_healthy(d, intake)
    c = stop_counters(d)
    assert c["received_frames"] >= 5 and c["framing_errors"] == 0


def test_vector_4895_1_23_4_twice_does_not_loop(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake)
    # As in the issue: `echo "1 <23>4\n1 <23>4" | nc`, then the same as two separate writes.
    with _connect(d.tcp_port) as s:
        s.sendall(b"1 <23>4\n1 <23>4\n")
        assert closed_by_peer(s)
    before = read(d, "received_bytes_total")
    with _connect(d.tcp_port) as s:
        s.sendall(b"1 <23>4")
        wait_read(d, "received_bytes_total", before + 7)  # the second write, a read of its own
        with contextlib.suppress(OSError):
            s.sendall(b"1 <23>4")
        assert closed_by_peer(s)
    assert_healthy(d, intake)
    assert len(d.events("framing_error")) == 1  # the second is in its summary (rate limit)
    c = stop_counters(d)
    assert sum(e.get("suppressed", 1) for e in d.events("framing_error")) == 2
    assert c["framing_errors"] == 2 and c["accepted_events"] == 30


def test_vector_pr_25657_oversized_octet_frame_split_across_reads(intake: FakeIntake,
                                                                  daemon: MakeDaemon) -> None:
    """Frames after an over-length frame cut into many reads are delivered, none lost."""
    d = daemon(intake, listen={"max_message_size": SMALL})
    t = _tag()
    before = [f"{t} before {i}" for i in range(3)]
    after = [f"{t} after {i}" for i in range(200)]
    tail = [f"{t} tail {i}" for i in range(3)]
    big1 = hp("x" * 50_000)
    big2 = hp("y" * (SMALL + 1))
    stream = (octet_counted(hp(x) for x in before) + octet_counted([big1])
              + octet_counted(hp(x) for x in after) + octet_counted([big2])
              + octet_counted(hp(x) for x in tail))
    with _connect(d.tcp_port) as s:
        # Small pieces with pauses: the length prefixes and bodies straddle many reads.
        pieces = [stream[i : i + 97] for i in range(0, len(stream), 97)]
        for n, piece in enumerate(pieces):
            s.sendall(piece)
            if n % 20 == 0:
                time.sleep(0.002)  # pacing, so the daemon reads small pieces: the scenario
        s.shutdown(socket.SHUT_WR)
        assert closed_by_peer(s, 20)
    _wait_events(intake, before + after + tail, d=d)
    assert_healthy(d, intake)
    assert len(d.events("frame_too_large")) == 1  # logged once per connection...
    c = stop_counters(d)
    assert c["oversized_frames"] == 2  # ...counted every time
    assert c["framing_errors"] == 0


# -- invalid octet counts ------------------------------------------------------------------------


BAD_PREFIXES = {
    "letters": b"abc <134>Nov 26 21:58:51 lb1 haproxy[1]: letters\n",
    "letters_after_digits": b"12ab <134>Nov 26 21:58:51 lb1 haproxy[1]: x\n",
    "leading_zeros": b"0042 <134>Nov 26 21:58:51 lb1 haproxy[1]: zeros.............\n",
    "absurd_digit_run": b"9" * 400 + b" <134>Nov 26 21:58:51 lb1 haproxy[1]: big\n",
    "endless_digits": b"7" * 100_000,
    "negative": b"-12 <134>Nov 26 21:58:51 \n",
    "space_first": b" 12 <134>Nov 26 21:58:51 \n",
}


def test_invalid_length_prefixes_close_that_connection_only(intake: FakeIntake,
                                                            daemon: MakeDaemon) -> None:
    d = daemon(intake)
    t = _tag()
    good = _connect(d.tcp_port)
    good.sendall(octet_counted([hp(f"{t} steady before")]))
    expected = [f"{t} steady before"]
    for name, bad in BAD_PREFIXES.items():
        with _connect(d.tcp_port) as s:
            s.sendall(octet_counted([hp(f"{t} {name} ok")]))  # octet-counted from byte 1
            expected.append(f"{t} {name} ok")
            wait_read(d, "received_frames_total", len(expected))  # read before the bad bytes
            with contextlib.suppress(OSError):
                s.sendall(bad)
            assert closed_by_peer(s), f"{name}: connection left open"
    # A connection that starts with an invalid count (a zero) is refused the same way.
    with _connect(d.tcp_port) as s:
        s.sendall(b"05 <13>x\n")
        assert closed_by_peer(s), "leading zero at connection start"
    good.sendall(octet_counted([hp(f"{t} steady after")]))
    good.close()
    expected.append(f"{t} steady after")
    _wait_events(intake, expected, d=d)
    assert_healthy(d, intake)
    n_bad = len(BAD_PREFIXES) + 1
    c = stop_counters(d)
    errors = d.events("framing_error")  # rate-limited: the first, then a summary with a count
    assert sum(e.get("suppressed", 1) for e in errors) == n_bad, [e.get("error") for e in errors]
    assert all(e["action"] == "connection closed" for e in errors)
    assert c["framing_errors"] == n_bad


def test_lf_line_over_max_message_size_resyncs(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake, listen={"max_message_size": SMALL})
    t = _tag()
    good1 = [f"{t} a{i}" for i in range(50)]
    good2 = [f"{t} b{i}" for i in range(50)]
    good3 = [f"{t} c{i}" for i in range(5)]
    stream = (lf_framed(hp(x) for x in good1)
              + hp("z" * 100_000) + b"\n"  # far over, arrives in many reads
              + lf_framed(hp(x) for x in good2)
              + hp("w" * SMALL) + b"\n"  # just over (header + SMALL bytes)
              + lf_framed(hp(x) for x in good3))
    with _connect(d.tcp_port) as s:
        for i in range(0, len(stream), 1000):
            s.sendall(stream[i : i + 1000])
        s.shutdown(socket.SHUT_WR)
        assert closed_by_peer(s)
    _wait_events(intake, good1 + good2 + good3, d=d)
    assert_healthy(d, intake)
    assert len(d.events("frame_too_large")) == 1
    c = stop_counters(d)
    assert c["oversized_frames"] == 2 and c["framing_errors"] == 0


# -- garbage --------------------------------------------------------------------------------------


def test_random_bytes_on_several_connections_at_once(intake: FakeIntake,
                                                     daemon: MakeDaemon) -> None:
    d = daemon(intake, listen={"max_message_size": SMALL})
    t = _tag()
    payloads = []
    for seed in range(6):
        data = bytearray(random.Random(seed).randbytes(1_000_000))
        # Exercise both framings: a digit first means octet counting, anything else LF.
        data[0] = ord("7") if seed % 2 else ord("<")
        payloads.append(bytes(data))
    steady = [f"{t} during {i}" for i in range(300)]

    def steady_sender() -> None:
        with _connect(d.tcp_port) as s:
            for i in range(0, len(steady), 10):
                s.sendall(octet_counted(hp(x) for x in steady[i : i + 10]))
                time.sleep(0.005)  # pacing: steady traffic all through the blasts
            s.shutdown(socket.SHUT_WR)
            assert closed_by_peer(s, 20)

    senders = [lambda p=p: blast(d.tcp_port, p) for p in payloads]
    run_threads([*senders, steady_sender])
    _wait_events(intake, steady, d=d)
    healthy = assert_healthy(d, intake)
    assert_only(intake, steady + healthy)  # no garbage came out as an event
    c = stop_counters(d)
    assert c["received_bytes"] > 1_000_000


def test_nul_bytes(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake, listen={"max_message_size": SMALL})
    t = _tag()
    blast(d.tcp_port, b"\0" * 1_000_000)  # one endless NUL "line"
    blast(d.tcp_port, b"\0\0\0\n" * 1000)  # many short NUL lines
    lf_after = [f"{t} lf after nul {i}" for i in range(10)]
    send_tcp(d.tcp_port, b"\0" * 5000 + b"\n" + lf_framed(hp(x) for x in lf_after))
    oc_after = [f"{t} octet after nul {i}" for i in range(10)]
    send_tcp(d.tcp_port, b"5 \0\0\0\0\0" + b"3000 " + b"\0" * 3000
             + octet_counted(hp(x) for x in oc_after))
    _wait_events(intake, lf_after + oc_after, d=d)
    healthy = assert_healthy(d, intake)
    assert_only(intake, lf_after + oc_after + healthy)
    c = stop_counters(d)
    assert c["oversized_frames"] == 3  # the 1 MB line, the 5000-byte line, the 3000 frame


def test_udp_garbage_flood_oversized_and_empty_datagrams(intake: FakeIntake,
                                                         daemon: MakeDaemon) -> None:
    d = daemon(intake, listen={"max_message_size": SMALL})
    t = _tag()
    rng = random.Random(4242)
    garbage = [rng.randbytes(rng.randrange(1, 1400)) for _ in range(5000)]
    send_udp(d.udp_port, garbage)
    send_udp(d.udp_port, [b""] * 200 + [b"\n"] * 200 + [b"\0" * 100] * 100)
    # All read before more comes (the socket's receive queue is no part of the test).
    wait_read(d, "received_bytes_total", sum(map(len, garbage)) + 200 + 100 * 100)
    oversized = [b"o" * (SMALL + 1), hp("p" * 10_000), b"q" * 60_000]
    send_udp(d.udp_port, oversized, per_ms=1)
    udp_good = [f"{t} udp {i}" for i in range(200)]
    send_udp(d.udp_port, (hp(x) + b"\n" for x in udp_good))
    _wait_events(intake, udp_good, d=d)
    healthy = assert_healthy(d, intake)
    assert_only(intake, udp_good + healthy)
    c = stop_counters(d)
    assert c["oversized_frames"] == len(oversized)
    assert c["udp_dropped"] == 0


def test_connections_that_send_nothing(intake: FakeIntake, daemon: MakeDaemon) -> None:
    d = daemon(intake)
    for i in range(60):
        s = socket.create_connection(("127.0.0.1", d.tcp_port), timeout=10)
        if i % 2:  # half of them reset instead of closing politely
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()
    # Half a frame then a reset: nothing delivered, nothing stuck.
    s = _connect(d.tcp_port)
    s.sendall(b"120 <134>Nov 26 21:58:51 lb1 haproxy[1]: cut")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    s.close()
    healthy = assert_healthy(d, intake)
    assert_only(intake, healthy)
    c = stop_counters(d)
    assert c["connections_open"] == 0
    assert c["accepted_events"] == 30


def test_slowloris_one_byte_at_a_time_is_delivered(intake: FakeIntake,
                                                   daemon: MakeDaemon) -> None:
    d = daemon(intake)
    t = _tag()
    slow_oc = octet_counted([hp(f"{t} slow octet-counted")])
    slow_lf = lf_framed([hp(f"{t} slow lf")])

    def drip(payload: bytes) -> None:
        with _connect(d.tcp_port) as s:
            for b in payload:
                s.sendall(bytes([b]))
                time.sleep(0.004)  # the slow sender's pace: the attack itself
            s.shutdown(socket.SHUT_WR)
            assert closed_by_peer(s)

    def others() -> None:
        wait_read(d, "connections_open", 2)  # the slow senders are connected
        assert_healthy(d, intake)  # not held up by the slow senders

    run_threads([lambda: drip(slow_oc), lambda: drip(slow_lf), others])
    _wait_events(intake, [f"{t} slow octet-counted", f"{t} slow lf"], d=d)
    assert_healthy(d, intake)


# -- limits and floods ----------------------------------------------------------------------------


def test_max_connections_per_address_refuses_extra_ones(intake: FakeIntake,
                                                        daemon: MakeDaemon) -> None:
    d = daemon(intake, listen={"max_connections_per_address": 5}, log={"stats_interval": 0.1})
    t = _tag()
    first = [_connect(d.tcp_port) for _ in range(5)]
    wait_read(d, "connections_open", 5)  # the daemon took these five before the rest arrive
    extra = [socket.create_connection(("127.0.0.1", d.tcp_port), timeout=10) for _ in range(15)]
    try:
        refused = sum(closed_by_peer(s, 5) for s in extra)
        assert refused == 15
        lines = []
        for i, s in enumerate(first):
            lines.append(f"{t} kept {i}")
            s.sendall(octet_counted([hp(f"{t} kept {i}")]))
            s.shutdown(socket.SHUT_WR)
            assert closed_by_peer(s)
    finally:
        for s in first + extra:
            s.close()
    _wait_events(intake, lines, d=d)
    # Rate-limited: the first refusal at once, the 14 others in one line that counts them.
    summary = d.wait_log("connection_refused", timeout=1)
    assert summary["reason"] == "listen.max_connections_per_address reached"
    wait_until(lambda: len(d.events("connection_refused")) >= 2, 10,
               "the refusals' summary line")
    refusals = d.events("connection_refused")
    assert len(refusals) == 2 and refusals[1]["suppressed"] == 14
    # The slots come back once those connections are gone.
    wait_until(lambda: read(d, "connections_open") == 0, 10, "no connection open")
    assert_healthy(d, intake)
    c = stop_counters(d)
    assert c["connections_refused"] == 15 and c["connections_accepted"] == 6


def test_silent_connections_at_the_limit_are_evicted_for_new_senders(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    d = daemon(intake, listen={"max_connections": 3})
    t = _tag()
    squatters = [_connect(d.tcp_port) for _ in range(3)]
    wait_read(d, "connections_open", 3)
    try:
        newcomer = _connect(d.tcp_port)
        newcomer.sendall(octet_counted([hp(f"{t} newcomer")]))
        newcomer.shutdown(socket.SHUT_WR)
        assert closed_by_peer(newcomer)
        # The oldest squatter got a FIN (and then the close), at once: it never sent a frame.
        assert closed_by_peer(squatters[0], 5)
        assert not closed_by_peer(squatters[1], 0.2)
    finally:
        for s in [*squatters, newcomer]:
            s.close()
    _wait_events(intake, [f"{t} newcomer"], d=d)
    assert d.events("connection_evicted_idle")[0]["complete_frames"] is False
    assert d.events("connection_refused") == []
    c = stop_counters(d)
    assert c["connections_evicted"] == 1 and c["connections_refused"] == 0


def test_at_the_limit_connections_that_sent_frames_outlive_frameless_ones(
        intake: FakeIntake, daemon: MakeDaemon) -> None:
    """Eviction goes by the last complete frame: a byte-trickler is no better than silence."""
    d = daemon(intake, listen={"max_connections": 2})
    t = _tag()
    trickler = _connect(d.tcp_port)  # the oldest connection, and bytes keep coming
    wait_read(d, "connections_open", 1)
    sender = _connect(d.tcp_port)
    first = octet_counted([hp(f"{t} first")])
    sender.sendall(first)
    try:
        for n in range(1, 4):
            trickler.sendall(b"9")  # the start of a frame that never ends
            wait_read(d, "received_bytes_total", len(first) + n)  # each read after the frame
        _wait_events(intake, [f"{t} first"], d=d)
        extra = _connect(d.tcp_port)
        assert closed_by_peer(trickler, 5)  # evicted, though its last byte is the newest
        extra2 = _connect(d.tcp_port)
        assert closed_by_peer(extra, 5)  # frameless: the next one to go
        sender.sendall(octet_counted([hp(f"{t} second")]))
        sender.shutdown(socket.SHUT_WR)
        assert closed_by_peer(sender)
        extra.close()
        extra2.close()
    finally:
        trickler.close()
        sender.close()
    _wait_events(intake, [f"{t} first", f"{t} second"], d=d)
    c = stop_counters(d)
    assert c["connections_evicted"] == 2 and c["connections_refused"] == 0


def test_flood_many_connections_thousands_of_frames_exact(intake: FakeIntake,
                                                          daemon: MakeDaemon) -> None:
    d = daemon(intake, batch={"max_delay": 0.2, "max_events": 2000})
    t = _tag()
    n_conn, per_conn = 24, 3000
    payloads: list[bytes] = []
    expected: list[str] = []
    for c in range(n_conn):
        frames = []
        for i in range(per_conn):
            if i % 500 == 0:  # other programs mixed in, to be filtered out
                frames.append(traditional("sshd", f"{t} c{c} noise {i}"))
            else:
                line = f"{t} c{c} {haproxy_line(i)}"
                expected.append(line)
                frames.append(hp(line))
        # Half the connections octet-counted, half LF-framed.
        payloads.append(octet_counted(frames) if c % 2 else lf_framed(frames))
    run_threads([lambda p=p: send_tcp(d.tcp_port, p, chunk=8192) for p in payloads])
    _wait_events(intake, expected, timeout=60, d=d)
    assert_only(intake, expected)
    assert_healthy(d, intake)
    c = stop_counters(d)
    assert c["framing_errors"] == 0 and c["oversized_frames"] == 0
    assert c["filtered_out"] == n_conn * len(range(0, per_conn, 500))


@pytest.mark.parametrize("first", [b"1", b"<"])
def test_frame_boundary_at_every_byte(intake: FakeIntake, daemon: MakeDaemon,
                                      first: bytes) -> None:
    """The same stream cut at every possible offset into two writes delivers the same."""
    d = daemon(intake)
    t = _tag()
    lines = [f"{t} boundary {i}" for i in range(3)]
    frames = [hp(x) for x in lines]
    stream = octet_counted(frames) if first == b"1" else lf_framed(frames)
    step = max(1, len(stream) // 40)
    conns = []
    for cut in range(1, len(stream), step):
        s = _connect(d.tcp_port)
        s.sendall(stream[:cut])
        conns.append((s, cut))
    wait_read(d, "received_bytes_total", sum(cut for _, cut in conns))  # first parts read
    for s, cut in conns:
        s.sendall(stream[cut:])
        s.close()
    _wait_events(intake, lines * len(conns), d=d)
    assert_healthy(d, intake)
