"""Health, readiness and the systemd STATUS= line: one place that reads the daemon's state.

/healthz, /readyz, the watchdog and `systemctl status` all ask the same questions (is
delivery stalled? does the spool refuse writes? is a listener down?); their answers are
computed here, from what delivery, the spool and the listeners show, and from nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .counters import Counters, Registry


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


class Intake(Protocol):
    """One intake's pipeline, as health reads it (intakes.Pipeline)."""

    name: str

    @property
    def delivery(self) -> DeliveryState: ...
    @property
    def counters(self) -> Counters: ...
    def held_events(self) -> dict[str, int]: ...


class Health:
    """The answers of /healthz, /readyz and the STATUS= line, over every intake: each reason
    names its intake ("intake eu: ...").

    `stall_after` is read at each question (SIGHUP changes status.stall_after);
    `stopping` is True from the moment shutdown begins.
    """

    def __init__(self, intakes: Iterable[Intake], listeners: ListenerState,
                 registry: Registry, stall_after: Callable[[], float],
                 stopping: Callable[[], bool], spool: bool = True) -> None:
        self.intakes = intakes
        self.listeners = listeners
        self.registry = registry
        self.stall_after = stall_after
        self.stopping = stopping
        self.spool = spool
        # (monotonic time, accepted, delivered) at the last STATUS= line: its rates.
        self._status_mark = (time.monotonic(), 0, 0)

    def stall_reason(self) -> str | None:
        """Why the daemon counts as stalled (the systemd watchdog's rule, and the STALLED
        mark of the STATUS= line): an intake's batches wait, undelivered for stall_after,
        and no other intake delivered anything meanwhile either. One intake refusing its key
        for an hour is its own problem (/healthz says so): restarting the daemon would not
        cure it and would interrupt the intakes that work."""
        after = self.stall_after()
        pipes = list(self.intakes)
        now = time.monotonic()
        if any(now - p.delivery.last_progress <= after for p in pipes):
            return None
        for pipe in pipes:
            why = stall_reason(pipe.delivery, after)
            if why:
                return f"intake {pipe.name}: {why}" if len(pipes) > 1 else why
        return None

    def health(self) -> tuple[bool, dict[str, Any]]:
        """/healthz: ok, or failing with one reason per problem."""
        reasons: list[str] = []
        intakes: dict[str, Any] = {}
        for pipe in self.intakes:
            d = pipe.delivery
            if d.spool_blocked:
                reasons.append(f"intake {pipe.name}: the spool refuses writes (full or disk "
                               "error): input routed to it is held back")
            stalled = stall_reason(d, self.stall_after())
            if stalled:
                reasons.append(f"intake {pipe.name}: {stalled}")
            # Not in stall_reason (the systemd watchdog): a restart does not empty a full spool.
            requeue = d.requeue_stall_reason()
            if requeue:
                reasons.append(f"intake {pipe.name}: {requeue}")
            intakes[pipe.name] = {
                "intake_failing": d.failing,
                "backlog_batches": d.backlog,
                "seconds_since_last_delivery": round(time.monotonic() - d.last_progress, 1),
            }
        if not self.stopping():  # at shutdown they close on purpose
            reasons += [f"listener {name} is down (closed, not by us)"
                        for name in self.listeners.down()]
        every = list(intakes.values())
        return not reasons, {
            "status": "ok" if not reasons else "failing",
            "reasons": reasons,
            # The totals (as before several intakes), then each intake's.
            "intake_failing": any(i["intake_failing"] for i in every),
            "backlog_batches": sum(i["backlog_batches"] for i in every),
            "seconds_since_last_delivery": max(
                (i["seconds_since_last_delivery"] for i in every), default=0.0),
            "intakes": intakes,
        }

    def live(self) -> tuple[bool, dict[str, Any]]:
        """/livez: what a restart could cure: the event loop answers, delivery is not stalled
        everywhere (`stall_reason`, the systemd watchdog's rule), no listener closed on its
        own. Not a full spool, nor one intake refusing its key while others deliver: /healthz
        says those, and a restart cures neither. For orchestrators' liveness probes."""
        reasons = [why] if (why := self.stall_reason()) else []
        if not self.stopping():
            reasons += [f"listener {name} is down (closed, not by us)"
                        for name in self.listeners.down()]
        return not reasons, {"status": "live" if not reasons else "failing",
                             "reasons": reasons}

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
        """The STATUS= summary: rates since the previous line, what waits, the last delivery;
        the intakes failing by name."""
        now = time.monotonic()
        snap = self.registry.snapshot()
        accepted_now = int(snap.get("accepted_events", 0))
        delivered_now = int(snap.get("delivered_events", 0))
        then, accepted, delivered = self._status_mark
        self._status_mark = (now, accepted_now, delivered_now)
        span = max(now - then, 1e-3)
        pipes = list(self.intakes)
        backlog = sum(p.delivery.backlog for p in pipes)
        last = max((now - p.delivery.last_progress for p in pipes), default=0.0)
        spooled = (f"spool {sum(p.held_events()['spool'] for p in pipes)} events"
                   if self.spool else "no spool (dry-run)")
        line = (f"in {(accepted_now - accepted) / span:.0f} events/s, "
                f"out {(delivered_now - delivered) / span:.0f} events/s, "
                f"backlog {backlog} batches, {spooled}, "
                f"last delivery {last:.0f} s ago")
        failing = [p.name for p in pipes if p.delivery.failing]
        if failing and len(pipes) == 1:
            line += ", intake failing"
        elif failing:
            line += f", intakes failing: {', '.join(failing)}"
        stalled = self.stall_reason()
        return f"STALLED: {stalled}; {line}" if stalled else line
