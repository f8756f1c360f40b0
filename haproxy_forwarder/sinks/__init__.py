"""Where batches go: the intake (HTTPS), stdout (dry-run), and the dead-letter store.

`Sink` is what delivery talks to; `make_sink` picks one from the settings.
"""

from __future__ import annotations

from typing import Protocol

from ..batching import Batch
from ..config import IntakeConfig
from .intake import IntakeClient, IntakeSink, Kind, Outcome

__all__ = ["Kind", "Outcome", "Sink", "make_sink"]


class Sink(Protocol):
    async def send(self, batch: Batch) -> list[tuple[Batch, Outcome]]:
        """One attempt for the batch (possibly split in bodies); an outcome per part, in
        order, covering every event of the batch once."""
        ...

    async def aclose(self) -> None: ...


def make_sink(cfg: IntakeConfig) -> Sink:
    if cfg.dry_run:
        from .dryrun import DryRunSink

        return DryRunSink()
    return IntakeSink(IntakeClient(cfg), cfg.endpoint, cfg.gzip)
