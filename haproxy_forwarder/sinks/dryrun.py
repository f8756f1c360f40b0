"""Dry-run: each event as a JSON line on stdout instead of a POST (`run --dry-run`)."""

from __future__ import annotations

import sys

from ..batching import Batch
from .intake import Kind, Outcome


def dry_run_lines(batch: Batch) -> bytes:
    """{"timestamp": ..., "event": ...} per line, built from the encoded fragments."""
    return b"".join(
        b'{"timestamp":"%s","event":%s}\n' % (t, f)
        for f, t in zip(batch.fragments(), batch.times, strict=True)
    )


class DryRunSink:
    async def send(self, batch: Batch) -> list[tuple[Batch, Outcome]]:
        sys.stdout.buffer.write(dry_run_lines(batch))
        sys.stdout.buffer.flush()
        return [(batch, Outcome(Kind.DELIVERED, 200))]

    async def aclose(self) -> None:
        return None
