"""Several intakes are isolated from each other (issue 19), end to end on the real daemon.

Three scenarios, each with one fake HTTPS intake per configured intake (own CA, own key) and
senders on loopback addresses of their own (127.0.0.2/.3/.4, bound before connecting) so that
routes by source choose their intake:

1. An intake refusing the key (401), then unreachable, delays no other: 100,000 events of two
   healthy intakes all arrive, exactly once, while it still fails; /metrics and /healthz name
   it; once it recovers its own 5,000 events all arrive, once each, in order per connection.
2. spool.when_full = "block" per intake: the intake whose spool share is full holds back only
   the connections routed to it (and the ones whose routes lead to it among others, as
   documented), and drops (counted) only the UDP datagrams routed to it; the healthy intake
   keeps receiving. Once it is back, the held connections resume and nothing they sent is lost.
   A TCP connection or RELP session opened while its intake is already held is held back too
   (it was not: uvloop ignores a pause asked in connection_made).
3. RELP across two intakes by program: each message is answered only once durable in its own
   intake (delivered, or on its spool while it is down); none is answered while its intake is
   down and its spool share full; everything is answered and delivered once it is back.

Every event carries its sender, connection and sequence number ("a c3 s000042 ..."), so loss,
duplication and reordering are all visible at the fake intakes. Waits have deadlines; the
durations asserted on (a sender making no progress) are windows of a condition, not sleeps.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.daemon import Daemon, base_config
from devtools.probe import until, wait_at_rest, wait_until
from devtools.traffic import haproxy_line, octet_counted, traditional
from tests.fake_intake import FakeIntake
from tests.test_metrics import http_get, scrape, value
from tests.test_relp_source import OFFERS, RelpClient

pytestmark = pytest.mark.timeout(180)

KIB = 1024
TAG = re.compile(r"^(\w+) c(\d+) s(\d+) ")
# One key per intake: 32 alphanumeric characters, distinct.
KEYS = {name: (f"Isolation{name.upper()}Key" + "0123456789" * 3)[:32] for name in "abc"}
SENDER = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}


# -- traffic --------------------------------------------------------------------------------


def text(tag: str, conn: int, seq: int, pad: int = 0) -> str:
    """The event the intake must receive: its origin first, then a real-shaped HAProxy line."""
    return f"{tag} c{conn} s{seq:06d} {haproxy_line(seq)}" + (" " + "p" * pad if pad else "")


def frames(tag: str, conn: int, seqs: Iterable[int], program: str = "haproxy",
           pad: int = 0) -> tuple[bytes, list[str]]:
    """An octet-counted payload and the events it must produce (the tag is stripped)."""
    texts = [text(tag, conn, s, pad) for s in seqs]
    return octet_counted(traditional(program, t) for t in texts), texts


def origin(event: str) -> tuple[str, int, int]:
    m = TAG.match(event)
    assert m is not None, f"unexpected event at an intake: {event[:80]!r}"
    return m.group(1), int(m.group(2)), int(m.group(3))


def connect_from(source: str, port: int, sndbuf: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sndbuf:  # small: what the daemon does not read stays visibly with the sender
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    s.bind((source, 0))
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    return s


def send_udp_from(source: str, port: int, datagrams: Iterable[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        for d in datagrams:
            s.sendto(d, ("127.0.0.1", port))
            time.sleep(0.002)  # the sender's pace (no kernel drop on a loaded machine)


class Sender(threading.Thread):
    """One TCP connection from `source`: `payload` as fast as the daemon reads it, with short
    send timeouts so its progress (`offset`) is visible; then a half-close and a wait for the
    daemon's close (everything read)."""

    def __init__(self, source: str, port: int, payload: bytes, sndbuf: int = 0,
                 limit: float = 120.0) -> None:
        super().__init__(daemon=True, name=f"sender-{source}")
        self.source, self.port, self.payload, self.sndbuf = source, port, payload, sndbuf
        self.limit = limit
        self.offset = 0
        self.last_progress = time.monotonic()
        self.done = False
        self.error: BaseException | None = None

    def idle_for(self) -> float:
        return time.monotonic() - self.last_progress

    def run(self) -> None:
        try:
            with connect_from(self.source, self.port, self.sndbuf) as s:
                s.settimeout(0.2)
                view = memoryview(self.payload)
                deadline = time.monotonic() + self.limit
                while self.offset < len(view) and time.monotonic() < deadline:
                    try:
                        self.offset += s.send(view[self.offset : self.offset + 65536])
                    except TimeoutError:
                        continue
                    self.last_progress = time.monotonic()
                s.settimeout(30)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
                self.done = self.offset == len(view)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self, timeout: float) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"sender {self.source} still running after {timeout} s"
        assert self.error is None and self.done, (self.error, self.offset, len(self.payload))


class PacedSender(threading.Thread):
    """One TCP connection from `source` sending tagged events at `rate` per second until
    `stop` is set; `texts` holds what it sent."""

    def __init__(self, source: str, port: int, tag: str, conn: int, rate: int) -> None:
        super().__init__(daemon=True, name=f"paced-{source}")
        self.source, self.port, self.tag, self.conn, self.rate = source, port, tag, conn, rate
        self.stop = threading.Event()
        self.program: Callable[[int], str] = lambda seq: "haproxy"
        self.texts: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connect_from(self.source, self.port) as s:
                start = time.monotonic()
                while not self.stop.is_set() and time.monotonic() - start < 120:
                    due = int((time.monotonic() - start) * self.rate)
                    if due > len(self.texts):
                        texts = [text(self.tag, self.conn, i)
                                 for i in range(len(self.texts), due)]
                        s.sendall(octet_counted(
                            traditional(self.program(len(self.texts) + k), t)
                            for k, t in enumerate(texts)))
                        self.texts += texts
                    time.sleep(0.01)  # the pace of the scenario, not a wait for the daemon
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
        except BaseException as exc:
            self.error = exc


# -- the daemon and what it shows -------------------------------------------------------------


def intakes_section(fakes: dict[str, FakeIntake], **extra: dict[str, Any]
                    ) -> dict[str, dict[str, Any]]:
    return {name: {"url": fi.url, "ca_file": fi.ca_file, "key": KEYS[name],
                   **extra.get(name, {})} for name, fi in fakes.items()}


@pytest.fixture
def fakes() -> Iterator[dict[str, FakeIntake]]:
    made = {name: FakeIntake(key=KEYS[name]) for name in "abc"}
    for fi in made.values():
        fi.start()
    try:
        yield made
    finally:
        for fi in made.values():
            fi.stop()


@pytest.fixture
def started() -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def start(started: list[Daemon], tmp: Path, **sections: Any) -> Daemon:
    d = Daemon(tmp, base_config(tmp, **sections))
    started.append(d)
    return d.start()


def healthz(d: Daemon) -> tuple[int, dict[str, Any]]:
    status, _, body = http_get(d.status_port, "/healthz")
    return status, json.loads(body)


def gauge(d: Daemon, name: str, intake: str) -> float:
    return value(scrape(d.status_port), name, intake=intake)


def assert_exactly(fi: FakeIntake, expected: list[str], what: str) -> None:
    got, want = collections.Counter(fi.event_texts()), collections.Counter(expected)
    missing, extra = want - got, got - want
    assert not missing and not extra, (
        f"{what}: {sum(missing.values())} missing (e.g. {list(missing)[:2]}), "
        f"{sum(extra.values())} extra or duplicated (e.g. {list(extra)[:2]})")


def by_source(**intakes: str) -> list[dict[str, Any]]:
    return [{"source": f"{SENDER[tag]}/32", "intake": name} for tag, name in intakes.items()]


# -- 1. one failing intake never delays the others -------------------------------------------

CONNS_AB, PER_CONN_AB = 5, 10_000  # per sender: 50,000 events to each of a and b
CONNS_C, PER_CONN_C = 2, 2_500  # 5,000 events to c


def test_one_failing_intake_never_delays_the_others(
        tmp_path: Path, fakes: dict[str, FakeIntake], started: list[Daemon]) -> None:
    t_begin = time.monotonic()
    a, b, c = fakes["a"], fakes["b"], fakes["c"]
    c.inject(401, 10_000)  # a wrong key, as far as the daemon can tell; then down
    d = start(started, tmp_path,
              listen={"tcp": ["127.0.0.1:0"], "udp": []},
              status={"listen": "127.0.0.1:0", "stall_after": 1.0},
              # c: one worker (order per connection is kept), quick retries.
              intakes=intakes_section(fakes, c={"concurrency": 1, "auth_retry": 0.2,
                                                "retry_max": 0.5}),
              routes=by_source(a="a", b="b", c="c"))
    expected: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    senders = []
    for tag, conns, n in (("a", CONNS_AB, PER_CONN_AB), ("b", CONNS_AB, PER_CONN_AB),
                          ("c", CONNS_C, PER_CONN_C)):
        for conn in range(conns):
            payload, texts = frames(tag, conn, range(n))
            expected[tag] += texts
            senders.append(Sender(SENDER[tag], d.tcp_port, payload))
    t0 = time.monotonic()
    for s in senders:
        s.start()
    # c refuses the key a few times, then is unreachable: while a and b are being sent to.
    wait_until(lambda: sum(r["status"] == 401 for r in c.requests) >= 2, 15,
               "c answering 401 to the daemon", detail=d.stderr_text)
    c.set_down(True)
    t_down = time.monotonic() - t0
    for s in senders:
        s.finish(60)
    t_read = time.monotonic() - t0
    assert a.wait_for(len(expected["a"]), 45), f"a has {len(a.events)}"
    assert b.wait_for(len(expected["b"]), 45), f"b has {len(b.events)}"
    t_ab = time.monotonic() - t0
    # Every event of a and b arrived, none twice, while c still fails and has nothing.
    assert_exactly(a, expected["a"], "intake a")
    assert_exactly(b, expected["b"], "intake b")
    assert c.events == []
    m = scrape(d.status_port)
    assert value(m, "intake_failing", intake="c") == 1
    assert value(m, "intake_failing", intake="a") == 0
    assert value(m, "intake_failing", intake="b") == 0
    assert value(m, "backlog_batches", intake="c") >= 1
    assert value(m, "delivered_events_total", intake="a") == len(expected["a"])
    assert value(m, "delivered_events_total", intake="b") == len(expected["b"])
    assert value(m, "intake_key_rejected_total", intake="c") >= 2
    _, health = wait_until(lambda: (h := healthz(d))[0] == 503 and h, 10,
                           "/healthz failing for c", detail=lambda: healthz(d))
    assert any(r.startswith("intake c:") for r in health["reasons"]), health
    assert not any(r.startswith(("intake a:", "intake b:")) for r in health["reasons"]), health
    assert health["intakes"]["c"]["intake_failing"] is True
    assert not health["intakes"]["a"]["intake_failing"]
    assert not health["intakes"]["b"]["intake_failing"]

    # c recovers: no more refusals, reachable again.
    c.reset()
    c.set_down(False)
    t1 = time.monotonic()
    assert c.wait_for(len(expected["c"]), 30), f"c has {len(c.events)}"
    t_c = time.monotonic() - t1
    wait_at_rest(d.status_port, detail=d.stderr_text)  # nothing more on its way: no duplicate
    assert_exactly(c, expected["c"], "intake c")
    assert_exactly(a, expected["a"], "intake a, at the end")
    assert_exactly(b, expected["b"], "intake b, at the end")
    # In order per connection (c has one worker): sequence numbers increase.
    seqs: dict[int, list[int]] = collections.defaultdict(list)
    for event in c.event_texts():
        _, conn, seq = origin(event)
        seqs[conn].append(seq)
    assert {conn: s == list(range(PER_CONN_C)) for conn, s in seqs.items()} == {
        conn: True for conn in range(CONNS_C)}
    assert d.stop() == 0
    total = time.monotonic() - t_begin
    print(f"\n[isolation] c down at {t_down:.2f} s; all sent in {t_read:.2f} s; a+b "
          f"({len(expected['a']) + len(expected['b'])} events) delivered in {t_ab:.2f} s while "
          f"c failed; c's {len(expected['c'])} delivered {t_c:.2f} s after it recovered; "
          f"test {total:.1f} s")
    assert total < 60, f"the scenario took {total:.1f} s"


# -- 2. when_full = "block" holds back only what is routed to the full intake -----------------

B_EVENTS, B_PAD = 18_000, 300  # ~9 MB to b: more than its spool share and the socket buffers
MIXED = "127.0.0.1"  # program routes from here: haproxy-a to a, haproxy-b to b


def block_daemon(started: list[Daemon], tmp: Path, fakes: dict[str, FakeIntake],
                 **listen: list[str]) -> Daemon:
    """a healthy, b down with the smallest share (64 KiB) and when_full = "block"; routes by
    source (.2 to a, .3 to b) and, from MIXED, by program to both."""
    fakes.pop("c").stop()
    fakes["b"].set_down(True)
    return start(started, tmp,
                 listen={"tcp": ["127.0.0.1:0"], "udp": [], **listen},
                 # max_in_flight 2 (the default), not 1: at 1 every batch of the healthy
                 # intake turns its backpressure on until a worker takes it, and a datagram
                 # routed to it in that moment is dropped (seen under load).
                 batch={"max_in_flight": 2, "max_events": 50},
                 spool={"when_full": "block"},
                 intakes=intakes_section(fakes, b={"spool_max_size": 64 * KIB,
                                                   "retry_max": 0.5}),
                 routes=[{"source": f"{MIXED}/32", "program": "haproxy-a", "intake": "a"},
                         {"source": f"{MIXED}/32", "program": "haproxy-b", "intake": "b"},
                         *by_source(a="a", b="b")])


def fill_b(d: Daemon) -> tuple[Sender, list[str]]:
    """A connection routed to b pushing more than b's share holds, until it is held back."""
    payload, texts = frames("b", 0, range(B_EVENTS), pad=B_PAD)
    held = Sender(SENDER["b"], d.tcp_port, payload, sndbuf=32 * KIB)
    held.start()
    wait_until(lambda: held.offset > 0 and held.idle_for() > 1.5, 60,
               "the sender routed to b held back (no progress for 1.5 s)",
               detail=lambda: f"{held.offset} of {len(payload)} bytes sent")
    assert held.offset < len(payload)
    return held, texts


def mixed_texts(fi: FakeIntake, tag: str) -> list[str]:
    return [e for e in fi.event_texts() if e.startswith(f"{tag} ")]


def test_block_holds_back_only_the_senders_routed_to_the_full_intake(
        tmp_path: Path, fakes: dict[str, FakeIntake], started: list[Daemon]) -> None:
    t_begin = time.monotonic()
    a, b = fakes["a"], fakes["b"]
    d = block_daemon(started, tmp_path, fakes, udp=["127.0.0.1:0"])
    flow = PacedSender(SENDER["a"], d.tcp_port, "a", 0, rate=300)
    # Routes to both a and b (by program): "haproxy-a" and "haproxy-b" events alternately.
    mixed = PacedSender(MIXED, d.tcp_port, "m", 0, rate=100)
    mixed.program = lambda seq: "haproxy-a" if seq % 2 == 0 else "haproxy-b"
    flow.start()
    mixed.start()
    wait_until(lambda: mixed_texts(a, "m"), 10, "the mixed connection's first events at a")
    held, to_b = fill_b(d)  # b's share fills: the connection routed to b is not read any more
    m = scrape(d.status_port)
    assert value(m, "intake_paused", intake="b") == 1
    assert value(m, "spool_blocked", intake="b") == 1
    assert value(m, "spool_blocked", intake="a") == 0
    assert value(m, "spool_bytes", intake="b") <= 64 * KIB
    status, health = healthz(d)
    assert status == 503 and any(r.startswith("intake b:") and "spool refuses writes" in r
                                 for r in health["reasons"]), health
    assert not any(r.startswith("intake a:") for r in health["reasons"]), health

    # a keeps receiving from the sender routed to it alone, while nothing more is read from
    # the one routed to b, nor from the one whose routes lead to a and b (documented).
    held_at = held.offset
    mixed_at_a = len(mixed_texts(a, "m"))
    flowing = len(mixed_texts(a, "a"))
    wait_until(lambda: len(mixed_texts(a, "a")) >= flowing + 300, 10,
               "300 more events at a while b is full", detail=d.stderr_text)
    assert held.offset == held_at, "the sender routed to b made progress"
    assert len(mixed_texts(a, "m")) == mixed_at_a, "the connection routed to a and b was read"
    assert gauge(d, "intake_paused", "b") == 1

    # UDP: to b dropped and counted, to a delivered.
    udp = f"udp://127.0.0.1:{d.udp_port}"
    to_a_udp = [text("u", 2, i) for i in range(50)]
    send_udp_from(SENDER["b"], d.udp_port,
                  (traditional("haproxy", text("u", 3, i)) for i in range(50)))
    send_udp_from(SENDER["a"], d.udp_port, (traditional("haproxy", t) for t in to_a_udp))
    wait_until(lambda: set(to_a_udp) <= set(a.event_texts()), 10,
               "the 50 datagrams routed to a at a", detail=d.stderr_text)
    dropped = value(scrape(d.status_port), "udp_dropped_total", listener=udp)
    assert dropped == 50, dropped
    t_paused = time.monotonic() - t_begin

    # b is back: the held connections resume and nothing they sent is lost.
    b.set_down(False)
    t1 = time.monotonic()
    held.finish(90)
    for s in (flow, mixed):
        s.stop.set()
        s.join(30)
        assert s.error is None and not s.is_alive()
    want_a = flow.texts + to_a_udp + mixed.texts[0::2]
    want_b = to_b + mixed.texts[1::2]
    assert b.wait_for(len(want_b), 90), f"b has {len(b.events)} of {len(want_b)}"
    t_resumed = time.monotonic() - t1
    wait_at_rest(d.status_port, detail=d.stderr_text)
    assert_exactly(a, want_a, "intake a")
    assert_exactly(b, want_b, "intake b")  # the UDP datagrams to b were dropped, never sent
    assert d.stop() == 0
    stopped = d.events("stopped")[-1]
    assert stopped["dropped_events"] == 0 and stopped["udp_dropped"] == 50
    print(f"\n[block] b held its sender after {held_at} of {len(held.payload)} bytes; a got "
          f"{len(flow.texts)} paced events, the mixed connection {len(mixed.texts)} (held "
          f"after {mixed_at_a} to a); {t_paused:.1f} s to the checks while paused; b drained "
          f"{len(want_b)} events in {t_resumed:.1f} s once back; test "
          f"{time.monotonic() - t_begin:.1f} s")


async def answers_settle(c: RelpClient, quiet: float = 1.5, timeout: float = 20.0) -> int:
    """Read answers until none came for `quiet` seconds; how many there are."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen, since = -1, loop.time()
    while loop.time() < deadline and not c.eof:
        await c.pump(0.1)
        if len(c.answers) != seen:
            seen, since = len(c.answers), loop.time()
        elif loop.time() - since >= quiet:
            break
    return len(c.answers)


@pytest.mark.parametrize("kind", ["tcp", "relp"])
def test_a_connection_opened_while_its_intake_is_held_is_held_back(
        kind: str, tmp_path: Path, fakes: dict[str, FakeIntake], started: list[Daemon]) -> None:
    """As test 2's mixed connection, but opened once b is already held: it must be held back
    too (what one read takes may be read before the pause holds).

    Found here: uvloop ignores a pause_reading() in connection_made (it starts reading right
    after it), and the connection then believed itself paused and was never paused again:
    read whole, without backpressure or relp.max_window. Fixed in sources/tcp.py and relp.py
    (pause again after connection_made, and on data while held)."""
    d = block_daemon(started, tmp_path, fakes, relp=["127.0.0.1:0"])
    fill_b(d)
    assert gauge(d, "intake_paused", "b") == 1
    # A new connection from MIXED (routes lead to a and b), its events all for a (healthy):
    # far more than one read and the socket buffers hold.
    if kind == "tcp":
        payload, _ = frames("n", 0, range(B_EVENTS), program="haproxy-a", pad=B_PAD)
        late = Sender(MIXED, d.tcp_port, payload, sndbuf=32 * KIB)
        late.start()
        wait_until(lambda: late.done or (late.offset > 0 and late.idle_for() > 1.5), 60,
                   "the late sender done or held back")
        assert not late.done and late.offset < len(payload), (
            f"the connection opened while b was held was read whole ({late.offset} bytes)")
        return

    async def session() -> int:
        c = await RelpClient.connect(relp_port(d), open_session=False)
        try:
            c.send("open", OFFERS)
            for i in range(2000):  # more than relp.max_window (128) and one read
                c.send("syslog", traditional("haproxy-a", text("n", 0, i, pad=200)))
            return await answers_settle(c)
        finally:
            await c.close()

    answered = asyncio.run(session())
    assert answered < 2001, "the session opened while b was held was read whole, all answered"


# -- 3. RELP: each message answered once durable in its own intake -----------------------------


def relp_port(d: Daemon) -> int:
    return next(int(r["port"]) for r in d.events("listening") if r.get("proto") == "relp")


def test_relp_answers_each_message_once_durable_in_its_own_intake(
        tmp_path: Path, fakes: dict[str, FakeIntake], started: list[Daemon]) -> None:
    a, b = fakes["a"], fakes["b"]
    fakes.pop("c").stop()
    b.set_down(True)
    d = start(started, tmp_path,
              listen={"tcp": [], "udp": [], "relp": ["127.0.0.1:0"]},
              spool={"when_full": "block"},
              intakes=intakes_section(fakes, b={"spool_max_size": 64 * KIB,
                                                "retry_max": 0.5}),
              routes=[{"program": "haproxy-a", "intake": "a"},
                      {"program": "haproxy-b", "intake": "b"}])
    port = relp_port(d)

    def msg(i: int, pad: int = 0) -> tuple[bytes, str, str]:
        name = "a" if i % 2 == 0 else "b"
        t = text("r", 0, i, pad)
        return traditional(f"haproxy-{name}", t), t, name

    sent: dict[str, list[str]] = {"a": [], "b": []}

    async def main() -> None:
        c = await RelpClient.connect(port)
        # b down, its share has room: answered once on b's spool; a's once delivered or
        # written ahead on a's spool.
        first = [msg(i) for i in range(40)]
        txnrs = [c.send("syslog", f) for f, _, _ in first]
        for _, t, name in first:
            sent[name].append(t)
        await c.wait_for(txnrs, timeout=15)
        assert all(c.answers[t] == b"200 OK" for t in txnrs)
        m = scrape(d.status_port)
        assert value(m, "spool_events", intake="b") == 20 and b.events == []
        assert value(m, "delivered_events_total", intake="a") \
            + value(m, "spool_appended_events_total", intake="a") >= 20
        assert value(m, "acks_pending", intake="a") == value(m, "acks_pending", intake="b") == 0

        # Fill b's share: from then on nothing more is answered (its messages cannot be made
        # durable, and the session, whose routes lead to b too, is not read).
        more = [msg(i, pad=900) for i in range(40, 400)]
        for f, t, name in more:
            txnrs.append(c.send("syslog", f))
            sent[name].append(t)
        await until(lambda: gauge(d, "spool_blocked", "b") == 1, 20, "b's spool share full",
                    step=0.05, detail=d.stderr_text)
        assert await answers_settle(c) >= 40
        got = [t for t in txnrs if t in c.answers]
        assert got == txnrs[: len(got)] and len(got) < len(txnrs), (len(got), len(txnrs))
        b_answered = sum(1 for k in range(len(got)) if k % 2 == 1)  # odd i: to b
        m = scrape(d.status_port)
        # Every b message answered is on b's spool (b has delivered nothing).
        assert b.events == []
        assert value(m, "spool_appended_events_total", intake="b") >= b_answered
        assert value(m, "intake_paused", intake="b") == 1
        print(f"\n[relp] {len(got)} of {len(txnrs)} answered before b's share was full "
              f"({b_answered} to b, {value(m, 'spool_events', intake='b'):.0f} on its spool)")

        # b is back: every message answered 200, and delivered once to its own intake.
        b.set_down(False)
        await c.wait_for(txnrs, timeout=60)
        assert all(c.answers[t] == b"200 OK" for t in txnrs)
        await c.close()

    asyncio.run(main())
    assert b.wait_for(len(sent["b"]), 30)
    wait_at_rest(d.status_port, detail=d.stderr_text)
    assert_exactly(a, sent["a"], "intake a")
    assert_exactly(b, sent["b"], "intake b")
    assert d.stop() == 0
