"""Dead-letter files: events the intake will never take, kept on disk with the reason.

One JSON line per event under spool.dir/dead-letter/, so an operator can read, grep and
re-queue them (`haproxy-forwarder spool replay-dead-letter`); bounded in total size.
Blocking (write + fsync): delivery calls `write` from its dead-letter thread, never the loop.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from ..batching import Batch
from ..observability import logs
from ..spool.segments import make_private_dirs, open_spool_file

# A timestamp that needs no escaping between JSON quotes (printable ASCII, no " or \): the
# usual case, written as is. Anything else (a hand-edited requeued file) goes through orjson.
_PLAIN = re.compile(rb'[\x20\x21\x23-\x5b\x5d-\x7e]*')


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_str(value: bytes) -> bytes:
    if _PLAIN.fullmatch(value):
        return b'"' + value + b'"'
    return orjson.dumps(value.decode("ascii", "replace"))


def dead_letter_lines(
    batch: Batch, reason: str, status: int | None, response: str, at: time.struct_time,
    intake: str | None = None,
) -> bytes:
    """The JSON lines for `batch`, built from its encoded fragments (no decoding).

    Same keys in the same order as `orjson.dumps(dict)` would write them: dead_lettered_at,
    intake (the name of the intake that refused them, when known), reason, status, response,
    timestamp, event.
    """
    where = {"intake": intake} if intake is not None else {}
    head = orjson.dumps(
        {
            "dead_lettered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", at),
            **where,
            # The sink scrubs the key from answers already; this covers any other writer.
            "reason": logs.redact(reason),
            "status": status,
            "response": logs.redact(response),
        }
    )[:-1]  # without the closing brace: the per-event keys follow
    return b"".join(
        b'%s,"timestamp":%s,"event":%s}\n' % (head, _json_str(t), f)
        for f, t in zip(batch.fragments(), batch.times, strict=True)
    )


class DeadLetters:
    """The dead-letter folder; `write` runs in one thread (delivery's dead-letter writer)."""

    def __init__(self, spool_dir: Path, max_size: int = 256 << 20,
                 intake: str | None = None) -> None:
        self.dir = spool_dir / "dead-letter"
        self.max_size = max_size
        # Its intake's name, written in every record (the folder is that intake's too).
        self.intake = intake
        # Held for a whole write: see barrier().
        self._writing = threading.Lock()

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("dead-letter-*.jsonl")) if self.dir.is_dir() else []

    def size(self) -> int:
        """Bytes in the dead-letter files now, measured (a listing and one lstat per file)."""
        total = 0
        for p in self.files():
            try:
                total += p.lstat().st_size
            except FileNotFoundError:  # moved away (replay) between the listing and here
                continue
        return total

    def barrier(self) -> None:
        """Return once no write that started before this call is still running.

        `spool replay-dead-letter` may rename today's file while a write has it open; that
        write still lands in the renamed file. Whoever reads a renamed file (the requeuer)
        calls this first, so that it never reads, and deletes, a file still being appended.
        """
        with self._writing:
            pass

    def write(
        self,
        batch: Batch,
        reason: str,
        status: int | None = None,
        response: str = "",
        at: time.struct_time | None = None,
    ) -> Path | None:
        """Append every event of `batch` (fsync'd); None when the size bound is reached.

        `at` is when it was dead-lettered (UTC; default now). Raises OSError if the disk
        refuses (the caller logs and counts).
        """
        when = at if at is not None else time.gmtime()
        lines = dead_letter_lines(batch, reason, status, response, when, self.intake)
        with self._writing:
            # The folder is measured at each write, never counted in memory: another process
            # moves files away (`spool replay-dead-letter`), and a stale count dropped
            # refusals as dead_letter_full into an empty folder. A listing and a few lstat
            # calls, in this thread, cost less than the fsync that follows.
            if self.size() + len(lines) > self.max_size:
                return None
            return self._append(lines, when)

    def _append(self, lines: bytes, when: time.struct_time) -> Path:
        new_dir = not os.path.isdir(self.dir)
        make_private_dirs(self.dir)
        path = self.dir / time.strftime("dead-letter-%Y%m%d.jsonl", when)
        new_file = not os.path.lexists(path)
        # Never through a symbolic link, never into another user's file (UnsafeSpoolFile).
        fd = open_spool_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            _write_all(fd, lines)
            os.fsync(fd)
        finally:
            os.close(fd)
        # A file (or folder) just created is durable once its directory entry is: the
        # caller may acknowledge these events to their sender (RELP) on return.
        if new_file:
            _fsync_dir(self.dir)
        if new_dir:
            _fsync_dir(self.dir.parent)
        return path


def read_dead_letters(path: Path) -> Iterator[tuple[str, str]]:
    """(event, timestamp) of every well-formed line of a dead-letter file."""
    with os.fdopen(open_spool_file(path, os.O_RDONLY), "rb") as fh:
        for line in fh:
            try:
                rec = orjson.loads(line)
                yield str(rec["event"]), str(rec["timestamp"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
