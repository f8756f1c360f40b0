"""Scale-out with the engines users run (docs/scale-out.md), proven with the real ones: HAProxy
3.0 and rsyslog 8.2504 from the Debian 13 chroot (devtools/trixie.py, tests/trixie_peers.py),
rsyslog 8.2302 from Debian 12, in front of several real forwarder daemons (devtools/daemon.py,
each its own ports and spool) sharing one FakeIntake. The engines run the SHIPPED configs
(config/haproxy/haproxy-log-backend.cfg, haproxy-log-forward.cfg, haproxy-l4-proxy.cfg;
config/rsyslog/haproxy-forwarder-pool.conf, haproxy-forwarder-failover.conf,
haproxy-forwarder-relp.conf), only their placeholders (addresses, ports, the local file)
replaced, and their resume intervals shortened.

For each topology, two runs (one for the L4 balancer):
- clean: every event reaches the intake exactly once (the exact multiset), and each
  forwarder's share is what the algorithm promises (printed; roundrobin within 2 %; the
  failover primary everything);
- one forwarder SIGKILLed in the middle of the stream: what is lost is counted, printed and
  explained, and bounded. TCP: the events sent to the killed forwarder in the fraction of a
  second before the kill (its open batch, the bytes in its socket); RELP: what rsyslog's
  failover drops itself (one message, or one input read), or nothing through the L4
  balancer. The killed forwarder's spool is delivered by starting it again, or by `spool
  deliver` from elsewhere when it stays dead.

Every stream is paced (a rate, not a flood: what a fleet of HAProxy hosts sends), and its
events carry `seq=NNNNNNN`, so losses and duplicates are exact. The whole module takes about
2.5 minutes here (2 cores); the log-forward stream is the 200,000 messages the issue asks for,
the others 4,000 HTTP requests (HAProxy's own logs) or 60,000 lines.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from devtools import REPO
from devtools.daemon import Daemon, base_config, run_cli
from devtools.probe import metric, samples, steady, wait_at_rest, wait_until
from devtools.traffic import octet_frame, rfc5424
from tests.conftest import intake_section
from tests.fake_intake import FakeIntake
from tests.realpeers import free_port, have, port_listening
from tests.trixie_peers import TrixieRun, trixie_run

pytestmark = pytest.mark.timeout(300)

CONFIG = REPO / "config"
LOG_BACKEND = CONFIG / "haproxy" / "haproxy-log-backend.cfg"
LOG_FORWARD = CONFIG / "haproxy" / "haproxy-log-forward.cfg"
POOL = CONFIG / "rsyslog" / "haproxy-forwarder-pool.conf"
FAILOVER = CONFIG / "rsyslog" / "haproxy-forwarder-failover.conf"

SEQ = re.compile(r"seq=(\d+)")
# A killed forwarder is started again on its spool (and its port) this long after the kill.
DOWN_FOR = 2.0
# Roundrobin shares: each forwarder's within this fraction of an equal share.
RR_TOLERANCE = 0.02


def line(seq: int) -> str:
    """One HAProxy-shaped access log line carrying its sequence number."""
    return (f"10.{seq % 250}.{(seq // 250) % 250}.7:{40000 + seq % 20000} "
            f"[07/Dec/2026:12:00:00.{seq % 1000:03d}] fe be/srv{seq % 7} 0/0/1/2/3 200 "
            f"{1000 + seq % 9000} - - ---- 1/1/0/0/0 0/0 \"GET /items/{seq} HTTP/1.1\" "
            f"seq={seq:07d}")


# ----------------------------------------------------------------------------- forwarders


@dataclass
class Forwarder:
    """One haproxy-forwarder daemon: its own home (config, spool), TCP or RELP port."""

    name: str
    home: Path
    intake: FakeIntake
    kind: Literal["tcp", "relp"] = "tcp"
    # Behind an L4 balancer on loopback: its connections start with a PROXY header.
    proxied: bool = False
    port: int = field(default_factory=free_port)
    daemon: Daemon | None = None
    # Events its earlier runs accepted (a restart starts its counters from 0).
    accepted_before: int = 0
    # Its last metrics before a kill, and what its restarted run found on its spool.
    last_seen: dict[str, float] = field(default_factory=dict)
    recovered_events: int = 0

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        listen: dict[str, Any] = {"tcp": [], "udp": [], "relp": []}
        listen[self.kind] = [f"127.0.0.1:{self.port}"]
        if self.proxied:
            listen["proxy_protocol"] = ["127.0.0.1/32"]
        self.config = base_config(self.home, listen=listen,
                                  intake=intake_section(self.intake, retry_max=0.5))

    @property
    def spool(self) -> Path:
        return Path(self.config["spool"]["dir"])

    def start(self) -> Forwarder:
        self.daemon = Daemon(self.home, self.config, file_prefix=self.name).start()
        return self

    def status_port(self) -> int:
        assert self.daemon is not None
        return self.daemon.status_port

    def accepted(self) -> int:
        """Events it accepted, over all its runs (the killed run's as last seen)."""
        now = int(metric(self.status_port(), "accepted_events_total"))
        return self.accepted_before + now

    def kill(self) -> None:
        """SIGKILL, as a crash (its last metrics kept first)."""
        d = self.daemon
        assert d is not None and d.proc is not None
        with contextlib.suppress(OSError):
            seen = samples(d.status_port)
            self.last_seen = {k: seen.get(k, 0.0) for k in
                              ("accepted_events_total", "delivered_events_total",
                               "relp_acks_total", "spool_events")}
        d.proc.kill()
        d.proc.wait(10)
        d.close_files()
        self.accepted_before += int(self.last_seen.get("accepted_events_total", 0))

    def restart(self) -> None:
        """Started again on the same spool and port: its spool is replayed."""
        self.start()
        assert self.daemon is not None
        opened = self.daemon.wait_log("spool_opened", 10) if not self.daemon.events(
            "spool_recovered_torn_tail") else self.daemon.events("spool_recovered_torn_tail")[-1]
        self.recovered_events = int(opened["events"])

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.proc is not None \
                and self.daemon.proc.poll() is None:
            self.daemon.stop()


@contextlib.contextmanager
def fleet(tmp: Path, intake: FakeIntake, n: int, kind: Literal["tcp", "relp"] = "tcp",
          proxied: bool = False) -> Iterator[list[Forwarder]]:
    fwds = [Forwarder(f"fwd{i + 1}", tmp / f"fwd{i + 1}", intake, kind, proxied)
            for i in range(n)]
    try:
        for f in fwds:
            f.start()
        yield fwds
    finally:
        for f in fwds:
            f.stop()


# ----------------------------------------------------------------------------- senders


class Stream(threading.Thread):
    """`n` messages to 127.0.0.1:`port` over one TCP connection at `rate` per second, in
    chunks of `chunk`; `times[k]` is when message k*chunk was sent (for the loss window)."""

    def __init__(self, port: int, n: int, rate: float, frame: Callable[[int], bytes],
                 chunk: int = 50) -> None:
        super().__init__(daemon=True, name=f"stream-{port}")
        self.port, self.n, self.rate, self.frame, self.chunk = port, n, rate, frame, chunk
        self.sent = 0
        self.times: list[float] = []
        self.error: BaseException | None = None

    def reached(self, count: float) -> bool:
        if self.error is not None:
            raise AssertionError(f"the sender failed: {self.error!r}")
        return self.sent >= count

    def sent_at(self, seq: int) -> float:
        return self.times[min(seq // self.chunk, len(self.times) - 1)]

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                start = time.monotonic()
                while self.sent < self.n:
                    k = min(self.chunk, self.n - self.sent)
                    data = b"".join(self.frame(i) for i in range(self.sent, self.sent + k))
                    self.times.append(time.monotonic())
                    s.sendall(data)
                    self.sent += k
                    pause = start + self.sent / self.rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)  # the sender's rate: the load itself, not a wait
                s.shutdown(socket.SHUT_WR)
                with contextlib.suppress(OSError):
                    s.settimeout(5)
                    while s.recv(4096):
                        pass
        except BaseException as exc:  # reported by the test
            self.error = exc


def octet_rfc5424(seq: int) -> bytes:
    """An RFC 5424 frame (HAProxy `format rfc5424`), octet-counted."""
    return octet_frame(rfc5424("haproxy", line(seq), ts="2026-12-07T12:00:00.000000+00:00"))


def lf_traditional(seq: int) -> bytes:
    """An RFC 3164 line, LF-framed (what rsyslog's imptcp input reads)."""
    return f"<134>Dec  7 12:00:00 web1 haproxy[4242]: {line(seq)}\n".encode()


class HttpLoad(threading.Thread):
    """`n` HTTP requests to HAProxy's frontend at `rate` per second over `conns` keep-alive
    connections; request i asks `/items/i`, so HAProxy's access log line carries
    `seq`-like `GET /items/i` (read back by `http_seq`)."""

    def __init__(self, port: int, n: int, rate: float, conns: int = 4) -> None:
        super().__init__(daemon=True, name=f"http-{port}")
        self.port, self.n, self.rate, self.conns = port, n, rate, conns
        self.sent = 0
        self.times: list[float] = [0.0] * n
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._next = 0
        self._start = 0.0

    def reached(self, count: float) -> bool:
        if self.error is not None:
            raise AssertionError(f"the HTTP load failed: {self.error!r}")
        return self.sent >= count

    def sent_at(self, seq: int) -> float:
        return self.times[seq]

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= self.n:
                return None
            i = self._next
            self._next += 1
            return i

    def _worker(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
                f = s.makefile("rb")
                while (i := self._take()) is not None:
                    pause = self._start + i / self.rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)  # the load's rate, not a wait
                    self.times[i] = time.monotonic()
                    s.sendall(f"GET /items/{i} HTTP/1.1\r\nHost: lb\r\n\r\n".encode())
                    status = f.readline()
                    length = 0
                    while (h := f.readline()) not in (b"\r\n", b""):
                        if h.lower().startswith(b"content-length:"):
                            length = int(h.split(b":")[1])
                    f.read(length)
                    assert status.startswith(b"HTTP/1.1 200"), status
                    with self._lock:
                        self.sent += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def run(self) -> None:
        self._start = time.monotonic()
        workers = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.conns)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()


HTTP_SEQ = re.compile(r"GET /items/(\d+) ")


# ----------------------------------------------------------------------------- accounting


@dataclass
class Tally:
    """What reached the intake, against the `n` events sent."""

    n: int
    counts: collections.Counter[int]

    @classmethod
    def of(cls, intake: FakeIntake, n: int, pattern: re.Pattern[str] = SEQ) -> Tally:
        counts: collections.Counter[int] = collections.Counter()
        for text in intake.event_texts():
            m = pattern.search(text)
            assert m is not None, f"unexpected event at the intake: {text[:100]!r}"
            counts[int(m[1])] += 1
        assert all(0 <= s < n for s in counts), "an event that was never sent"
        return cls(n, counts)

    @property
    def lost(self) -> list[int]:
        return [s for s in range(self.n) if s not in self.counts]

    @property
    def duplicates(self) -> int:
        return sum(c - 1 for c in self.counts.values() if c > 1)

    def exactly_once(self) -> bool:
        return len(self.counts) == self.n and not self.duplicates


def wait_all(intake: FakeIntake, n: int, pattern: re.Pattern[str] = SEQ,
             timeout: float = 60.0) -> Tally:
    """Every one of the `n` events at the intake (then checked for duplicates)."""
    wait_until(lambda: len(intake.events) >= n, timeout, f"{n} events at the intake",
               step=0.1, detail=lambda: f"{len(intake.events)} there")
    return Tally.of(intake, n, pattern)


def wait_settled(intake: FakeIntake, fwds: Sequence[Forwarder], quiet: float = 2.0,
                 timeout: float = 60.0) -> None:
    """Nothing more can come: every forwarder holds nothing and the intake got nothing new
    for `quiet` seconds (TCP: nothing says when all that will arrive has arrived)."""
    wait_until(steady(lambda: len(intake.events), quiet), timeout,
               f"no new event at the intake for {quiet:g} s", step=0.1)
    for f in fwds:
        wait_at_rest(f.status_port(), closed=False, timeout=timeout)


def shares(fwds: Sequence[Forwarder]) -> dict[str, int]:
    return {f.name: f.accepted() for f in fwds}


def share_line(what: str, got: dict[str, int]) -> str:
    total = sum(got.values()) or 1
    parts = ", ".join(f"{k} {v} ({100 * v / total:.1f} %)" for k, v in got.items())
    return f"{what}: {parts}"


def assert_round_robin(got: dict[str, int], total: int) -> None:
    fair = total / len(got)
    for name, v in got.items():
        assert abs(v - fair) <= RR_TOLERANCE * fair, (
            f"{name} took {v} of {total}, not {fair:.0f} +/- {RR_TOLERANCE:.0%}: {got}")


@dataclass
class KillReport:
    """One SIGKILL in the middle of a stream, and what it cost."""

    what: str
    tally: Tally
    killed: Forwarder
    t_kill: float
    sent_at: Callable[[int], float]
    seconds: float

    def window(self) -> tuple[float, float]:
        """When the lost events were sent, relative to the kill (seconds)."""
        times = [self.sent_at(s) - self.t_kill for s in self.tally.lost]
        return (min(times), max(times)) if times else (0.0, 0.0)

    def line(self) -> str:
        lost = self.tally.lost
        lo, hi = self.window()
        accepted = int(self.killed.last_seen.get("accepted_events_total", -1))
        delivered = int(self.killed.last_seen.get("delivered_events_total", -1))
        return (f"{self.what}: {self.tally.n} sent, {len(self.tally.counts)} distinct at the "
                f"intake, {len(lost)} lost ({100 * len(lost) / self.tally.n:.3f} %, sent "
                f"{lo:+.2f} s to {hi:+.2f} s around the kill), {self.tally.duplicates} "
                f"duplicates; {self.killed.name} had accepted {accepted} and delivered "
                f"{delivered} at its last scrape before the kill ({accepted - delivered} not "
                f"delivered yet: in its memory, lost with it unless RELP resends them, or on "
                f"its spool), its spool held "
                f"{self.killed.recovered_events} when started again or delivered; "
                f"{self.seconds:.1f} s")


def kill_and_restart(stream: Stream | HttpLoad, victim: Forwarder, at: float,
                     down_for: float = DOWN_FOR) -> float:
    """SIGKILL `victim` once `at` of the stream is sent; start it again `down_for` s later
    (same port, same spool). The time of the kill."""
    wait_until(functools.partial(stream.reached, stream.n * at), 60,
               f"the stream {at:.0%} through", step=0.01)
    victim.kill()
    t_kill = time.monotonic()
    time.sleep(down_for)  # the outage itself (the scenario), not a wait
    victim.restart()
    return t_kill


# ----------------------------------------------------------------------------- the shipped configs


def substituted(path: Path, replacements: Sequence[tuple[str, str]]) -> str:
    """The shipped file with each (old, new) replaced; each `old` must be there."""
    text = path.read_text()
    for old, new in replacements:
        assert old in text, f"{path}: {old!r} not found (the file changed: update the test)"
        text = text.replace(old, new)
    return text


def log_backend_cfg(run: TrixieRun, fwds: Sequence[Forwarder], http_port: int) -> str:
    """config/haproxy/haproxy-log-backend.cfg for 2 forwarders on loopback; the frontend on
    `http_port` answering 200 itself; a stats socket."""
    a, b = fwds
    return substituted(LOG_BACKEND, [
        ("tcp@192.0.2.11:1514", f"tcp@127.0.0.1:{a.port}"),
        ("tcp@192.0.2.12:1514", f"tcp@127.0.0.1:{b.port}"),
        ("    bind :80\n", f"    bind 127.0.0.1:{http_port}\n"),
        ("server app1 192.0.2.20:8080",
         "http-request return status 200 content-type text/plain string ok"),
        ("    log-send-hostname\n",
         f"    log-send-hostname\n    stats socket {run.inner_path('admin.sock')} level admin\n"),
    ])


def log_forward_cfg(run: TrixieRun, fwds: Sequence[Forwarder], port: int) -> str:
    """config/haproxy/haproxy-log-forward.cfg for 3 forwarders, receiving on `port`."""
    subs = [(f"tcp@192.0.2.1{i + 1}:1514", f"tcp@127.0.0.1:{f.port}")
            for i, f in enumerate(fwds)]
    return substituted(LOG_FORWARD, [
        *subs,
        ("    bind :1514\n", f"    bind 127.0.0.1:{port}\n"),
        ("    dgram-bind :1514\n", f"    dgram-bind 127.0.0.1:{port}\n"),
        ("global\n", f"global\n    stats socket {run.inner_path('admin.sock')} level admin\n"),
    ])


def rsyslog_body(rule: Path, ports: Sequence[int], in_port: int, local_file: str,
                 extra: Sequence[tuple[str, str]] = ()) -> str:
    """An imptcp input on `in_port` and the shipped `rule`, its placeholders replaced: the
    forwarders on 127.0.0.1 at `ports` (the pool's two, or the primary's and the backup's)."""
    a, b = ports
    subs = [("FORWARDER_HOST_1", "127.0.0.1"), ("FORWARDER_HOST_2", "127.0.0.1"),
            ("/var/log/haproxy.log", local_file), *extra]
    if rule == POOL:
        subs.append(('port="1514"', f'port=["{a}", "{b}"]'))
    else:  # the failover rule: one port line per action, the primary's first
        text = rule.read_text()
        first = text.index('port="2514"')
        text = (text[:first] + f'port="{a}"'
                + text[first + len('port="2514"'):].replace('port="2514"', f'port="{b}"', 1))
        for old, new in subs:
            assert old in text, f"{rule}: {old!r} not found"
            text = text.replace(old, new)
        return (f'module(load="imptcp")\n'
                f'input(type="imptcp" address="127.0.0.1" port="{in_port}")\n{text}')
    return (f'module(load="imptcp")\ninput(type="imptcp" address="127.0.0.1" port="{in_port}")\n'
            + substituted(rule, subs))


# The failover file's resume interval (30 s) shortened, so the primary takes over again
# within the test; everything else as shipped. Not below 2 s: at 1 s rsyslog (8.2302 and
# 8.2504 alike) keeps retrying the dead primary and never uses the backup (measured).
FAST_PRIMARY = ('action.resumeInterval="30"', 'action.resumeInterval="5"')


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def trixie(tmp_path: Path) -> Iterator[TrixieRun]:
    with trixie_run(tmp_path) as run:  # one skip line when the chroot cannot be had
        yield run


# ----------------------------------------------------------------------------- 1. mode log backend


HTTP_N = 4000
HTTP_RATE = 800.0  # requests per second: 5 s of HAProxy traffic


def test_haproxy_hosts_log_to_a_mode_log_backend_of_two(
        tmp_path: Path, trixie: TrixieRun, intake: FakeIntake) -> None:
    """HAProxy 3.0 sending its own access logs straight to `backend forwarders` (`mode log`,
    `balance roundrobin`, TCP, health-checked): each request's line reaches the intake
    once; the two forwarders take a half each."""
    with fleet(tmp_path, intake, 2) as fwds:
        http_port = free_port()
        trixie.haproxy(log_backend_cfg(trixie, fwds, http_port))
        load = HttpLoad(http_port, HTTP_N, HTTP_RATE * 4)
        load.start()
        load.join(60)
        assert load.error is None and load.sent == HTTP_N, load.error
        tally = wait_all(intake, HTTP_N, HTTP_SEQ)
        got = shares(fwds)
        print("\n" + share_line(f"mode log roundrobin, {HTTP_N} requests", got))
        assert tally.exactly_once(), (len(tally.lost), tally.duplicates)
        assert sum(got.values()) == HTTP_N
        assert_round_robin(got, HTTP_N)


def test_a_mode_log_backend_with_one_forwarder_killed(
        tmp_path: Path, trixie: TrixieRun, intake: FakeIntake) -> None:
    t0 = time.monotonic()
    with fleet(tmp_path, intake, 2) as fwds:
        http_port = free_port()
        hap = trixie.haproxy(log_backend_cfg(trixie, fwds, http_port))
        load = HttpLoad(http_port, HTTP_N, HTTP_RATE)
        load.start()
        t_kill = kill_and_restart(load, fwds[1], 0.3)
        states = hap.cli("show servers state forwarders")
        load.join(60)
        assert load.error is None and load.sent == HTTP_N, load.error
        wait_settled(intake, fwds)
        report = KillReport("mode log, fwd2 SIGKILLed and restarted", Tally.of(
            intake, HTTP_N, HTTP_SEQ), fwds[1], t_kill, load.sent_at, time.monotonic() - t0)
        print("\n" + report.line())
        print(share_line("accepted per forwarder (all runs)", shares(fwds)))
        print("HAProxy's view after the restart:\n" + states)
        check_kill_loss(report, rate=HTTP_RATE / 2)


def check_kill_loss(report: KillReport, rate: float) -> None:
    """The loss of a TCP topology, explained: only events sent to the killed forwarder
    within about a second before the kill (its open batch, batch.max_delay 0.2 s here, and
    what its socket still held) or in the instant after (written into the dead connection
    before HAProxy/rsyslog saw it close); never more than `rate` (its share per second) over
    that window; no duplicates."""
    lost = report.tally.lost
    lo, hi = report.window()
    assert report.tally.duplicates == 0, report.line()
    assert len(lost) <= rate * 1.5, report.line()
    if lost:
        assert lo >= -1.5 and hi <= 0.5, report.line()


# ----------------------------------------------------------------------------- 2. log-forward


LF_N = 200_000
LF_RATE = 25_000.0  # messages per second into log-forward: 8 s


def test_log_forward_balances_a_stream_over_three(
        tmp_path: Path, trixie: TrixieRun, intake: FakeIntake) -> None:
    """A central HAProxy 3.0 `log-forward` (config/haproxy/haproxy-log-forward.cfg)
    receiving 200,000 messages over one TCP connection and balancing them per message
    (roundrobin) over 3 forwarders: each gets a third, every message arrives once."""
    t0 = time.monotonic()
    with fleet(tmp_path, intake, 3) as fwds:
        port = free_port()
        trixie.haproxy(log_forward_cfg(trixie, fwds, port))
        stream = Stream(port, LF_N, LF_RATE, octet_rfc5424)
        stream.start()
        stream.join(120)
        assert stream.error is None, stream.error
        tally = wait_all(intake, LF_N)
        got = shares(fwds)
        print("\n" + share_line(f"log-forward roundrobin, {LF_N} messages over one "
                                f"connection, {time.monotonic() - t0:.1f} s", got))
        assert tally.exactly_once(), (len(tally.lost), tally.duplicates)
        assert sum(got.values()) == LF_N
        assert_round_robin(got, LF_N)


def test_log_forward_with_one_of_three_killed(
        tmp_path: Path, trixie: TrixieRun, intake: FakeIntake) -> None:
    t0 = time.monotonic()
    with fleet(tmp_path, intake, 3) as fwds:
        port = free_port()
        trixie.haproxy(log_forward_cfg(trixie, fwds, port))
        stream = Stream(port, LF_N, LF_RATE, octet_rfc5424)
        stream.start()
        t_kill = kill_and_restart(stream, fwds[2], 0.4)
        stream.join(120)
        assert stream.error is None, stream.error
        wait_settled(intake, fwds)
        report = KillReport("log-forward, fwd3 of 3 SIGKILLed and restarted",
                            Tally.of(intake, LF_N), fwds[2], t_kill, stream.sent_at,
                            time.monotonic() - t0)
        print("\n" + report.line())
        print(share_line("accepted per forwarder (all runs)", shares(fwds)))
        check_kill_loss(report, rate=LF_RATE / 3)


# ----------------------------------------------------------------------------- 3. rsyslog


RS_N = 60_000
RS_RATE = 10_000.0  # lines per second into rsyslog: 6 s


def start_rsyslog(trixie: TrixieRun, rule: Path, fwds: Sequence[Forwarder],
                  extra: Sequence[tuple[str, str]] = ()) -> int:
    """rsyslog 8.2504 with the shipped `rule`; the port of its imptcp input."""
    in_port = free_port()
    body = rsyslog_body(rule, [f.port for f in fwds], in_port,
                        trixie.inner_path("haproxy.log"), extra)
    trixie.rsyslog(body, unix_socket=False, wait_tcp=[in_port])
    return in_port


def test_rsyslog_pool_balances_over_two(
        tmp_path: Path, trixie: TrixieRun, intake: FakeIntake) -> None:
    """rsyslog 8.2504's omfwd target pool (config/rsyslog/haproxy-forwarder-pool.conf):
    per message, in turn, over 2 forwarders."""
    with fleet(tmp_path, intake, 2) as fwds:
        in_port = start_rsyslog(trixie, POOL, fwds)
        stream = Stream(in_port, RS_N, RS_RATE, lf_traditional)
        stream.start()
        stream.join(60)
        assert stream.error is None, stream.error
        tally = wait_all(intake, RS_N)
        got = shares(fwds)
        print("\n" + share_line(f"rsyslog omfwd pool, {RS_N} messages", got))
        assert tally.exactly_once(), (len(tally.lost), tally.duplicates)
        assert sum(got.values()) == RS_N
        assert_round_robin(got, RS_N)


def test_rsyslog_pool_with_one_forwarder_killed(
        tmp_path: Path, trixie: TrixieRun, intake: FakeIntake) -> None:
    """The pool's reliable queue (disk-assisted, resumeRetryCount -1): a forwarder killed
    mid-stream leaves the pool, the other takes everything; what TCP loses is bounded."""
    t0 = time.monotonic()
    with fleet(tmp_path, intake, 2) as fwds:
        in_port = start_rsyslog(trixie, POOL, fwds,
                                [('pool.resumeInterval="30"', 'pool.resumeInterval="1"')])
        stream = Stream(in_port, RS_N, RS_RATE, lf_traditional)
        stream.start()
        t_kill = kill_and_restart(stream, fwds[1], 0.4)
        stream.join(60)
        assert stream.error is None, stream.error
        wait_settled(intake, fwds)
        report = KillReport("rsyslog pool, fwd2 SIGKILLed and restarted", Tally.of(
            intake, RS_N), fwds[1], t_kill, stream.sent_at, time.monotonic() - t0)
        print("\n" + report.line())
        print(share_line("accepted per forwarder (all runs)", shares(fwds)))
        check_kill_loss(report, rate=RS_RATE / 2)


# 10 s: long enough that rsyslog, retrying the primary only when a message comes after
# action.resumeInterval (5 s here), finds it back while the stream still flows.
RELP_N = 60_000
RELP_RATE = 6_000.0
CHUNK = 50  # lines per write of the sender: what rsyslog's imptcp reads at once, at most


class HostRsyslog:
    """Debian 12's rsyslogd (8.2302) on the host, private: its config, work directory and
    output in `tmp` (the failover rule is for rsyslog without target pools)."""

    def __init__(self, tmp: Path, body: str, wait_port: int) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "work").mkdir(exist_ok=True)
        self.conf = tmp / "rsyslog.conf"
        self.conf.write_text(f'global(workDirectory="{tmp / "work"}")\n{body}')
        self.output = tmp / "rsyslogd.out"
        check = subprocess.run(["rsyslogd", "-N1", "-f", str(self.conf)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        with self.output.open("wb") as out:
            self.proc = subprocess.Popen(
                ["rsyslogd", "-n", "-f", str(self.conf), "-i", str(tmp / "rsyslogd.pid")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        wait_until(lambda: port_listening(wait_port) or self.proc.poll() is not None, 10,
                   f"rsyslogd 8.2302 listening on {wait_port}")
        assert self.proc.poll() is None, self.output.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


ENGINES = ("8.2504", "8.2302")


@contextlib.contextmanager
def failover_rsyslog(request: pytest.FixtureRequest, engine: str, tmp: Path,
                     fwds: Sequence[Forwarder]) -> Iterator[int]:
    """rsyslog `engine` (8.2504 from the chroot, 8.2302 from the host) with the shipped
    failover rule over `fwds` (primary, backup); the port of its imptcp input."""
    if engine == "8.2504":
        run: TrixieRun = request.getfixturevalue("trixie")
        yield start_rsyslog(run, FAILOVER, fwds, [FAST_PRIMARY])
        return
    if not have("rsyslogd") or not OMRELP_HOST:
        pytest.skip("requires Debian packages rsyslog and rsyslog-relp (Debian 12's 8.2302)")
    in_port = free_port()
    body = rsyslog_body(FAILOVER, [f.port for f in fwds], in_port, str(tmp / "haproxy.log"),
                        [FAST_PRIMARY])
    rs = HostRsyslog(tmp / "rsyslog-8.2302", body, in_port)
    try:
        yield in_port
    finally:
        rs.stop()


OMRELP_HOST = any(Path(d, "omrelp.so").exists() for d in (
    "/usr/lib/x86_64-linux-gnu/rsyslog", "/usr/lib/aarch64-linux-gnu/rsyslog",
    "/usr/lib/rsyslog", "/usr/lib64/rsyslog"))


@pytest.mark.parametrize("engine", ENGINES)
def test_relp_failover_goes_to_the_primary_only(
        request: pytest.FixtureRequest, engine: str, tmp_path: Path,
        intake: FakeIntake) -> None:
    """Failover (config/rsyslog/haproxy-forwarder-failover.conf, omrelp): the primary takes
    everything, the backup nothing, while the primary is up."""
    with fleet(tmp_path, intake, 2, kind="relp") as fwds, \
            failover_rsyslog(request, engine, tmp_path, fwds) as in_port:
        stream = Stream(in_port, RELP_N, RELP_RATE * 2, lf_traditional, CHUNK)
        stream.start()
        stream.join(60)
        assert stream.error is None, stream.error
        tally = wait_all(intake, RELP_N)
        got = shares(fwds)
        print("\n" + share_line(f"rsyslog {engine} RELP failover, {RELP_N} messages", got))
        assert tally.exactly_once(), (len(tally.lost), tally.duplicates)
        assert got == {"fwd1": RELP_N, "fwd2": 0}


@pytest.mark.parametrize("engine", ENGINES)
def test_relp_failover_when_the_primary_dies(
        request: pytest.FixtureRequest, engine: str, tmp_path: Path,
        intake: FakeIntake) -> None:
    """The primary SIGKILLed mid-stream with batches on its spool (the intake slowed down
    just before): the backup takes over within seconds; the dead primary's spool is
    delivered from elsewhere (`spool deliver`); the primary, started again, gets what
    omrelp had not seen acknowledged and takes over again.

    Lost: only what rsyslog drops itself when it suspends the primary: the message (8.2504)
    or the rest of the input batch (8.2302) it was sending when it found the session broken;
    never more than one read of its input (CHUNK lines). Duplicates: the requests the dead
    primary had in flight (the intake took them, the answer never came back, so its spool
    still had them: `spool deliver` sends them again), and what omrelp resends."""
    t0 = time.monotonic()
    with fleet(tmp_path, intake, 2, kind="relp") as fwds, \
            failover_rsyslog(request, engine, tmp_path, fwds) as in_port:
        primary, backup = fwds
        stream = Stream(in_port, RELP_N, RELP_RATE, lf_traditional, CHUNK)
        stream.start()
        wait_until(functools.partial(stream.reached, RELP_N * 0.2), 60, "20 % sent", step=0.01)
        intake.set_delay(0.5)  # batches wait on the primary's spool
        wait_until(lambda: metric(primary.status_port(), "spool_events") >= 1000, 10,
                   "1,000 events on the primary's spool")
        primary.kill()
        t_kill = time.monotonic()
        intake.set_delay(0.0)
        # The rescue: its spool delivered from another place, with its config.
        assert primary.daemon is not None
        rescue = run_cli("--config", str(primary.daemon.config_path), "spool", "deliver",
                         "--dir", str(primary.spool), "--timeout", "30", timeout=60)
        assert rescue.returncode == 0, rescue.stdout + rescue.stderr
        done = re.search(r"done: (\d+)/", rescue.stdout)
        assert done is not None, rescue.stdout
        rescued = int(done[1])
        time.sleep(max(0.0, DOWN_FOR - (time.monotonic() - t_kill)))  # the outage itself
        primary.restart()
        stream.join(60)
        assert stream.error is None, stream.error
        with contextlib.suppress(AssertionError):  # what is missing is said below
            wait_until(lambda: len(Tally.of(intake, RELP_N).counts) >= RELP_N - CHUNK, 30,
                       step=0.2)
        wait_settled(intake, fwds, quiet=3.0)
        report = KillReport(f"rsyslog {engine} RELP failover, the primary SIGKILLed and "
                            "restarted", Tally.of(intake, RELP_N), primary, t_kill,
                            stream.sent_at, time.monotonic() - t0)
        lost = report.tally.lost
        print("\n" + rescue.stdout.strip())
        print(report.line())
        print(f"lost: {lost[:CHUNK]}; the primary had answered "
              f"{int(primary.last_seen.get('relp_acks_total', -1))} messages and held "
              f"{int(primary.last_seen.get('spool_events', -1))} events on its spool at its "
              f"last scrape; spool deliver took {rescued} off it")
        print(share_line("accepted per forwarder (all runs)", shares(fwds)))
        assert backup.accepted() > 0, "the backup never took over"
        assert rescued >= 1000 and primary.recovered_events == 0
        assert len(lost) <= CHUNK, report.line()
        if lost:  # one run of consecutive messages, sent around the kill
            assert lost == list(range(lost[0], lost[0] + len(lost))), lost
            lo, hi = report.window()
            assert lo >= -1.0 and hi <= 1.0, report.line()
        assert report.tally.duplicates <= rescued + 512, report.line()  # + windowSize


# ----------------------------------------------------------------------------- 4. L4 + PROXY


L4 = CONFIG / "haproxy" / "haproxy-l4-proxy.cfg"
RELP_RULE = CONFIG / "rsyslog" / "haproxy-forwarder-relp.conf"


def l4_relp_cfg(fwds: Sequence[Forwarder], port: int) -> str:
    """config/haproxy/haproxy-l4-proxy.cfg: its global and defaults, and its RELP frontend and
    backend (commented out in the file) uncommented, on loopback."""
    text = L4.read_text()
    head = text[:text.index("frontend syslog-tcp")]
    block = text[text.index("#frontend syslog-relp"):]
    lines = []
    for ln in block.splitlines():
        if not ln.startswith("#") or (ln.startswith("# ") and not ln.startswith("#  ")):
            break  # the prose after the block
        lines.append(ln[1:])
    relp = "\n".join(lines) + "\n"
    a, b = fwds
    return head + substituted_text(relp, [
        ("    bind :2514\n", f"    bind 127.0.0.1:{port}\n"),
        ("192.0.2.11:2514", f"127.0.0.1:{a.port}"), ("192.0.2.12:2514", f"127.0.0.1:{b.port}")])


def substituted_text(text: str, replacements: Sequence[tuple[str, str]]) -> str:
    for old, new in replacements:
        assert old in text, f"{old!r} not found (the shipped file changed: update the test)"
        text = text.replace(old, new)
    return text


def test_relp_through_an_l4_balancer_when_a_forwarder_dies(
        tmp_path: Path, trixie: TrixieRun, intake: FakeIntake) -> None:
    """rsyslog 8.2504 with the single-target RELP rule (haproxy-forwarder-relp.conf) sending
    through HAProxy 3.0 in `mode tcp` with the PROXY protocol (haproxy-l4-proxy.cfg, its RELP
    part) to 2 forwarders: the one holding the session is SIGKILLed and never comes back.
    omrelp reconnects through the balancer to the other and resends what was not answered;
    what the dead one had answered is on its spool, delivered from elsewhere with `spool
    deliver`. Nothing lost; duplicates: what was both on its spool and resent."""
    t0 = time.monotonic()
    with fleet(tmp_path, intake, 2, kind="relp", proxied=True) as fwds:
        lb = free_port()
        trixie.haproxy(l4_relp_cfg(fwds, lb))
        in_port = free_port()
        rule = substituted(RELP_RULE, [
            ('target="FORWARDER_HOST"', 'target="127.0.0.1"'), ('port="2514"', f'port="{lb}"'),
            ("/var/log/haproxy.log", trixie.inner_path("haproxy.log")),
            ('action.resumeInterval="10"', 'action.resumeInterval="1"')])
        trixie.rsyslog(f'module(load="imptcp")\n'
                       f'input(type="imptcp" address="127.0.0.1" port="{in_port}")\n{rule}',
                       unix_socket=False, wait_tcp=[in_port])
        stream = Stream(in_port, RELP_N, RELP_RATE, lf_traditional, CHUNK)
        stream.start()
        wait_until(functools.partial(stream.reached, RELP_N * 0.3), 60, "30 % sent", step=0.01)
        dead = max(fwds, key=Forwarder.accepted)  # the one rsyslog's session went to
        other = fwds[1] if dead is fwds[0] else fwds[0]
        intake.set_delay(0.5)  # batches wait on its spool
        wait_until(lambda: metric(dead.status_port(), "spool_events") >= 500, 10,
                   "500 events on the spool of the session's forwarder")
        dead.kill()
        t_kill = time.monotonic()
        intake.set_delay(0.0)
        wait_until(lambda: other.accepted() > 0, 30, "the other forwarder taking over",
                   step=0.05)
        took_over = time.monotonic() - t_kill
        stream.join(60)
        assert stream.error is None, stream.error
        wait_settled(intake, [other], quiet=3.0)
        before = Tally.of(intake, RELP_N)
        assert dead.daemon is not None
        rescue = run_cli("--config", str(dead.daemon.config_path), "spool", "deliver",
                         "--dir", str(dead.spool), "--timeout", "30", timeout=60)
        assert rescue.returncode == 0, rescue.stdout + rescue.stderr
        done = re.search(r"done: (\d+)/", rescue.stdout)
        assert done is not None, rescue.stdout
        dead.recovered_events = int(done[1])
        report = KillReport("RELP through the L4 balancer, the session's forwarder "
                            "SIGKILLed for good", Tally.of(intake, RELP_N), dead, t_kill,
                            stream.sent_at, time.monotonic() - t0)
        print("\n" + rescue.stdout.strip())
        print(report.line())
        print(f"the other forwarder took over {took_over:.1f} s after the kill; before the "
              f"dead one's spool was delivered {len(before.lost)} were missing")
        assert not report.tally.lost, (report.line(), report.tally.lost[:10])
        # Its requests in flight (taken by the intake, unanswered: on its spool still) and
        # what omrelp resent although it was on the spool (answered, the answer lost).
        assert report.tally.duplicates <= dead.recovered_events + 128, report.line()


# ----------------------------------------------------------------------------- config checks


def test_the_failover_rule_is_valid_for_debian_12s_rsyslog(tmp_path: Path) -> None:
    """The failover file is for rsyslog without target pools: Debian 12's 8.2302 takes it,
    and refuses the pool file (its target array) with a clear message."""
    if not have("rsyslogd"):
        pytest.skip("requires Debian package rsyslog (rsyslogd not found)")
    for rule, ok in ((FAILOVER, True), (POOL, False)):
        body = rsyslog_body(rule, [2514, 2515], free_port(), str(tmp_path / "haproxy.log"))
        conf = tmp_path / f"{rule.stem}.conf"
        (tmp_path / "work").mkdir(exist_ok=True)
        conf.write_text(f'global(workDirectory="{tmp_path / "work"}")\n{body}')
        res = subprocess.run(["rsyslogd", "-N1", "-f", str(conf)], capture_output=True,
                             text=True, timeout=30)
        print(f"\nrsyslogd 8.2302 -N1 {rule.name}: exit {res.returncode} {res.stderr.strip()}")
        assert (res.returncode == 0) is ok, res.stderr
        if not ok:
            assert "parameter 'target' is not a string" in res.stderr

