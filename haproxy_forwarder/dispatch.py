"""Sources → intakes: each connection's events handed to the intake(s) its routes choose.

`Routes` is the route table in force, as sources use it (`SourceContext.inlet`): one inlet
per connection (per sender, for UDP), made once its origin is known. An inlet whose origin
decides the intake (routes by listener, source, certificate) hands each chunk whole to that
intake's collector: one comparison more per chunk than with a single intake, nothing per
message. An origin whose routes depend on the program reads its stream with a SplitReader
(ingest/split.py) and hands each intake its part; the take's acknowledgement (RELP) is split
so that it is given once every part is durable.

A reload replaces the table; each inlet notices at its next take (a version number) and
decides again: a moved source's next events go to its new intake. An inlet whose routes come
to depend on the program (or stop depending on it) changes its reader, at a frame boundary
(its reader holding no partial frame: at once for UDP and RELP, which hand whole messages):
until then its events keep the intake they had, never one the old routes did not name. An
intake the routes no longer lead to still takes the events already on their way to it (it
drains before it closes: intakes.IntakeSet.retire).

Events no route sends to an intake (`drop = true`, or no route matched) are counted as
`unrouted_events{reason}` and settled at once (a RELP sender is answered: they were
received, and the config says not to forward them). The first events of each origin no route
matched are also said in one `events_unrouted` line (listener, source, certificate names):
which sender the route table misses is what the operator must learn, and a counter cannot
say it. Once per origin until the next reload, so a flood of them is one line per sender.
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
from .routing import NO_ROUTE, Decision, Origin, Table, Target, UnroutedReason
from .sources.base import Inlet

# Origins whose unrouted events were said since the last reload: bounded, as senders are
# many behind a NAT or a balancer; once full it starts again (some origins said twice).
SAID_ORIGINS_MAX = 1024


class Unrouted:
    """Where events routed nowhere go: counted, settled, and each origin no route matched
    said once (until the next reload)."""

    def __init__(self, counters: Counters, log: Any) -> None:
        self.counters = counters
        self.log = log
        self.said: set[Origin] = set()

    def take(self, result: ChunkResult, why: UnroutedReason, ack: Ack | None,
             origin: Origin) -> None:
        c = self.counters
        c.filtered_out += result.filtered
        c.invalid_timestamps += result.bad_times
        if result.accepted:
            c.unrouted(result.accepted, why)
            if why == "no_route" and origin not in self.said:
                self._say(origin, result.accepted)
        if ack is not None:
            ack.durable()

    def forget(self) -> None:
        """A new route table: the senders it still misses are said again."""
        self.said.clear()

    def _say(self, origin: Origin, events: int) -> None:
        # A drop route is the config's intent; no route at all is a gap in the table.
        if len(self.said) >= SAID_ORIGINS_MAX:
            self.said.clear()
        self.said.add(origin)
        self.log.warning(
            "events_unrouted", listener=origin.listener, source=origin.source,
            tls_names=list(origin.tls_names), events=events,
            action="no route matches this sender and there is no catch-all route: its events "
                   "are dropped, counted in unrouted_events{reason=\"no_route\"}; add a route "
                   "(haproxy-forwarder check-config prints the table), then reload; said once "
                   "per sender until the next reload")


class Routes:
    """The route table in force and the live intakes it leads to (sources.base.Inlets)."""

    def __init__(self, table: Table, pipelines: Mapping[str, Pipeline], counters: Counters,
                 filt: ProgramFilter, max_message_size: Callable[[], int],
                 reader: Callable[[str], ChunkReader], log: Any,
                 retired: Mapping[str, Pipeline] | None = None) -> None:
        self.table = table
        self.pipelines = pipelines  # the live intakes by name (IntakeSet.live)
        # Intakes a reload removed, still draining (IntakeSet.retired): events already on
        # their way to one (an inlet waiting for a frame boundary) are still delivered.
        self.retired: Mapping[str, Pipeline] = retired if retired is not None else {}
        self.unrouted = Unrouted(counters, log)
        self.filter = filt
        self.max_message_size = max_message_size
        self.reader = reader
        self.clock = Clock()
        self.version = 0
        self.log = log
        # Inlets waiting for a frame boundary to change readers since the last reload.
        self.waiting = 0

    def use(self, table: Table) -> None:
        """A reload's table: every inlet decides again at its next take; a sender it still
        misses is said again."""
        self.table = table
        self.version += 1
        self.waiting = 0
        self.unrouted.forget()

    def inlet(self, origin: Origin, framing: str) -> Inlet:
        decision = self.table.decide(origin)
        splits = decision.fixed is None
        return RoutedInlet(self, origin, framing, self.new_reader(origin, framing, splits),
                           decision, splits=splits)

    def new_reader(self, origin: Origin, framing: str, splits: bool) -> ChunkReader:
        """The compiled reader, or (routes by program) the one that splits by program."""
        if not splits:
            return self.reader(framing)
        return SplitReader(self.filter, self.max_message_size(), framing,
                           self._program_target(origin))

    def wait_for_boundary(self) -> None:
        """An inlet must change readers and holds a partial frame: said once per reload."""
        self.waiting += 1
        if self.waiting == 1:
            self.log.info("routes_switch_pending",
                          reason="new routes change how a connection's events are read "
                                 "(by program or not) and it is in the middle of a frame",
                          action="its events keep their intake until the frame ends")

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

    def deliver(self, target: Target, result: ChunkResult, ack: Ack | None,
                origin: Origin) -> None:
        """One part of `origin`'s events to its intake, or counted as unrouted."""
        pipe = None
        if target.intake is not None:
            pipe = self.pipelines.get(target.intake) or self.retired.get(target.intake)
            if pipe is not None and pipe.closing:
                pipe = None
        if pipe is None:
            self.unrouted.take(result, target.why or "no_route", ack, origin)
        else:
            pipe.collector.take(result, ack)


class RoutedInlet:
    """One connection's inlet (sources.base.Inlet)."""

    __slots__ = ("_fixed", "_pipes", "_version", "decision", "framing", "origin", "reader",
                 "routes", "splits")

    def __init__(self, routes: Routes, origin: Origin, framing: str, reader: ChunkReader,
                 decision: Decision, *, splits: bool) -> None:
        self.routes = routes
        self.origin = origin
        self.framing = framing
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
        """The table changed: decide again; change readers if the new routes read programs
        and this one does not (or the other way round), at a frame boundary only."""
        r = self.routes
        new = r.table.decide(self.origin)
        splits = new.fixed is None
        if splits != self.splits:
            if self.reader.buffered:
                # Mid-frame: what this reader already holds is read as before, to the intake
                # it had; the next take tries again (the version is not taken yet).
                r.wait_for_boundary()
                self._pipes = [p for p in self._pipes if p.name in r.pipelines]
                return
            self.reader = r.new_reader(self.origin, self.framing, splits)
            self.splits = splits
        self._version = r.version
        self._settle(new)

    def take(self, result: ChunkResult, ack: Ack | None = None) -> None:
        reader, fixed = self.reader, self._fixed  # what `result` was read for
        if self._version != self.routes.version:
            self._follow()
            if self.reader is reader:
                fixed = self._fixed
        if isinstance(result, SplitResult):
            parts: list[tuple[Target, ChunkResult]] = result.parts
            if not parts:
                if ack is not None:
                    ack.durable()
                return
            acks = split(ack, len(parts)) if ack is not None else [None] * len(parts)
            for (target, part), one in zip(parts, acks, strict=True):
                self.routes.deliver(target, part, one, self.origin)
            return
        # Read without programs: to the intake the reader read it for (the one of the new
        # routes, unless the reader changed after reading it).
        self.routes.deliver(fixed if fixed is not None else NO_ROUTE, result, ack, self.origin)

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
