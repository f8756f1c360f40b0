"""The disk spool end to end: outages, crashes, corruption, full disks, shutdown, dead letters.

The real daemon is started through its CLI (devtools/daemon.py), with real sockets in and the fake
HTTPS intake out (tests/fake_intake.py). Everything asserted is observable from outside: events
at the intake, files on disk, exit codes, JSON log lines and /proc of the daemon process.

Events carry their origin ("c<connection> s<sequence>") and, in RFC 5424 frames, a timestamp
unique to them, so loss, duplication, reordering and mixed-up timestamps are all visible.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from devtools.daemon import Daemon, base_config, run_cli
from devtools.probe import samples, wait_at_rest, wait_until
from devtools.traffic import haproxy_line, octet_counted, rfc5424, send_tcp
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.spool import HEADER_SIZE, Spool
from tests.conftest import intake_section
from tests.fake_intake import FakeIntake

MakeDaemon = Callable[..., Daemon]
KIB = 1024
MIB = 1024 * KIB
TAG = re.compile(r"^c(\d+) s(\d+) ")


# -- traffic ------------------------------------------------------------------------------------


def tagged(conn: int, seq: int, pad: int = 0) -> tuple[bytes, str, str]:
    """(RFC 5424 frame, event text the intake must get, timestamp the intake must get)."""
    ts = f"2026-11-26T1{conn}:00:00.{seq:06d}+01:00"
    text = f"c{conn} s{seq} {haproxy_line(seq)}" + (" " + "p" * pad if pad else "")
    return rfc5424("haproxy", text, ts=ts), text, ts


def stream(conn: int, n: int, start: int = 0, pad: int = 0) -> tuple[bytes, list[str]]:
    """An octet-counted payload of n tagged frames, and the events it must produce."""
    items = [tagged(conn, i, pad) for i in range(start, start + n)]
    return octet_counted(f for f, _, _ in items), [t for _, t, _ in items]


def origin(event: str) -> tuple[int, int]:
    m = TAG.match(event)
    assert m is not None, f"unexpected event at the intake: {event[:80]!r}"
    return int(m.group(1)), int(m.group(2))


class PacedSender(threading.Thread):
    """One TCP connection sending tagged frames at `rate` per second until told to stop."""

    def __init__(self, port: int, conn: int, rate: int, stop: threading.Event,
                 limit: float) -> None:
        super().__init__(daemon=True, name=f"sender-{conn}")
        self.port, self.conn, self.rate, self.stop_evt, self.limit = port, conn, rate, stop, limit
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                start = time.monotonic()
                while not self.stop_evt.is_set() and time.monotonic() - start < self.limit:
                    due = int((time.monotonic() - start) * self.rate)
                    if due > self.sent:
                        payload, _ = stream(self.conn, due - self.sent, start=self.sent)
                        s.sendall(payload)
                        self.sent = due
                    time.sleep(0.005)  # pacing at `rate`: the scenario, no wait for the daemon
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):  # the daemon closes once it has read everything
                    pass
        except BaseException as exc:  # reported by the test
            self.error = exc


class Pusher(threading.Thread):
    """Pushes a payload as fast as the daemon takes it, with short send timeouts, recording
    progress: a stalled `offset` is input held back by the daemon (TCP backpressure)."""

    def __init__(self, port: int, payload: bytes, limit: float = 120.0) -> None:
        super().__init__(daemon=True, name="pusher")
        self.port, self.payload, self.limit = port, payload, limit
        self.offset = 0
        self.last_progress = time.monotonic()
        self.timeouts = 0
        self.done = False
        self.error: BaseException | None = None

    def idle_for(self) -> float:
        return time.monotonic() - self.last_progress

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                # A small send buffer: what the daemon has not read stays here, visibly.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * KIB)
                s.settimeout(0.2)
                view = memoryview(self.payload)
                deadline = time.monotonic() + self.limit
                while self.offset < len(view) and time.monotonic() < deadline:
                    try:
                        n = s.send(view[self.offset : self.offset + 65536])
                    except TimeoutError:
                        self.timeouts += 1
                        continue
                    self.offset += n
                    self.last_progress = time.monotonic()
                s.settimeout(30)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
                self.done = self.offset == len(view)
        except BaseException as exc:
            self.error = exc


# -- observation helpers --------------------------------------------------------------------------


def last_stats(d: Daemon) -> dict[str, Any]:
    found = d.events("stats")
    return found[-1] if found else {}


def seg_sizes(spool_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in sorted((spool_dir / "segments").glob("*.seg")):
        try:
            out[p.name] = p.stat().st_size
        except FileNotFoundError:  # acked and deleted meanwhile
            continue
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    raise AssertionError("no VmRSS line")


def assert_delivered_once(intake: FakeIntake, expected: list[str], d: Daemon,
                          timeout: float = 60.0) -> None:
    assert intake.wait_for(len(expected), timeout), (
        f"only {len(intake.events)} of {len(expected)} events arrived"
    )
    wait_at_rest(d.status_port, detail=d.stderr_text)  # nothing left to send: no duplicate to come
    got = collections.Counter(intake.event_texts())
    want = collections.Counter(expected)
    missing, extra = want - got, got - want
    assert not missing and not extra, (
        f"{sum(missing.values())} missing (e.g. {list(missing)[:2]}), "
        f"{sum(extra.values())} extra (e.g. {list(extra)[:2]})"
    )


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(d.config_path), "spool", *args)


def spool_stats(d: Daemon) -> dict[str, Any]:
    r = cli(d, "stats")
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = orjson.loads(r.stdout)
    return out


# -- 1. intake down for a while under steady load -----------------------------------------------

RATE = 1000  # per connection; three connections
BATCH_MAX_EVENTS = 10_000  # batch.max_events' default: the most one uncertain request can repeat


@pytest.mark.parametrize(
    ("concurrency", "outage"), [(1, 20.0), (4, 3.0)], ids=["ordered-20s", "concurrent-3s"]
)
def test_outage_under_load_every_event_once(
    intake: FakeIntake, daemon: MakeDaemon, concurrency: int, outage: float
) -> None:
    d = daemon(intake, intake={"concurrency": concurrency, "retry_max": 1.0})
    segs = d.tmp / "spool"
    stop = threading.Event()
    senders = [PacedSender(d.tcp_port, c, RATE, stop, limit=outage + 40) for c in range(3)]
    try:
        for s in senders:
            s.start()
        # A second of the three connections' load delivered: the flow is steady.
        assert intake.wait_for(3 * RATE, 15), "the load does not flow before the outage"
        intake.set_down(True)
        down_at = time.monotonic()
        # The failing batch is written to disk at its first failure: before any retry of it
        # (its second attempt comes at least 0.5 s later, the backoff's floor).
        wait_until(lambda: any(seg_sizes(segs).values()), 5,
                   "a batch in spool/segments once the intake fails", step=0.01)
        attempts = [r["attempt"] for r in d.events("intake_retry")]
        assert max(attempts, default=1) == 1, f"on disk only after attempts {attempts}"
        # The outage itself, its length the scenario's (not a wait for anything).
        time.sleep(max(0.0, down_at + outage - time.monotonic()))
        during = [r for r in d.events("stats") if r["intake_failing"]]
        assert during and max(r["spool_batches"] for r in during) > 0, "stats show no spooling"
        assert max(r["spool_events"] for r in during) > RATE, "the spool did not absorb the load"
        intake.set_down(False)
        # The load goes on while the spool drains.
        wait_until(lambda: samples(d.status_port)["spool_events"] == 0, 60,
                   "the spool drained under the continuing load", step=0.1)
    finally:
        stop.set()
        for s in senders:
            s.join(30)
    assert [s.error for s in senders] == [None] * 3
    sent = {s.conn: s.sent for s in senders}
    expected = [tagged(c, i)[1] for c, n in sent.items() for i in range(n)]
    assert len(expected) > 3 * RATE * outage  # several thousand a second, all along
    assert intake.wait_for(len(expected), 60), (
        f"only {len(intake.events)} of {len(expected)} events arrived"
    )
    assert d.stop() == 0
    stopped = d.events("stopped")[-1]
    # Taking the intake down drops its connections: one whose request it had already taken
    # when the connection went is a request whose answer the daemon never read, retried and
    # counted (uncertain_deliveries). Its batch may arrive twice; nothing else may.
    uncertain = stopped["uncertain_deliveries"]
    got = collections.Counter(intake.event_texts())
    want = collections.Counter(expected)
    missing, extra = want - got, got - want
    assert not missing, f"{sum(missing.values())} missing (e.g. {list(missing)[:2]})"
    assert sum(extra.values()) <= uncertain * BATCH_MAX_EVENTS, (
        f"{sum(extra.values())} extra with {uncertain} uncertain deliveries"
    )

    # First arrivals only: a retried uncertain batch comes again later.
    seen: set[str] = set()
    events = []
    for e in intake.events:
        if e.event not in seen:
            seen.add(e.event)
            events.append(e)
    # Each event keeps its own timestamp, whatever batches it travelled in.
    for e in events:
        c, i = origin(e.event)
        assert e.timestamp == tagged(c, i)[2], f"{e.event[:20]} arrived with {e.timestamp}"
    if concurrency == 1:
        # One request at a time: arrival order is per-connection send order, outage or not.
        per_conn: dict[int, list[int]] = collections.defaultdict(list)
        for e in events:
            c, i = origin(e.event)
            per_conn[c].append(i)
        for c, seqs in per_conn.items():
            assert seqs == list(range(sent[c])), f"connection {c} out of order"
    assert stopped["dropped_events"] == 0 and stopped["spool_events"] == 0
    # The daemon counts each event delivered once (a retried uncertain batch is delivered
    # once as far as it knows: the first answer never came).
    assert stopped["delivered_events"] == len(expected)


# -- 2. SIGKILL with everything on disk -----------------------------------------------------------


def test_sigkill_with_intake_down_then_restart_delivers_all_without_duplicates(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    intake.set_down(True)
    d = daemon(intake, intake={"retry_max": 1.0})
    payload, expected = stream(0, 50_000)
    send_tcp(d.tcp_port, payload)
    # Everything read, every batch closed and written: only then is nothing left in memory.
    wait_until(lambda: last_stats(d).get("spool_events") == 50_000
               and last_stats(d).get("in_memory_batches") == 0, 20,
               "all 50000 events on disk, none in memory", detail=lambda: last_stats(d))
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert sum(seg_sizes(d.tmp / "spool").values()) > 0
    assert intake.requests == []  # nothing reached the intake: no delivery was in doubt

    intake.set_down(False)
    d2 = daemon(intake, intake={"retry_max": 1.0})
    opened = d2.wait_log("spool_opened")
    assert opened["events"] == 50_000 and opened["truncated"] == []
    # The intake never saw a byte while down, so a duplicate would be a bug: exactly once.
    assert_delivered_once(intake, expected, d2)
    assert d2.stop() == 0
    assert d2.events("stopped")[-1]["uncertain_deliveries"] == 0


# -- 3. corrupted spool on disk ----------------------------------------------------------------


def named_batch(tag: str, n: int = 5) -> Batch:
    return Batch.from_events([f"{tag}-{i} {haproxy_line(i)}" for i in range(n)],
                             [f"2026-11-26T21:58:5{i % 10}.000Z" for i in range(n)])


def build_segment(spool_dir: Path, tags: list[str]) -> tuple[Path, list[int]]:
    """A new segment holding one record per tag (the Spool API itself); its record offsets."""
    before = set(seg_sizes(spool_dir))
    sp = Spool(spool_dir)
    sp.open()
    for tag in tags:
        sp.append(named_batch(tag))
    sp.close()
    (name,) = set(seg_sizes(spool_dir)) - before
    path = spool_dir / "segments" / name
    data = path.read_bytes()
    offsets, pos = [], 0
    while pos < len(data):
        offsets.append(pos)
        (plen,) = struct.unpack_from("<I", data, pos + 4)
        pos += HEADER_SIZE + plen
    assert pos == len(data) and len(offsets) == len(tags)
    return path, offsets


def events_of(*tags: str) -> list[str]:
    return [e for t in tags for e in named_batch(t).events()]


def test_corrupted_spool_good_records_delivered_bad_file_quarantined(
    intake: FakeIntake, daemon: MakeDaemon, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    # Phase 1: only a torn tail (a write that never completed).
    torn, offs = build_segment(spool_dir, ["t0", "t1", "t2"])
    size = torn.stat().st_size
    os.truncate(torn, size - 7)
    d = daemon(intake)
    rec = d.wait_log("spool_recovered_torn_tail")
    assert rec["truncated"] == [{"segment": torn.name, "offset": offs[2],
                                 "bytes": size - 7 - offs[2]}]
    assert rec["quarantined"] == [] and rec["events"] == 10
    assert_delivered_once(intake, events_of("t0", "t1"), d)
    assert d.stop() == 0
    intake.reset()

    # Phase 2: a flipped byte in the middle record of one segment, a torn tail in the newest
    # (the only one an append can have been cut short in: elsewhere a bad tail is corruption).
    # (Both built before either is damaged: opening a Spool repairs what it finds.)
    bad, boffs = build_segment(spool_dir, ["b0", "b1", "b2"])
    torn, offs = build_segment(spool_dir, ["a0", "a1", "a2"])
    os.truncate(torn, torn.stat().st_size - 3)
    raw = bytearray(bad.read_bytes())
    raw[boffs[1] + HEADER_SIZE + 40] ^= 0x20
    bad.write_bytes(bytes(raw))
    d = daemon(intake)
    rec = d.wait_log("spool_recovered_with_corruption")
    assert [t["segment"] for t in rec["truncated"]] == [torn.name]
    (q,) = rec["quarantined"]
    assert q["segment"] == bad.name and q["bad_offset"] == boffs[1] and q["good_records"] == 1
    assert rec["quarantine"] == str(spool_dir / "quarantine")
    kept = spool_dir / "quarantine" / bad.name
    assert q["moved_to"] == str(kept)
    assert kept.read_bytes() == bytes(raw)  # the whole original file, for manual recovery
    # Every intact record is replayed: those before the corruption and, after resynchronising
    # on the next valid record, those after it (b2); only the flipped record b1 is lost.
    assert (rec["corrupt_records"], rec["corrupt_events"]) == (1, 5)  # b1 (the torn a2: not)
    assert_delivered_once(intake, events_of("b0", "b2", "a0", "a1"), d)
    assert b"b2-0 " in kept.read_bytes()
    stats = spool_stats(d)
    assert stats["quarantined_files"] == [str(kept)] and stats["spool_events"] == 0
    assert d.stop() == 0

    # Phase 3: the spool is clean now, and stays quarantined once.
    d = daemon(intake)
    rec = d.wait_log("spool_opened")
    assert rec["truncated"] == [] and rec["quarantined"] == [] and rec["events"] == 0
    assert d.stop() == 0
    assert sorted(p.name for p in (spool_dir / "quarantine").iterdir()) == [bad.name]


# -- 4. full spool: the real ENOSPC, SpoolFull (block), drop_oldest -------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/spool as a 512 KiB tmpfs (needs root); request it before `daemon`, so the
    daemon is stopped before the unmount."""
    mnt = tmp_path / "spool"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 512 KiB tmpfs: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def push_until_held_back(d: Daemon, payload: bytes) -> Pusher:
    pusher = Pusher(d.tcp_port, payload)
    pusher.start()
    wait_until(lambda: pusher.offset > 0 and pusher.idle_for() > 2.0, 60,
               "the sender held back (no progress for 2 s)",
               detail=lambda: f"{pusher.offset} of {len(payload)} bytes sent")
    assert pusher.offset < len(payload) and pusher.timeouts > 0
    return pusher


def test_disk_really_full_holds_input_back_without_spinning_then_delivers(
    tiny_fs: Path, intake: FakeIntake, daemon: MakeDaemon
) -> None:
    intake.set_down(True)
    d = daemon(intake, intake={"retry_max": 1.0}, batch={"max_events": 500},
               spool={"max_size": 16 * MIB, "when_full": "block"})
    assert d.proc is not None
    payload, expected = stream(0, 18_000, pad=300)  # ~10 MB: more than disk, memory, sockets
    pusher = push_until_held_back(d, payload)
    failed = d.wait_log("spool_write_failed")
    assert "No space left" in failed["error"]
    assert d.wait_log("backpressure_on")
    held_at = pusher.offset
    cpu0, t0 = cpu_seconds(d.proc.pid), time.monotonic()
    # The window the daemon must stay idle through while blocked: the property is a duration.
    time.sleep(3.0)
    cpu = cpu_seconds(d.proc.pid) - cpu0
    elapsed = time.monotonic() - t0
    rss = rss_bytes(d.proc.pid)
    assert d.proc.poll() is None, "the daemon died on a full disk"
    assert cpu < 0.25 * elapsed, f"{cpu:.2f}s of CPU in {elapsed:.1f}s while blocked: spinning"
    assert rss < 100 * MIB, f"VmRSS {rss / MIB:.0f} MiB while blocked"
    assert pusher.offset == held_at, "input was not held back"
    st = last_stats(d)
    assert st["paused"] and st["spool_write_errors"] > 0 and st["dropped_events"] == 0

    intake.set_down(False)
    pusher.join(120)
    assert pusher.error is None and pusher.done
    assert_delivered_once(intake, expected, d, timeout=90)
    assert d.stop() == 0
    assert d.events("stopped")[-1]["dropped_events"] == 0


def healthz(d: Daemon) -> tuple[int, dict[str, Any]]:
    with socket.create_connection(("127.0.0.1", d.status_port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body)


def test_disk_really_full_space_comes_back_once_drained(
    tiny_fs: Path, intake: FakeIntake, daemon: MakeDaemon
) -> None:
    intake.set_down(True)
    d = daemon(intake, intake={"retry_max": 1.0}, batch={"max_events": 500},
               spool={"max_size": 16 * MIB, "when_full": "block"}, shutdown_timeout=1.0)
    payload, expected = stream(0, 6_000, pad=300)  # ~3 MB, the disk holds 512 KiB
    pusher = Pusher(d.tcp_port, payload)
    pusher.start()
    d.wait_log("spool_write_failed", timeout=20)
    wait_until(lambda: healthz(d)[0] == 503, 5, "/healthz 503 while the spool refuses writes")
    assert any("spool refuses writes" in r for r in healthz(d)[1]["reasons"])
    intake.set_down(False)
    pusher.join(60)
    assert_delivered_once(intake, expected, d)
    wait_until(lambda: last_stats(d).get("spool_events") == 0
               and last_stats(d).get("in_memory_batches") == 0, 5,
               "a stats line with nothing on the spool or in memory")
    # Nothing is held back any more: health says so (issue 11: it stayed 503 for good).
    wait_until(lambda: healthz(d)[0] == 200, 5, "/healthz 200 once drained",
               detail=lambda: healthz(d))
    # Everything is delivered and acked. A second outage must be able to use the disk again.
    intake.set_down(True)
    payload, again = stream(1, 100)
    send_tcp(d.tcp_port, payload)
    wait_until(lambda: last_stats(d).get("spool_events") == 100, 5,
               "the second outage's 100 events on the spool",
               detail=lambda: f"{last_stats(d)}; on disk {seg_sizes(tiny_fs)}")
    intake.set_down(False)
    assert_delivered_once(intake, expected + again, d)
    assert d.stop() == 0


def test_spool_max_size_block_holds_input_then_delivers_exactly(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    intake.set_down(True)
    d = daemon(intake, intake={"retry_max": 1.0}, batch={"max_events": 500},
               spool={"max_size": 256 * KIB, "when_full": "block"})
    payload, expected = stream(0, 18_000, pad=300)  # ~10 MB, the spool holds 256 KiB
    pusher = push_until_held_back(d, payload)
    full = d.wait_log("spool_full")
    assert full["spool_bytes"] <= 256 * KIB
    assert sum(seg_sizes(d.tmp / "spool").values()) <= 256 * KIB
    intake.set_down(False)
    pusher.join(120)
    assert pusher.error is None and pusher.done
    assert_delivered_once(intake, expected, d, timeout=90)
    assert d.stop() == 0
    stopped = d.events("stopped")[-1]
    assert stopped["spool_dropped_events"] == 0 and stopped["dropped_events"] == 0
    assert stopped["delivered_events"] == len(expected)


def test_spool_max_size_drop_oldest_counts_exactly(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    intake.set_down(True)
    d = daemon(intake, intake={"retry_max": 1.0, "concurrency": 1}, batch={"max_events": 100},
               spool={"max_size": 256 * KIB, "when_full": "drop_oldest"})
    n = 12_000
    payload, expected = stream(0, n, pad=300)
    send_tcp(d.tcp_port, payload)  # never held back for long: room is made by dropping
    wait_until(lambda: last_stats(d).get("accepted_events") == n
               and last_stats(d).get("in_memory_batches") == 0, 20,
               f"all {n} events accepted, none in memory", detail=lambda: last_stats(d))
    drops = d.events("spool_full_dropped_oldest")
    assert drops, "nothing was dropped: the test did not fill the spool"
    intake.set_down(False)
    wait_until(lambda: last_stats(d).get("spool_events") == 0
               and not last_stats(d).get("intake_failing"), 30, "the spool drained")
    wait_at_rest(d.status_port, detail=d.stderr_text)  # a duplicate would be at the intake now
    assert d.stop() == 0
    stopped = d.events("stopped")[-1]
    dropped = stopped["spool_dropped_events"]
    assert dropped == sum(r["events"] for r in d.events("spool_full_dropped_oldest"))
    got = collections.Counter(intake.event_texts())
    assert max(got.values()) == 1, "duplicates"
    assert set(got) <= set(expected)
    # Exact accounting: every event sent was either delivered or counted as dropped, once.
    assert len(got) + dropped == n, (
        f"delivered {len(got)} + dropped {dropped} != sent {n}"
    )
    assert stopped["delivered_events"] + dropped == n


# -- 5. SIGTERM while the intake answers slowly ------------------------------------------------

SLOW_BATCH = 1000


@pytest.fixture(scope="module")
def slow_sigterm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One run of the scenario, shared by the tests below: 10 batches, 4 of them on the wire
    to an intake answering in 5 s, SIGTERM with shutdown_timeout=2, then a second run with a
    fast intake. The slow intake still takes the first run's requests, late."""
    tmp = tmp_path_factory.mktemp("slow-sigterm")
    out: dict[str, Any] = {}
    with FakeIntake() as fi:
        fi.set_delay(5.0)
        # 4 requests on the wire at once: the scenario is about several in doubt at SIGTERM.
        cfg = base_config(tmp, shutdown_timeout=2.0,
                          intake={**intake_section(fi), "concurrency": 4},
                          batch={"max_events": SLOW_BATCH, "max_in_flight": 16})
        d = Daemon(tmp, cfg).start()
        d2: Daemon | None = None
        try:
            payload, out["expected"] = stream(0, 10 * SLOW_BATCH)
            send_tcp(d.tcp_port, payload)
            # Every event read and batched, four requests on the wire, unanswered.
            wait_until(lambda: sum(r["status"] is None for r in fi.requests) >= 4
                       and samples(d.status_port)["accepted_events_total"] == 10 * SLOW_BATCH,
                       10, "all events batched and 4 requests on the wire", detail=d.stderr_text)
            out["in_flight"] = {i for i, r in enumerate(fi.requests) if r["status"] is None}
            # Exits well before the 5 s answers (a hang is killed: rc != 0).
            out["rc"] = d.stop(signal.SIGTERM, timeout=10.0)
            out["stopped"] = d.events("stopped")[-1]
            out["shutdown_dropped"] = d.events("shutdown_dropped")
            fi.set_delay(0)
            d2 = Daemon(tmp, cfg).start()
            out["complete"] = fi.wait_for(len(out["expected"]), 30)
            # The first run's requests in doubt are answered (late): wait for them too.
            wait_until(lambda: all(r["status"] is not None for r in fi.requests), 15,
                       "every request answered, the first run's late ones too")
            wait_at_rest(d2.status_port, detail=d2.stderr_text)  # nothing more to come
            out["events"] = fi.events
            out["requests"] = fi.requests
            out["rc2"] = d2.stop()
        finally:
            for x in (d, d2):
                if x is not None and x.proc is not None and x.proc.poll() is None:
                    x.stop(signal.SIGKILL)
    yield out


def test_sigterm_during_slow_answers_exits_in_time_next_run_delivers(
    slow_sigterm: dict[str, Any],
) -> None:
    run = slow_sigterm
    assert run["in_flight"], "no request was on the wire at SIGTERM"
    assert run["rc"] == 0
    stopped = run["stopped"]
    assert stopped["dropped_events"] == 0 and run["shutdown_dropped"] == []
    # Nothing was answered before SIGTERM: every batch, the in-doubt ones too, is on disk.
    assert stopped["delivered_events"] == 0
    assert stopped["spool_events"] == len(run["expected"])
    assert run["complete"] and run["rc2"] == 0
    got = collections.Counter(e.event for e in run["events"])
    assert set(got) == set(run["expected"]), "lost or unexpected events"
    # Duplicates come only from the requests that were on the wire at SIGTERM.
    duplicates = sum(got.values()) - len(got)
    from_first_run = [e for e in run["events"] if e.request_no in run["in_flight"]]
    assert duplicates == len(from_first_run)
    assert duplicates <= len(run["in_flight"]) * SLOW_BATCH


def test_sigterm_requests_in_doubt_are_counted(slow_sigterm: dict[str, Any]) -> None:
    run = slow_sigterm
    got = collections.Counter(e.event for e in run["events"])
    duplicates = sum(got.values()) - len(got)
    uncertain = run["stopped"]["uncertain_deliveries"]
    assert uncertain == len(run["in_flight"])
    assert duplicates <= uncertain * SLOW_BATCH


# -- 6. write-ahead mode --------------------------------------------------------------------------


def test_mode_always_batch_on_disk_before_sent_survives_sigkill(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    intake.set_delay(3.0)
    d = daemon(intake, spool={"mode": "always"})
    payload, expected = stream(0, 100)
    send_tcp(d.tcp_port, payload)
    wait_until(lambda: any(r["status"] is None for r in intake.requests), 5,
               "a request on the wire, unanswered")
    # The request is on the wire, unanswered: the batch is already durable.
    assert any(seg_sizes(d.tmp / "spool").values()), "nothing on disk while the batch is sent"
    assert spool_stats(d)["spool_events"] == 100
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    # Take the intake down before the delayed answer: that request is then never ingested,
    # so the replay below must deliver every event, once.
    intake.set_down(True)
    intake.set_delay(0)
    intake.set_down(False)
    assert intake.events == []
    d2 = daemon(intake, spool={"mode": "always"})
    assert d2.wait_log("spool_opened")["events"] == 100
    assert_delivered_once(intake, expected, d2)
    assert d2.stop() == 0
    assert seg_sizes(d2.tmp / "spool") == {}


# -- 7. dead letters ------------------------------------------------------------------------------


def test_dead_letters_kept_shown_replayed_and_bounded(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    answer = b'{"message": "event rejected: unparsable"}'
    intake.inject(400, body=answer)
    d = daemon(intake, batch={"max_delay": 1.0})
    payload, expected = stream(0, 50)
    send_tcp(d.tcp_port, payload)
    rec = d.wait_log("dead_lettered")
    assert rec["status"] == 400 and rec["events"] == 50
    files = sorted((d.tmp / "spool" / "dead-letter").glob("*.jsonl"))
    assert len(files) == 1 and str(files[0]) == rec["file"]
    lines = [orjson.loads(x) for x in files[0].read_bytes().splitlines()]
    assert [x["event"] for x in lines] == expected
    assert [x["timestamp"] for x in lines] == [tagged(0, i)[2] for i in range(50)]
    assert {x["reason"] for x in lines} == {"intake answered 400"}
    assert {x["status"] for x in lines} == {400}
    assert {x["response"] for x in lines} == {answer.decode()}
    assert intake.events == []

    shown = spool_stats(d)["dead_letter"]
    assert shown["events"] == 50 and shown["files"] == [str(files[0])]

    r = cli(d, "replay-dead-letter")
    assert r.returncode == 0, r.stderr
    assert "re-queued 50 events" in r.stdout
    assert d.wait_log("dead_letters_requeued", timeout=10)["events"] == 50
    assert_delivered_once(intake, expected, d)
    assert list((d.tmp / "spool" / "dead-letter").glob("*.jsonl")) == []
    assert list((d.tmp / "spool" / "requeue").glob("*.jsonl")) == []
    assert spool_stats(d)["dead_letter"]["events"] == 0
    assert d.stop() == 0
    assert d.events("stopped")[-1]["requeued_events"] == 50

    # Bounded: past dead_letter_max_size, events are dropped, logged and counted.
    intake.reset()
    intake.inject(400, body=answer)
    d = daemon(intake, batch={"max_delay": 1.0}, spool={"dead_letter_max_size": 64 * KIB})
    payload, _ = stream(1, 500, pad=200)  # ~200 KB of dead-letter lines > 64 KiB
    send_tcp(d.tcp_port, payload)
    full = d.wait_log("dead_letter_full")
    assert full["events"] == 500 and full["max_size"] == 64 * KIB
    assert d.events("dead_lettered") == []
    assert d.stop() == 0
    stopped = d.events("stopped")[-1]
    assert stopped["dropped_events"] == 500 and stopped["dead_lettered_events"] == 0
    assert list((d.tmp / "spool" / "dead-letter").glob("*.jsonl")) == []
    assert intake.events == []


# -- 8. purge -------------------------------------------------------------------------------------


def test_spool_purge_needs_yes_and_a_stopped_daemon(
    intake: FakeIntake, daemon: MakeDaemon
) -> None:
    intake.set_down(True)
    d = daemon(intake, shutdown_timeout=1.0)
    payload, expected = stream(0, 2_000)
    send_tcp(d.tcp_port, payload)
    wait_until(lambda: last_stats(d).get("spool_events") == len(expected), 10,
               "every event on the spool", detail=lambda: last_stats(d))
    spool_dir = d.tmp / "spool"

    r = cli(d, "purge", "--yes")
    assert r.returncode == 1
    assert "in use" in r.stderr
    assert spool_stats(d)["spool_events"] == len(expected)

    assert d.stop() == 0
    before = seg_sizes(spool_dir)
    assert before
    r = cli(d, "purge")
    assert r.returncode == 1
    assert f"({len(expected)} events)" in r.stdout
    assert "--yes" in r.stdout
    assert seg_sizes(spool_dir) == before
    assert spool_stats(d)["spool_events"] == len(expected)

    r = cli(d, "purge", "--yes")
    assert r.returncode == 0, r.stderr
    assert f"({len(expected)} events)" in r.stdout
    assert seg_sizes(spool_dir) == {}
    assert spool_stats(d)["spool_events"] == 0

    intake.set_down(False)
    d2 = daemon(intake)
    assert d2.wait_log("spool_opened")["events"] == 0
    wait_at_rest(d2.status_port, detail=d2.stderr_text)  # nothing held: nothing to send
    assert intake.events == []
    assert d2.stop() == 0


# -- 7. a planted symbolic link in the spool (issue 11) -----------------------------------------


def test_symlinked_segment_daemon_refuses_to_start_target_untouched(
    tmp_path: Path, intake: FakeIntake
) -> None:
    spool_dir = tmp_path / "spool"
    seg, _ = build_segment(spool_dir, ["a"])
    target = tmp_path / "victim"
    content = b"not a segment: a file the daemon's user may write\n" * 100
    target.write_bytes(content)
    seg.unlink()
    seg.symlink_to(target)
    d = Daemon(tmp_path, base_config(tmp_path, intake=intake_section(intake)))
    with pytest.raises(RuntimeError, match="daemon exited"):
        d.start()
    assert d.proc is not None and d.proc.wait(10) == 1
    d.close_files()
    errors = [r for r in d.logs() if r.get("level") == "error"]
    assert len(errors) == 1, d.stderr_text()
    assert errors[0]["event"] == "startup_failed"
    assert errors[0]["error"] == f"refusing spool file {seg}: it is a symbolic link"
    assert "Traceback" not in d.stderr_text()
    assert target.read_bytes() == content and seg.is_symlink()
    assert not intake.events
