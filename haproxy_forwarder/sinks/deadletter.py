"""Dead-letter files: events the intake will never take, kept on disk with the reason.

One JSON line per event under spool.dir/dead-letter/, so an operator can read, grep and
re-queue them (`haproxy-forwarder spool replay-dead-letter`); bounded in total size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from .batching import Batch


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class DeadLetters:
    def __init__(self, spool_dir: Path, max_size: int = 256 << 20) -> None:
        self.dir = spool_dir / "dead-letter"
        self.max_size = max_size
        self._size: int | None = None  # measured lazily: the directory may not exist yet

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("dead-letter-*.jsonl")) if self.dir.is_dir() else []

    def size(self) -> int:
        if self._size is None:
            self._size = sum(p.stat().st_size for p in self.files())
        return self._size

    def write(
        self, batch: Batch, reason: str, status: int | None = None, response: str = ""
    ) -> Path | None:
        """Append every event of `batch`; None when the size bound is reached.

        Raises OSError if the disk refuses (the caller logs and counts).
        """
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        lines = b"".join(
            orjson.dumps(
                {
                    "dead_lettered_at": now,
                    "reason": reason,
                    "status": status,
                    "response": response,
                    "timestamp": t,
                    "event": e,
                }
            )
            + b"\n"
            for e, t in zip(batch.events, batch.times, strict=True)
        )
        if self.size() + len(lines) > self.max_size:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / time.strftime("dead-letter-%Y%m%d.jsonl", time.gmtime())
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            _write_all(fd, lines)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._size = self.size() + len(lines)
        return path


def read_dead_letters(path: Path) -> Iterator[tuple[str, str]]:
    """(event, timestamp) of every well-formed line of a dead-letter file."""
    with path.open("rb") as fh:
        for line in fh:
            try:
                rec = orjson.loads(line)
                yield str(rec["event"]), str(rec["timestamp"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
