"""Rate-limited warnings: the first of a kind at once, the next ones summed in one line later.

Shared by the listeners (refusals, framing errors), the status endpoint and delivery (drops):
a repeated event must be seen, never flood the journal.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

# Seconds between two lines of one kind of warning.
QUIET_INTERVAL = 5.0


@dataclass(eq=False)
class _Pending:
    suppressed: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    scheduled: bool = False


class QuietLog:
    """Warnings for repeated events: the first of a kind is logged at once; the next ones in
    the following QUIET_INTERVAL seconds are counted and said in one line with `suppressed`."""

    def __init__(self, log: Any, interval: float = QUIET_INTERVAL) -> None:
        self.log = log
        self.interval = interval
        self._quiet_until: dict[str, float] = {}
        self._pending: dict[str, _Pending] = {}

    def warning(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now >= self._quiet_until.get(event, 0.0):
            self._quiet_until[event] = now + self.interval
            self.log.warning(event, **fields)
            return
        p = self._pending.setdefault(event, _Pending())
        p.suppressed += 1
        p.fields = fields  # the last one stands for them all
        if not p.scheduled:
            p.scheduled = True
            delay = self._quiet_until[event] - now
            asyncio.get_running_loop().call_later(delay, self._summary, event)

    def flush(self) -> None:
        """Say what is still suppressed (a listener stops: its summary must not be lost)."""
        for event in list(self._pending):
            self._summary(event)

    def _summary(self, event: str) -> None:
        p = self._pending.pop(event, None)
        if p is None or not p.suppressed:
            return
        self._quiet_until[event] = time.monotonic() + self.interval
        self.log.warning(event, **p.fields, suppressed=p.suppressed,
                         suppressed_seconds=self.interval)
