"""Re-queued dead letters (delivery/requeue.py): chunk by chunk into the spool, resumable.

Issue 17: a refusal part-way (spool full) restarted the file from its first line, appending the
batches already in again and dead-lettering its oversized events again; workers were woken only
once the whole file was in, so a file larger than the spool never went anywhere. Here: a real
Spool and Delivery with a scripted sink, or a scripted host, and crashes injected at every
filesystem call of the requeuer through the spool's Filesystem seam.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import orjson
import pytest

from devtools.probe import until
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.delivery import Delivery
from haproxy_forwarder.delivery.requeue import (
    TOO_LARGE_FOR_SPOOL,
    Requeuer,
    progress_path,
)
from haproxy_forwarder.observability.counters import Counters
from haproxy_forwarder.sinks.deadletter import DeadLetters, dead_letter_lines, read_dead_letters
from haproxy_forwarder.spool import Spool, SpoolFull
from haproxy_forwarder.spool.segments import Filesystem
from tests import vclock
from tests.test_delivery import FakeSink, Log, NoWait

KIB = 1024
TS = "2026-01-01T00:00:00.000Z"
BIG = 251 * KIB  # over the intake's 250 KiB: dead-lettered again, never spooled


def texts(n: int, pad: int = 150, tag: str = "dl") -> list[str]:
    return [f"{tag} {i} " + "p" * pad for i in range(n)]


def write_file(folder: Path, events: list[str], name: str = "dead-letter-20260101-1") -> Path:
    """A dead-letter file as `spool replay-dead-letter` leaves it in requeue/."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    lines = dead_letter_lines(Batch.from_events(events, [TS] * len(events)),
                              "intake answered 400", 400, "no", time.gmtime(0))
    path.write_bytes(lines)
    return path


def run(coro: Coroutine[Any, Any, None]) -> None:
    """On a virtual clock (tests/vclock.py): the requeuer's passes and pauses take no real
    time, its files and the spool are read and written in real threads."""
    vclock.run(coro, limit=60)


class Rig:
    """Requeuer -> Delivery -> real Spool (block, small) -> one worker -> scripted sink; made
    in the loop, whose (virtual) clock both use."""

    def __init__(self, tmp_path: Path, sink: FakeSink, *, spool_max: int = 64 * KIB,
                 max_events: int = 100, stall_after: float = 30.0,
                 dead: type[DeadLetters] = DeadLetters) -> None:
        self.counters = Counters()
        self.log = Log()
        self.spool_dir = tmp_path / "spool"
        self.folder = self.spool_dir / "requeue"
        self.spool = Spool(self.spool_dir, max_size=spool_max, segment_size=16 * KIB,
                           counters=self.counters.spool)
        self.spool.open()
        self.dead = dead(self.spool_dir, 4 << 20)
        self.delivery = Delivery(sink, self.spool, self.dead, self.counters, self.log,
                                 workers=1, backoff=NoWait(), max_in_flight=100,
                                 write_ahead=False, on_pressure=lambda on: None,
                                 clock=asyncio.get_running_loop().time)
        self.max_events = max_events
        self.stall_after = stall_after
        self.max_bytes = spool_max // 8
        self.delivery.start()

    def requeuer(self) -> Requeuer:
        return Requeuer(self.folder, self.delivery, self.spool, self.dead, self.counters,
                        self.log, max_events=self.max_events, max_bytes=self.max_bytes,
                        stall_after=self.stall_after, interval=0.05, retry=0.02,
                        clock=asyncio.get_running_loop().time)

    def waiting(self) -> bool:
        """The requeuer started by delivery waits for room in the spool."""
        r = self.delivery.requeuer
        return r is not None and bool(r.waiting_for)

    def dead_letters(self) -> list[str]:
        return [e for p in self.dead.files() for e, _ in read_dead_letters(p)]

    async def stop(self) -> None:
        await self.delivery.stop()
        self.spool.close()


def test_a_file_larger_than_the_spool_goes_out_whole_and_once(tmp_path: Path) -> None:
    """~230 KB of dead letters into a 64 KiB spool, nothing else coming in: every event
    delivered once, in order; the file and its progress gone; each counted once."""
    sink = FakeSink()
    events = texts(1000)

    async def main() -> None:
        rig = Rig(tmp_path, sink)
        path = write_file(rig.folder, events)
        assert path.stat().st_size > 3 * 64 * KIB
        task = asyncio.create_task(rig.requeuer().run())
        await until(lambda: rig.log.named("dead_letters_requeued") != [])
        await until(lambda: len(sink.accepted) == len(events))
        assert sink.accepted == events
        assert rig.log.named("dead_letters_requeued") == [
            {"file": path.name, "events": 1000, "dead_lettered_again": 0}]
        assert not path.exists() and not progress_path(path).exists()
        assert rig.counters.requeued_events == 1000
        await until(lambda: rig.spool.pending_batches == 0)
        assert rig.counters.delivered_events == 1000
        task.cancel()
        await rig.stop()

    run(main())


def test_intake_holding_the_spool_full_waits_then_resumes_without_duplicates(
    tmp_path: Path,
) -> None:
    """The intake takes nothing for a while: the requeuer fills its share of the spool, waits
    (a stall warning, a health reason), and carries on where it stopped once the intake
    answers. The oversized event in the middle is dead-lettered once, not at every retry."""
    sink = FakeSink()
    sink.gate = asyncio.Event()
    events = texts(600)
    big = "big " + "b" * BIG
    content = [*events[:300], big, *events[300:]]

    async def main() -> None:
        rig = Rig(tmp_path, sink, stall_after=0.3)
        requeuer = rig.requeuer()
        path = write_file(rig.folder, content)
        task = asyncio.create_task(requeuer.run())
        await until(lambda: rig.log.named("requeue_stalled") != [])
        reason = requeuer.stall_reason()
        assert reason is not None and path.name in reason and "spool" in reason
        assert rig.delivery.requeue_stall_reason() is None  # not started through delivery
        stalled = rig.log.named("requeue_stalled")[0]
        assert stalled["file"] == path.name and stalled["waiting_for"]
        assert requeuer.idle_seconds() > 0.3 and requeuer.waiting_files == 1
        # Part of the file is in; what is in is counted, the rest is not.
        appended = rig.counters.spool.appended_events
        assert 0 < appended < len(events)
        assert rig.counters.requeued_events == appended
        await asyncio.sleep(0.3)  # many retry rounds (every 0.02 s) meanwhile
        assert rig.counters.spool.appended_events == appended
        sink.gate.set()
        await until(lambda: rig.log.named("dead_letters_requeued") != [])
        await until(lambda: len(sink.accepted) >= len(events) and not rig.spool.pending_batches)
        assert collections.Counter(sink.accepted) == collections.Counter(events)
        assert sink.accepted == events  # one worker: in order, the big one aside
        assert rig.dead_letters() == [big]
        assert rig.counters.dead_letter_reasons["oversized"] == 1
        assert rig.counters.requeued_events == len(content)
        assert rig.log.named("dead_letters_requeued")[0]["dead_lettered_again"] == 1
        assert rig.log.named("requeue_moving_again") != []
        assert requeuer.stall_reason() is None and requeuer.idle_seconds() == 0
        task.cancel()
        await rig.stop()

    run(main())


def test_an_event_larger_than_the_spool_is_dead_lettered_again(tmp_path: Path) -> None:
    sink = FakeSink()
    small = texts(5)
    large = "large " + "l" * (100 * KIB)  # under the intake's limit, over the 64 KiB spool

    async def main() -> None:
        rig = Rig(tmp_path, sink)
        write_file(rig.folder, [*small[:2], large, *small[2:]])
        task = asyncio.create_task(rig.requeuer().run())
        await until(lambda: rig.log.named("dead_letters_requeued") != [])
        await until(lambda: len(sink.accepted) == 5)
        assert sink.accepted == small
        lines = [orjson.loads(x) for p in rig.dead.files() for x in p.read_bytes().splitlines()]
        assert [(x["event"], x["reason"]) for x in lines] == [(large, TOO_LARGE_FOR_SPOOL)]
        assert rig.counters.requeued_events == 6
        task.cancel()
        await rig.stop()

    run(main())


def test_stopped_between_batches_a_new_process_resumes_without_duplicates(
    tmp_path: Path,
) -> None:
    """SIGTERM while a file is half in (the spool full, the intake holding): what is in the
    spool stays; the next process re-queues only the rest."""
    events = texts(800)

    async def first() -> None:
        sink = FakeSink()
        sink.gate = asyncio.Event()  # never answers
        rig = Rig(tmp_path, sink)
        write_file(rig.folder, events)
        rig.delivery.start_requeue(rig.folder, rig.max_events, rig.max_bytes, 30.0)
        await until(lambda: rig.delivery.requeue_files == 1 and rig.waiting(), timeout=20)
        await rig.stop()

    run(first())
    path = tmp_path / "spool" / "requeue" / "dead-letter-20260101-1.jsonl"
    assert path.exists() and progress_path(path).exists()

    async def second() -> None:
        sink = FakeSink()
        rig = Rig(tmp_path, sink)
        task = asyncio.create_task(rig.requeuer().run())
        await until(lambda: rig.log.named("dead_letters_requeued") != [])
        assert rig.log.named("requeue_resumed")[0]["offset"] > 0
        await until(lambda: len(sink.accepted) >= len(events) and not rig.spool.pending_batches)
        assert sink.accepted == events  # the first process's part (recovered) first, once
        task.cancel()
        await rig.stop()

    run(second())
    assert not path.exists() and not progress_path(path).exists()


class HeldDeadLetters(DeadLetters):
    """A dead-letter write that opens today's file, then waits for `gate` before writing
    through that descriptor: a write under way when `spool replay-dead-letter` renames it."""

    def __init__(self, spool_dir: Path, max_size: int) -> None:
        super().__init__(spool_dir, max_size)
        self.gate: threading.Event | None = None
        self.opened = threading.Event()

    def _append(self, lines: bytes, when: time.struct_time) -> Path:
        if self.gate is None:
            return super()._append(lines, when)
        path = self.dir / time.strftime("dead-letter-%Y%m%d.jsonl", when)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            self.opened.set()
            self.gate.wait(10)
            os.write(fd, lines)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path


def test_a_file_renamed_while_a_dead_letter_write_has_it_open_waits_for_that_write(
    tmp_path: Path,
) -> None:
    """The replay renamed today's dead-letter file while a write had it open: that write lands
    in the renamed file. The requeuer reads it only once the write is done, so its events are
    re-queued too, not deleted with the file unread."""
    sink = FakeSink()
    first, second = texts(5, tag="first"), texts(5, tag="second")

    async def main() -> None:
        rig = Rig(tmp_path, sink, dead=HeldDeadLetters)
        dead = rig.dead
        assert isinstance(dead, HeldDeadLetters)
        reason = "intake answered 400"
        assert dead.write(Batch.from_events(first, [TS] * 5), reason, 400) is not None
        dead.gate = threading.Event()
        writing = asyncio.get_running_loop().run_in_executor(
            None, dead.write, Batch.from_events(second, [TS] * 5), reason, 400)
        await asyncio.to_thread(dead.opened.wait, 10)
        rig.folder.mkdir()
        (path,) = dead.files()
        moved = path.rename(rig.folder / f"{path.stem}-1.jsonl")  # the replay
        task = asyncio.create_task(rig.requeuer().run())
        # Given time to read the file (it would have, in a few ms), it must not have.
        with contextlib.suppress(AssertionError):
            await until(lambda: rig.log.named("dead_letters_requeued") != [], timeout=0.5)
        assert rig.log.named("dead_letters_requeued") == [] and moved.exists()
        dead.gate.set()
        assert await writing is not None
        await until(lambda: len(sink.accepted) == 10)
        assert sink.accepted == first + second
        await until(lambda: rig.log.named("dead_letters_requeued") != [])
        assert not moved.exists()
        task.cancel()
        await rig.stop()

    run(main())


# -- a scripted host: refusals and crashes ------------------------------------------------------


class Crash(BaseException):
    """The process dies here: nothing after this point runs."""


class Host:
    """The spool as a list of appended batches (what survives a crash), refusals on demand."""

    def __init__(self) -> None:
        self.appended: list[list[str]] = []
        self.dead: list[str] = []
        # append number (1-based) -> how many times it is refused as "spool full" first
        self.refusals: dict[int, int] = {}
        self.refused = 0
        self.crash_at: int | None = None  # the append (1-based) the process dies in

    async def spool_append(self, batch: Batch) -> int:
        if self.crash_at is not None and len(self.appended) + 1 == self.crash_at:
            raise Crash
        n = len(self.appended) + 1
        if self.refusals.get(n):
            self.refusals[n] -= 1
            self.refused += 1
            raise SpoolFull("spool full")
        self.appended.append(batch.events())
        return len(self.appended)

    def dead_letter(self, batch: Batch, reason: str, status: int | None = None,
                    response: str = "") -> asyncio.Future[bool]:
        self.dead += batch.events()
        f: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        f.set_result(True)
        return f

    def events(self) -> list[str]:
        return [e for b in self.appended for e in b]


class EmptySpool:
    def stats(self) -> dict[str, Any]:
        return {"batches": 0, "bytes": 0, "max_size": 1 << 30}


class Barrier:
    def barrier(self) -> None:
        pass


def requeuer(folder: Path, host: Host, log: Log | None = None, fs: Filesystem | None = None,
             counters: Counters | None = None, max_events: int = 50) -> Requeuer:
    return Requeuer(folder, host, EmptySpool(), Barrier(), counters or Counters(),
                    log or Log(), max_events=max_events, max_bytes=1 << 20, stall_after=30.0,
                    fs=fs, interval=0.01, retry=0.01)


async def until_done(r: Requeuer, folder: Path) -> None:
    task = asyncio.create_task(r.run())
    await until(lambda: not any(folder.iterdir()) or task.done())
    if task.done():
        task.result()  # a Crash surfaces here
    await r.stop(task, 5)


def test_refusals_part_way_resume_where_they_stopped(tmp_path: Path) -> None:
    events = texts(500)
    big = "big " + "b" * BIG
    content = [*events[:120], big, *events[120:]]
    host = Host()
    counters = Counters()

    async def main() -> None:
        folder = tmp_path / "requeue"
        write_file(folder, content)
        # Refused at five places in the file, the one after the big event among them.
        host.refusals = {1: 2, 3: 3, 4: 1, 7: 3, 10: 2}
        r = requeuer(folder, host, counters=counters)
        task = asyncio.create_task(r.run())
        await until(lambda: not any(folder.iterdir()))
        await r.stop(task, 5)

    run(main())
    assert host.refused == 11
    assert host.events() == events
    assert host.dead == [big]
    assert counters.requeued_events == 1  # the dead-lettered one; appends count in Delivery


def test_a_crash_between_appends_does_not_duplicate(tmp_path: Path) -> None:
    """The process dies in its 4th append (before anything of it reached the disk): the next
    process starts at the 4th batch, exactly."""
    events = texts(400)
    folder = tmp_path / "requeue"
    write_file(folder, events)
    host = Host()
    host.crash_at = 4
    with pytest.raises(Crash):
        run(until_done(requeuer(folder, host), folder))
    assert host.events() == events[:150]
    host.crash_at = None
    log = Log()
    run(until_done(requeuer(folder, host, log), folder))
    assert host.events() == events
    assert log.named("requeue_resumed")[0]["offset"] > 0


class CrashingFs(Filesystem):
    """Dies at its n-th call that changes something on disk."""

    def __init__(self, n: int) -> None:
        self.left = n

    def _step(self) -> None:
        self.left -= 1
        if self.left == 0:
            raise Crash

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        if flags & os.O_CREAT:
            self._step()
        return super().open(path, flags, mode)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        self._step()
        return super().pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        self._step()
        super().fsync(fd)

    def replace(self, src: Path, dst: Path) -> None:
        self._step()
        super().replace(src, dst)

    def unlink(self, path: Path, missing_ok: bool = False) -> None:
        self._step()
        super().unlink(path, missing_ok)


def test_a_crash_at_any_filesystem_call_repeats_at_most_the_batch_in_flight(
    tmp_path: Path,
) -> None:
    """A crash at each of the requeuer's filesystem calls in turn, then a new process: every
    event is in the spool, and at most one batch twice (the one appended but whose progress
    did not reach the disk); an oversized event dead-lettered at most twice likewise."""
    events = texts(230)
    big = "big " + "b" * BIG
    content = [*events[:100], big, *events[100:]]
    n = 0
    while True:
        n += 1
        folder = tmp_path / f"run{n}" / "requeue"
        write_file(folder, content)
        host = Host()
        try:
            run(until_done(requeuer(folder, host, fs=CrashingFs(n)), folder))
            crashed = False
        except Crash:
            crashed = True
            run(until_done(requeuer(folder, host), folder))
        assert not any(folder.iterdir()), f"crash at call {n}: files left"
        got = collections.Counter(host.events())
        assert set(got) == set(events), f"crash at call {n}: events missing"
        extra = [e for e in events if got[e] > 1]
        assert all(got[e] == 2 for e in extra)
        assert extra in ([], *host.appended), f"crash at call {n}: {len(extra)} repeated"
        assert 1 <= host.dead.count(big) <= 2 and (host.dead.count(big) == 1 or not extra)
        if not crashed:
            break
    assert n > 10  # the seam saw every step: progress writes, deletions


def test_lines_that_are_no_dead_letter_are_skipped_and_said(tmp_path: Path) -> None:
    events = texts(3)
    folder = tmp_path / "requeue"
    path = write_file(folder, events)
    good = path.read_bytes()
    torn = good.splitlines(keepends=True)[0][:40]  # a write cut short, no newline
    path.write_bytes(good + b"not json\n" + b'{"event": "no timestamp"}\n' + b"\n" + torn)
    host, log = Host(), Log()
    run(until_done(requeuer(folder, host, log), folder))
    assert host.events() == events
    assert log.named("requeue_skipped_lines") == [{
        "file": path.name, "lines": 4,
        "reason": "not a dead-letter record (JSON with event and timestamp)"}]


def test_an_unreadable_progress_file_stops_that_file_said_once(tmp_path: Path) -> None:
    folder = tmp_path / "requeue"
    stuck = write_file(folder, texts(10, tag="stuck"), name="dead-letter-20260101-1")
    other = write_file(folder, texts(10, tag="other"), name="dead-letter-20260101-2")
    progress_path(stuck).write_bytes(b"garbage")
    host, log = Host(), Log()

    async def main() -> None:
        r = requeuer(folder, host, log)
        task = asyncio.create_task(r.run())
        await until(lambda: not other.exists())
        await asyncio.sleep(0.1)  # several passes (every 0.01 s)
        assert stuck.exists() and r.waiting_files == 1
        failed = log.named("requeue_failed")
        assert len(failed) == 1 and failed[0]["file"] == stuck.name
        assert "delete it to start the file over" in failed[0]["error"]
        progress_path(stuck).unlink()
        await until(lambda: not stuck.exists())
        await r.stop(task, 5)

    run(main())
    assert host.events() == texts(10, tag="other") + texts(10, tag="stuck")


def test_a_progress_file_whose_file_is_gone_is_removed(tmp_path: Path) -> None:
    folder = tmp_path / "requeue"
    folder.mkdir()
    orphan = folder / "dead-letter-20260101-9.jsonl.progress"
    orphan.write_bytes(b'{"offset": 10}')
    (folder / "dead-letter-20260101-9.jsonl.progress.tmp").write_bytes(b"")
    keep = write_file(folder, texts(2))
    progress_path(keep).write_bytes(b'{"offset": 0}')
    run(until_done(requeuer(folder, Host()), folder))
    assert list(folder.iterdir()) == []


def test_a_read_error_is_said_once_and_retried(tmp_path: Path) -> None:
    class FailingReads(Filesystem):
        fail = True

        def pread(self, fd: int, length: int, offset: int) -> bytes:
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")
            return super().pread(fd, length, offset)

    folder = tmp_path / "requeue"
    write_file(folder, texts(20))
    fs, host, log = FailingReads(), Host(), Log()

    async def main() -> None:
        r = requeuer(folder, host, log, fs=fs)
        task = asyncio.create_task(r.run())
        await until(lambda: log.named("requeue_failed") != [])
        await asyncio.sleep(0.1)
        assert len(log.named("requeue_failed")) == 1 and host.appended == []
        fs.fail = False
        await until(lambda: not any(folder.iterdir()))
        await r.stop(task, 5)

    run(main())
    assert host.events() == texts(20)


def test_files_are_read_and_written_off_the_event_loop(tmp_path: Path) -> None:
    """Every filesystem call of the requeuer (listing, reads, progress, deletion) runs in its
    own thread: a slow disk never stalls the listeners (it used to read on the loop)."""

    class Threads(Filesystem):
        def __init__(self) -> None:
            self.seen: set[str] = set()

        def _note(self) -> None:
            self.seen.add(threading.current_thread().name)

        def listdir(self, path: Path) -> list[str]:
            self._note()
            return super().listdir(path)

        def pread(self, fd: int, length: int, offset: int) -> bytes:
            self._note()
            return super().pread(fd, length, offset)

        def fsync(self, fd: int) -> None:
            self._note()
            super().fsync(fd)

        def unlink(self, path: Path, missing_ok: bool = False) -> None:
            self._note()
            super().unlink(path, missing_ok)

    folder = tmp_path / "requeue"
    write_file(folder, texts(120))
    fs, host = Threads(), Host()
    run(until_done(requeuer(folder, host, fs=fs), folder))
    assert host.events() == texts(120)
    assert fs.seen and all(name.startswith("requeue") for name in fs.seen), fs.seen
