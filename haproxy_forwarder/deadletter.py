"""Dead-letter file: events the intake will never take, kept on disk with the reason.

One JSON line per event under spool.dir/dead-letter/, so an operator can read, grep and
re-send them; nothing is ever dropped without a trace.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson

from .batching import Batch


class DeadLetters:
    def __init__(self, spool_dir: Path) -> None:
        self.dir = spool_dir / "dead-letter"

    def path_for_today(self) -> Path:
        return self.dir / time.strftime("dead-letter-%Y%m%d.jsonl", time.gmtime())

    def write(
        self, batch: Batch, reason: str, status: int | None = None, response: str = ""
    ) -> Path:
        """Append every event of `batch`; raises OSError if the disk refuses (caller logs)."""
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
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path_for_today()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            view = memoryview(lines)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return path
