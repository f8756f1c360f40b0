"""Re-queued dead letters: the files `spool replay-dead-letter` moved into spool.dir/requeue/,
appended to the spool batch by batch, off the event loop, resumable.

A file is read in chunks (in a thread of its own, never on the event loop) of at most
`max_events` events and `max_bytes` bytes; each chunk becomes one spool append (fsync'd). After
each append the byte offset of the next unread line is kept in `<file>.progress` (written,
fsync'd, renamed over the previous one: it holds either the old offset or the new one). So
neither a refusal (spool full, a disk error) nor a restart appends a batch twice or
dead-letters an oversized event twice: work resumes at that offset. Only a crash between an
append and its progress write repeats that one batch at the next start (a duplicate, like a
crash between the intake's 2xx and the spool ack). The file is deleted once all of it is in.

The spool is shared with live input: a batch is appended only while the spool holds less than
half its size (or nothing), the workers are woken after each append, and a full spool is waited
out (the same batch tried again, never the file from its start). So a file larger than the
spool goes in as fast as the intake takes the spool out, and live input keeps room.

A file that makes no progress for `stall_after` seconds says so: a `requeue_stalled` warning
(repeated every `stall_after` while it lasts) and `stall_reason()` (for /healthz).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from ..batching import Batch
from ..collector import OVERSIZED_REASON
from ..config import MAX_EVENT_BYTES
from ..observability.counters import Counters
from ..spool import RecordTooLarge, SpoolError, SpoolFull
from ..spool.segments import Filesystem, fsync_dir, pwrite_all
from .writer import SPOOL_RETRY, SpoolLike

# How often the folder is looked at for new files.
REQUEUE_INTERVAL = 2.0
# Re-queued batches take at most this share of the spool: the rest stays for live input.
SPOOL_SHARE = 0.5
# Spool bytes per event beside its text (timestamp, offsets): only to estimate a record.
RECORD_OVERHEAD = 48
# Reads of a re-queued file, in blocks; a "line" longer than MAX_LINE is no dead letter.
READ_BLOCK = 256 * 1024
MAX_LINE = 8 * 1024 * 1024
PROGRESS_SUFFIX = ".progress"
TOO_LARGE_FOR_SPOOL = "event larger than the spool (spool.max_size)"

T = TypeVar("T")


class RequeueHost(Protocol):
    """What the requeuer needs from delivery (haproxy_forwarder.delivery.Delivery)."""

    async def spool_append(self, batch: Batch) -> int:
        """Append (fsync'd), count as re-queued input, wake the workers; SpoolError raised."""
        ...

    def dead_letter(self, batch: Batch, reason: str, status: int | None = None,
                    response: str = "") -> asyncio.Future[bool]: ...


class DeadLetterFolder(Protocol):
    def barrier(self) -> None: ...


# -- the file side: pure functions of a path, run in the requeuer's thread ------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    """The next step of a file from some offset: a batch, or one oversized event, or nothing
    (skipped lines only, or the end); `end` is the offset of the line after it."""

    batch: Batch | None
    oversized: tuple[str, str] | None
    end: int
    skipped: int
    eof: bool


def progress_path(path: Path) -> Path:
    return path.with_name(path.name + PROGRESS_SUFFIX)


def _lines(fs: Filesystem, fd: int, offset: int) -> Iterator[tuple[int, bytes | None]]:
    """(length, line) from `offset` on, a line with its newline (the last one maybe without);
    a line over MAX_LINE comes as (its length, None)."""
    buf = b""
    i = 0  # where the next line starts in buf
    pos = offset  # file offset of buf[0]
    skipping = 0  # bytes of an over-long line passed so far
    while True:
        nl = buf.find(b"\n", i)
        if nl >= 0:
            if skipping:
                yield skipping + nl + 1 - i, None
                skipping = 0
            else:
                yield nl + 1 - i, buf[i : nl + 1]
            i = nl + 1
            continue
        if len(buf) - i > MAX_LINE:
            skipping += len(buf) - i
            i = len(buf)
        pos, buf, i = pos + i, buf[i:], 0
        data = fs.pread(fd, READ_BLOCK, pos + len(buf))
        if not data:
            if skipping or buf:
                yield skipping + len(buf), (None if skipping else buf)
            return
        buf += data


def _parse(line: bytes | None) -> tuple[str, str] | None:
    if line is None:
        return None
    try:
        rec = orjson.loads(line)
        return str(rec["event"]), str(rec["timestamp"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def read_chunk(fs: Filesystem, path: Path, offset: int, max_events: int,
               max_bytes: int) -> Chunk:
    """The events of `path` from `offset`: up to `max_events` and `max_bytes` (at least one),
    stopping before an event over 250 KiB (the intake's limit), which is a chunk of its own."""
    texts: list[str] = []
    times: list[str] = []
    size = skipped = 0
    end = offset

    def chunk(eof: bool) -> Chunk:
        return Chunk(Batch.from_events(texts, times) if texts else None, None, end, skipped, eof)

    fd = fs.open(path, os.O_RDONLY)
    try:
        for length, line in _lines(fs, fd, offset):
            parsed = _parse(line)
            if parsed is None:
                skipped += 1
                end += length
                continue
            event, ts = parsed
            nbytes = len(event.encode("utf-8"))
            if nbytes > MAX_EVENT_BYTES:
                if texts:
                    return chunk(eof=False)  # it comes next, alone
                return Chunk(None, (event, ts), end + length, skipped, eof=False)
            cost = nbytes + len(ts) + RECORD_OVERHEAD
            if texts and (len(texts) >= max_events or size + cost > max_bytes):
                return chunk(eof=False)
            texts.append(event)
            times.append(ts)
            size += cost
            end += length
        return chunk(eof=True)
    finally:
        fs.close(fd)


def read_progress(fs: Filesystem, path: Path) -> int | None:
    """The offset kept for `path`, or None (no progress file: start at 0). ValueError if the
    file holds no offset (never written that way: it is renamed into place whole)."""
    prog = progress_path(path)
    if not fs.exists(prog):
        return None
    raw = fs.read_bytes(prog)
    try:
        data = orjson.loads(raw)
        offset = data["offset"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        offset = None
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{prog} holds no offset ({raw[:80]!r}); delete it to start the file "
                         "over (what was already re-queued is then sent twice)")
    return offset


def write_progress(fs: Filesystem, path: Path, offset: int) -> None:
    """Keep `offset` for `path`, durably and atomically (write, fsync, rename, fsync folder)."""
    prog = progress_path(path)
    tmp = prog.with_name(prog.name + ".tmp")
    fs.unlink(tmp, missing_ok=True)
    fd = fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        pwrite_all(fs, fd, orjson.dumps({"offset": offset}), 0)
        fs.fsync(fd)
    finally:
        fs.close(fd)
    fs.replace(tmp, prog)
    fsync_dir(fs, path.parent)


def finish(fs: Filesystem, path: Path) -> None:
    """All of `path` is in: delete it, then its progress (a progress file left alone by a crash
    in between is removed by the next listing)."""
    fs.unlink(path)
    fsync_dir(fs, path.parent)
    fs.unlink(progress_path(path), missing_ok=True)
    fsync_dir(fs, path.parent)


def list_files(fs: Filesystem, folder: Path) -> list[Path]:
    """The files to re-queue, oldest name first (read only: `spool stats` lists them too)."""
    if not fs.is_dir(folder):
        return []
    return [folder / n for n in sorted(fs.listdir(folder)) if n.endswith(".jsonl")]


def remove_orphans(fs: Filesystem, folder: Path) -> None:
    """Progress files whose file is done (a crash between the two deletions of finish())."""
    if not fs.is_dir(folder):
        return
    names = set(fs.listdir(folder))
    for name in names:
        base, sep, _ = name.partition(".jsonl" + PROGRESS_SUFFIX)
        if sep and base + ".jsonl" not in names:  # x.jsonl.progress(.tmp), x.jsonl done
            fs.unlink(folder / name, missing_ok=True)


def has_room(stats: dict[str, Any], batch: Batch) -> bool:
    """Whether a re-queued batch may go in now: the spool holds nothing waiting, or the batch
    keeps it under SPOOL_SHARE of its size."""
    if not stats["batches"]:
        return True
    estimate = batch.nbytes + len(batch) * RECORD_OVERHEAD
    return bool(stats["bytes"] + estimate <= stats["max_size"] * SPOOL_SHARE)


# -- the requeuer ------------------------------------------------------------------------------


@dataclass(slots=True)
class FileReport:
    """What one file gave, for its `dead_letters_requeued` line."""

    events: int = 0
    dead_lettered: int = 0
    skipped_lines: int = 0


class Stopping(Exception):
    """stop() was called: leave at the next step boundary (nothing half done)."""


class Requeuer:
    """One task: every file of `folder`, oldest first, chunk by chunk into the spool."""

    def __init__(
        self,
        folder: Path,
        host: RequeueHost,
        spool: SpoolLike,
        dead: DeadLetterFolder,
        counters: Counters,
        log: Any,
        *,
        max_events: int,
        max_bytes: int,
        stall_after: float,
        fs: Filesystem | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = REQUEUE_INTERVAL,
        retry: float = SPOOL_RETRY,
    ) -> None:
        self.folder = folder
        self.host = host
        self.spool = spool
        self.dead = dead
        self.counters = counters
        self.log = log
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.stall_after = stall_after
        self.fs = fs or Filesystem()
        self._clock = clock
        self.interval = interval
        self.retry = retry
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="requeue")
        self._stop = asyncio.Event()
        # Offsets reached in this process: ahead of the progress files if writing one failed
        # (a crash would repeat those batches; this process will not).
        self._offsets: dict[Path, int] = {}
        self._failed: dict[Path, str] = {}  # the last error logged per file (said once)
        self.waiting_files = 0  # files in the folder not done yet (last listing)
        self.current: Path | None = None
        self.waiting_for = ""  # why the current file does not move now, if it does not
        self._last_progress = clock()
        self._last_warning: float | None = None  # when requeue_stalled was last logged

    # -- what health and metrics read ---------------------------------------------------------

    def idle_seconds(self) -> float:
        """Seconds since a file last moved, while files wait; 0 when there is nothing to do."""
        if not self.waiting_files:
            return 0.0
        return max(0.0, self._clock() - self._last_progress)

    def stall_reason(self) -> str | None:
        idle = self.idle_seconds()
        if idle <= self.stall_after:
            return None
        name = self.current.name if self.current is not None else "?"
        why = f" ({self.waiting_for})" if self.waiting_for else ""
        return (f"{self.waiting_files} re-queued dead-letter file(s) not moving for "
                f"{idle:.0f} s: {name}{why}")

    # -- the task -----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while not self._stop.is_set():
                await self._pass()
                await self._pause(self.interval)
        except Stopping:
            pass
        finally:
            self._pool.shutdown(wait=False)

    async def stop(self, task: asyncio.Task[None], timeout: float) -> None:
        """Ask `task` (running run()) to end between two steps; cancel it after `timeout` (an
        append or read stuck on a hung disk: its batch may land twice after a restart)."""
        self._stop.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _pass(self) -> None:
        try:
            await self._io(remove_orphans, self.fs, self.folder)
            files = await self._io(list_files, self.fs, self.folder)
        except OSError as exc:
            self._file_failed(self.folder, exc)
            return
        if files and not self.waiting_files:
            self._last_progress = self._clock()  # new work: its clock starts now
        self.waiting_files = len(files)
        for path in files:
            self.current = path
            try:
                await self._file(path)
                self.waiting_files -= 1
            except (OSError, SpoolError, ValueError) as exc:
                self._file_failed(path, exc)
            finally:
                self.current = None
                self.waiting_for = ""
        self._check_stall()

    def _file_failed(self, path: Path, exc: BaseException) -> None:
        error = str(exc)
        if self._failed.get(path) != error:  # once per file and error, not every 2 s
            self._failed[path] = error
            self.log.error("requeue_failed", file=path.name, error=error,
                           action=f"retried every {self.interval:.0f} s")

    async def _file(self, path: Path) -> None:
        # A dead-letter write that had this file open before it was renamed here has ended.
        await self._io(self.dead.barrier)
        offset = self._offsets.get(path)
        if offset is None:
            offset = await self._io(read_progress, self.fs, path) or 0
            if offset:
                self.log.info("requeue_resumed", file=path.name, offset=offset)
        report = FileReport()
        limit = self.max_events
        while True:
            chunk = await self._io(read_chunk, self.fs, path, offset, limit, self.max_bytes)
            report.skipped_lines += chunk.skipped
            if chunk.batch is not None:
                if not await self._append(chunk.batch):
                    limit = max(1, len(chunk.batch) // 2)  # too large: smaller chunks
                    if len(chunk.batch) > 1:
                        continue
                    await self._dead_letter(chunk.batch, TOO_LARGE_FOR_SPOOL)
                    report.dead_lettered += 1
                else:
                    report.events += len(chunk.batch)
                limit = self.max_events
            elif chunk.oversized is not None:
                event, ts = chunk.oversized
                # The intake would refuse it again (silently, per event): keep it dead.
                await self._dead_letter(Batch.from_events([event], [ts]), OVERSIZED_REASON)
                report.dead_lettered += 1
            if chunk.end != offset:
                self._offsets[path] = offset = chunk.end
                await self._io(write_progress, self.fs, path, offset)
                self._progressed()
            if chunk.eof:
                break
            if self._stop.is_set():
                raise Stopping
        await self._io(finish, self.fs, path)
        self._offsets.pop(path, None)
        self._failed.pop(path, None)
        self._progressed()
        if report.skipped_lines:
            self.log.warning("requeue_skipped_lines", file=path.name,
                             lines=report.skipped_lines,
                             reason="not a dead-letter record (JSON with event and timestamp)")
        self.log.info("dead_letters_requeued", file=path.name, events=report.events,
                      dead_lettered_again=report.dead_lettered)

    async def _append(self, batch: Batch) -> bool:
        """Append `batch` once it fits, waiting out a full or failing spool; False if it can
        never fit (larger than the spool)."""
        while True:
            # stats() takes the spool's lock, which a segment deletion may hold: not on the loop.
            if has_room(await self._io(self.spool.stats), batch):
                try:
                    await self.host.spool_append(batch)  # counted there, once on disk
                    return True
                except RecordTooLarge:
                    return False
                except SpoolFull:
                    self._waiting("spool full")
                except SpoolError as exc:
                    self._waiting(f"spool write failed: {exc}")
            else:
                self._waiting(f"spool over {SPOOL_SHARE:.0%} full")
            await self._pause(self.retry, raise_on_stop=True)

    async def _dead_letter(self, batch: Batch, reason: str) -> None:
        """Back into the dead letters; settled (written or dropped, counted either way) before
        the progress moves past it, so it is done once. Input again: requeued_events."""
        await self.host.dead_letter(batch, reason)
        self.counters.requeued_events += len(batch)

    # -- progress and stalls --------------------------------------------------------------------

    def _waiting(self, why: str) -> None:
        self.waiting_for = why
        self._check_stall()

    def _progressed(self) -> None:
        if self._last_warning is not None:
            self.log.info("requeue_moving_again", file=self.current.name if self.current else "",
                          stalled_for=round(self._clock() - self._last_progress, 1))
        self._last_progress = self._clock()
        self._last_warning = None
        self.waiting_for = ""

    def _check_stall(self) -> None:
        now = self._clock()
        reason = self.stall_reason()
        if reason is None:
            return
        if self._last_warning is None or now - self._last_warning >= self.stall_after:
            self._last_warning = now
            self.log.warning("requeue_stalled", reason=reason,
                             file=self.current.name if self.current else "",
                             waiting_for=self.waiting_for or None,
                             idle_seconds=round(self.idle_seconds(), 1))

    # -- helpers --------------------------------------------------------------------------------

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    async def _pause(self, seconds: float, raise_on_stop: bool = False) -> None:
        # A timer setting a flag, not asyncio.wait_for: on Python 3.11 wait_for swallows a
        # cancellation that comes once the wait is over (CPython gh-86296), and stop() would
        # wait for a re-queuer that runs on.
        woken = asyncio.Event()
        timer = asyncio.get_running_loop().call_later(seconds, woken.set)
        stop = asyncio.ensure_future(self._stop.wait())
        stop.add_done_callback(lambda _: woken.set())
        try:
            await woken.wait()
        finally:
            timer.cancel()
            stop.cancel()
        if self._stop.is_set() and raise_on_stop:
            raise Stopping


