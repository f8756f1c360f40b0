"""Health, readiness and the systemd STATUS= line: one place that reads the daemon's state.

/healthz, /readyz, the watchdog and `systemctl status` all ask the same questions (is
delivery stalled? does the spool refuse writes? is a listener down?); their answers are
computed here, from what delivery, the spool and the listeners show, and from nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from .counters import Counters


class DeliveryState(Protocol):
    """Delivery, as health reads it."""

    @property
    def backlog(self) -> int: ...
    @property
    def failing(self) -> bool: ...
    @property
    def spool_blocked(self) -> bool: ...
    @property
    def last_progress(self) -> float: ...
    def requeue_stall_reason(self) -> str | None: ...


class ListenerState(Protocol):
    """The listener set, as health reads it."""

    def down(self) -> list[str]: ...
    def unbound(self) -> list[str]: ...


def stall_reason(delivery: DeliveryState, stall_after: float) -> str | None:
    """Why delivery counts as stalled, or None: batches wait and nothing went out for a while.

    The one rule behind /healthz failing and the systemd watchdog pings stopping.
    """
    backlog = delivery.backlog
    idle = time.monotonic() - delivery.last_progress
    if backlog and idle > stall_after:
        return f"{backlog} batches waiting and nothing delivered for {idle:.0f} s"
    return None


class Health:
    """The answers of /healthz, /readyz and the STATUS= line.

    `stall_after` is read at each question (SIGHUP changes status.stall_after);
    `spooled_events` says how many events the spool holds (None: no spool, dry-run);
    `stopping` is True from the moment shutdown begins.
    """

    def __init__(self, delivery: DeliveryState, listeners: ListenerState, counters: Counters,
                 stall_after: Callable[[], float], spooled_events: Callable[[], int | None],
                 stopping: Callable[[], bool]) -> None:
        self.delivery = delivery
        self.listeners = listeners
        self.counters = counters
        self.stall_after = stall_after
        self.spooled_events = spooled_events
        self.stopping = stopping
        # (monotonic time, accepted, delivered) at the last STATUS= line: its rates.
        self._status_mark = (time.monotonic(), 0, 0)

    def stall_reason(self) -> str | None:
        return stall_reason(self.delivery, self.stall_after())

    def health(self) -> tuple[bool, dict[str, Any]]:
        """/healthz: ok, or failing with one reason per problem."""
        d = self.delivery
        idle = time.monotonic() - d.last_progress
        reasons: list[str] = []
        if d.spool_blocked:
            reasons.append("the spool refuses writes (full or disk error): input is held back")
        stalled = self.stall_reason()
        if stalled:
            reasons.append(stalled)
        # Not in stall_reason (the systemd watchdog): a restart does not empty a full spool.
        requeue = d.requeue_stall_reason()
        if requeue:
            reasons.append(requeue)
        if not self.stopping():  # at shutdown they close on purpose
            reasons += [f"listener {name} is down (closed, not by us)"
                        for name in self.listeners.down()]
        return not reasons, {
            "status": "ok" if not reasons else "failing",
            "reasons": reasons,
            "intake_failing": d.failing,
            "backlog_batches": d.backlog,
            "seconds_since_last_delivery": round(idle, 1),
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """/readyz: every listener bound and the spool recovered (it is recovered before
        anything starts); not ready from the moment shutdown begins."""
        reasons: list[str] = []
        if self.stopping():
            reasons.append("shutting down")
        reasons += [f"listener {name} is not bound" for name in self.listeners.unbound()]
        return not reasons, {"status": "ready" if not reasons else "not ready",
                             "reasons": reasons}

    def status_line(self) -> str:
        """The STATUS= summary: rates since the previous line, what waits, the last delivery."""
        now = time.monotonic()
        c = self.counters
        then, accepted, delivered = self._status_mark
        self._status_mark = (now, c.accepted_events, c.delivered_events)
        span = max(now - then, 1e-3)
        d = self.delivery
        events = self.spooled_events()
        spooled = f"spool {events} events" if events is not None else "no spool (dry-run)"
        line = (f"in {(c.accepted_events - accepted) / span:.0f} events/s, "
                f"out {(c.delivered_events - delivered) / span:.0f} events/s, "
                f"backlog {d.backlog} batches, {spooled}, "
                f"last delivery {now - d.last_progress:.0f} s ago")
        if d.failing:
            line += ", intake failing"
        stalled = self.stall_reason()
        return f"STALLED: {stalled}; {line}" if stalled else line
