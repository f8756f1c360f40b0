"""Sources → intakes: each connection's events handed to the intake(s) its routes choose.

`Routes` is the route table in force, as sources use it (`SourceContext.inlet`): one inlet
per connection (per sender, for UDP), made once its origin is known. An inlet whose origin
decides the intake (routes by listener, source, certificate) hands each chunk whole to that
intake's collector: one comparison more per chunk than with a single intake, nothing per
message. An origin whose routes depend on the program reads its stream with a SplitReader
(ingest/split.py) and hands each intake its part; the take's acknowledgement (RELP) is split
so that it is given once every part is durable.

A reload replaces the table; each inlet notices at its next take (a version number) and
decides again: a moved source's next events go to its new intake. One thing cannot follow:
a connection opened under routes that did not depend on the program reads with the compiled
reader, which does not keep the program; if new routes make its origin depend on it, that
connection keeps the intake it had (logged once per reload, with the count) until its
sender reconnects. Never an intake the routes do not name for it.

Events no route sends to an intake (`drop = true`, or no route matched) are counted as
`unrouted_events{reason}` and settled at once (a RELP sender is answered: they were
received, and the config says not to forward them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .acks import Ack, split
from .collector import Clock
from .ingest import ChunkReader, ChunkResult, ProgramFilter
from .ingest.split import SplitReader, SplitResult
from .intakes import Pipeline
from .observability.counters import Counters
from .routing import Decision, Origin, Table, Target, UnroutedReason
from .sources.base import Inlet


class Unrouted:
    """Where events routed nowhere go: counted, settled."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def take(self, result: ChunkResult, why: UnroutedReason, ack: Ack | None) -> None:
        c = self.counters
        c.filtered_out += result.filtered
        c.invalid_timestamps += result.bad_times
        if result.accepted:
            c.unrouted(result.accepted, why)
        if ack is not None:
            ack.durable()


class Routes:
    """The route table in force and the live intakes it leads to (sources.base.Inlets)."""

    def __init__(self, table: Table, pipelines: Mapping[str, Pipeline], counters: Counters,
                 filt: ProgramFilter, max_message_size: Callable[[], int],
                 reader: Callable[[str], ChunkReader], log: Any) -> None:
        self.table = table
        self.pipelines = pipelines  # the live intakes by name (IntakeSet.live)
        self.unrouted = Unrouted(counters)
        self.filter = filt
        self.max_message_size = max_message_size
        self.reader = reader
        self.clock = Clock()
        self.version = 0
        self.log = log
        # Inlets that could not follow the last reload (see the module docstring).
        self.stuck = 0

    def use(self, table: Table) -> None:
        """A reload's table: every inlet decides again at its next take."""
        self.table = table
        self.version += 1
        self.stuck = 0

    def inlet(self, origin: Origin, framing: str) -> Inlet:
        decision = self.table.decide(origin)
        if decision.fixed is not None:
            return RoutedInlet(self, origin, self.reader(framing), decision, splits=False)
        splitter = SplitReader(self.filter, self.max_message_size(), framing,
                               self._program_target(origin))
        return RoutedInlet(self, origin, splitter, decision, splits=True)

    def _program_target(self, origin: Origin) -> Callable[[str], Target]:
        # Decided again per program under the table in force; the per-connection cache is
        # cleared when the table changes.
        cache: dict[str, Target] = {}
        seen = [self.version]

        def target(program: str) -> Target:
            if seen[0] != self.version:
                cache.clear()
                seen[0] = self.version
            t = cache.get(program)
            if t is None:
                if len(cache) >= 256:
                    cache.clear()
                t = cache[program] = self.table.decide(origin).target(program)
            return t
        return target

    def deliver(self, target: Target, result: ChunkResult, ack: Ack | None) -> None:
        """One part to its intake, or counted as unrouted."""
        pipe = self.pipelines.get(target.intake) if target.intake is not None else None
        if pipe is None:
            self.unrouted.take(result, target.why or "no_route", ack)
        else:
            pipe.collector.take(result, ack)


class RoutedInlet:
    """One connection's inlet (sources.base.Inlet)."""

    __slots__ = ("_fixed", "_pipes", "_version", "decision", "origin", "reader", "routes",
                 "splits")

    def __init__(self, routes: Routes, origin: Origin, reader: ChunkReader,
                 decision: Decision, *, splits: bool) -> None:
        self.routes = routes
        self.origin = origin
        self.reader = reader
        self.splits = splits
        self.decision = decision
        self._version = routes.version
        self._fixed: Target | None = None
        self._pipes: list[Pipeline] = []
        self._settle(decision)

    def _settle(self, decision: Decision) -> None:
        self.decision = decision
        self._fixed = decision.fixed
        live = self.routes.pipelines
        self._pipes = [live[n] for n in sorted(decision.intakes) if n in live]

    def _follow(self) -> None:
        """The table changed: decide again (see the module docstring for what cannot)."""
        r = self.routes
        self._version = r.version
        new = r.table.decide(self.origin)
        if new.fixed is None and not self.splits:
            r.stuck += 1
            if r.stuck == 1:
                r.log.warning(
                    "routes_need_reconnect",
                    reason="new routes choose the intake by program for connections that "
                           "were opened without program routes",
                    action="they keep their intake until their sender reconnects")
            # Its pipes may have gone: only the ones still live.
            self._pipes = [p for p in self._pipes if p.name in r.pipelines]
            return
        self._settle(new)

    def take(self, result: ChunkResult, ack: Ack | None = None) -> None:
        if self._version != self.routes.version:
            self._follow()
        if isinstance(result, SplitResult):
            parts: list[tuple[Target, ChunkResult]] = result.parts
            if not parts:
                if ack is not None:
                    ack.durable()
                return
            acks = split(ack, len(parts)) if ack is not None else [None] * len(parts)
            for (target, part), one in zip(parts, acks, strict=True):
                self.routes.deliver(target, part, one)
            return
        fixed = self._fixed
        self.routes.deliver(fixed if fixed is not None else Target(None, "no_route"),
                            result, ack)

    def flush(self) -> None:
        for pipe in self._pipes:
            pipe.collector.flush()

    def received_at(self) -> bytes:
        return self.routes.clock.now()

    @property
    def held(self) -> bool:
        if self._version != self.routes.version:
            self._follow()
        return any(p.pressure.on for p in self._pipes)
