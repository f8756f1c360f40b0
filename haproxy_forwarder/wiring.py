"""Every component of the daemon built in dependency order, and the gauges that watch them.

sources → routes → per intake: collector (batches) → delivery (router, workers, spool writer)
→ sink, its spool and dead letters beside; the registry and the status endpoint watching all
of it. `build()` opens (and recovers) the spools and starts nothing: app.Daemon does that.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import time
from collections.abc import Callable, Iterable
from typing import Any

from .app import Daemon
from .buildinfo import build_info
from .config import DEFAULT_INTAKE, Settings
from .dispatch import Routes
from .ingest import ProgramFilter
from .intakes import INTAKES_DIR, IntakeSet, Pipeline
from .observability.counters import Registry
from .routing import Table
from .sources import Backpressure, ListenerSet, SourceContext

# Descriptors needed beside the TCP connections: listeners, spool, HTTPS, logs.
FD_MARGIN = 64


def check_fd_limit(settings: Settings, log: Any) -> None:
    """Each TCP connection is a file descriptor: make sure max_connections fits.

    Out of descriptors, accept() fails quietly and senders wait in the kernel backlog;
    better to raise the soft limit, or say at start-up that it is too low.
    """
    need = settings.listen.max_connections + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        log.warning(
            "fd_limit_low", nofile=soft, max_connections=settings.listen.max_connections,
            hint="raise LimitNOFILE (systemd) / ulimit -n, or lower listen.max_connections",
        )


def _unconfigured_spools(settings: Settings, log: Any) -> None:
    """Spool directories of intakes the config no longer names: said at start, never read
    (their events wait there until the intake is configured again)."""
    root = settings.spool.dir / INTAKES_DIR
    names = set(settings.intake_table)
    orphans = [p for p in sorted(root.iterdir()) if p.is_dir() and p.name not in names] \
        if root.is_dir() else []
    if DEFAULT_INTAKE not in names and (settings.spool.dir / "segments").is_dir():
        orphans.insert(0, settings.spool.dir)
    for folder in orphans:
        log.warning("spool_of_unconfigured_intake", spool_dir=str(folder),
                    hint="its events stay there: configure that intake again to deliver them")


def register_gauges(registry: Registry, intakes: IntakeSet, listeners: ListenerSet,
                    pressure: Backpressure, spool: bool = True) -> None:
    """The gauges, each read at scrape time (a reload changes the listeners and intakes);
    those of delivery and the spool per intake (label `intake`)."""
    g = registry.gauge
    ctx = listeners.context
    registry.labelled_gauge("connections_open", "listener", listeners.connections)
    registry.labelled_gauge("listener_up", "listener", listeners.up)
    registry.labelled_gauge("events_held", ("intake", "where"),
                            functools.partial(_held, intakes))

    def per_intake(name: str, read: Callable[[Pipeline], float],
                   combine: Callable[[Iterable[float]], float] = sum) -> None:
        registry.labelled_gauge(name, "intake", functools.partial(_each, intakes, read),
                                combine=combine)

    per_intake("in_memory_batches", lambda p: p.delivery.in_memory)
    # Dead letters given back by `spool replay-dead-letter` still to go, and how long since
    # one moved (the requeue stalls when the spool has no room for them).
    per_intake("requeue_files", lambda p: p.delivery.requeue_files)
    per_intake("requeue_idle_seconds", lambda p: p.delivery.requeue_idle_seconds(), max)
    g("buffered_bytes", lambda: ctx.budget.total)
    # RELP messages received, not yet durable, hence not yet acknowledged to their sender.
    per_intake("acks_pending", lambda p: p.collector.acks_pending)
    g("tls_handshakes_in_progress", lambda: ctx.server_tls.handshaking)
    per_intake("backlog_batches", lambda p: p.delivery.backlog)
    g("paused", lambda: pressure.on)
    per_intake("intake_paused", lambda p: p.pressure.on, max)
    per_intake("intake_failing", lambda p: p.delivery.failing, max)
    per_intake("seconds_since_last_delivery",
               lambda p: time.monotonic() - p.delivery.last_progress, max)
    per_intake("last_delivery_timestamp_seconds", _last_delivery_time, max)
    if not spool:
        return  # dry-run: no spool, no spool gauges
    for name in ("batches", "events", "bytes", "oldest_age_seconds", "segments"):
        per_intake(f"spool_{name}", functools.partial(_spool_gauge, name),
                   max if name == "oldest_age_seconds" else sum)
    # Beside spool_bytes: how full it is (the SpoolFillingUp alert).
    per_intake("spool_max_bytes", functools.partial(_spool_gauge, "max_size"))
    per_intake("spool_blocked", lambda p: p.delivery.spool_blocked, max)


def _held(intakes: IntakeSet) -> dict[tuple[str, str], float]:
    """The `held` term of the accounting identity (observability/accounting.py), by intake
    and where."""
    out: dict[tuple[str, str], float] = {}
    for p in intakes:
        for where, n in p.held_events().items():
            # A name both live and retired (added back while its old pipeline drains): both.
            out[(p.name, where)] = out.get((p.name, where), 0.0) + n
    return out


def _each(intakes: IntakeSet, read: Callable[[Pipeline], float]) -> dict[str, float]:
    """{intake: value} over every pipeline (a live and a retired one of one name: added)."""
    out: dict[str, float] = {}
    for p in intakes:
        out[p.name] = out.get(p.name, 0.0) + float(read(p))
    return out


def _spool_gauge(name: str, pipe: Pipeline) -> float:
    return float(pipe.spool.stats()[name]) if pipe.spool is not None else 0.0


def _last_delivery_time(pipe: Pipeline) -> float:
    """Unix time of the intake's last accepted request; 0 before the first (last_progress
    starts at the daemon's start, which is no delivery)."""
    if not pipe.counters.delivered_batches:
        return 0.0
    return time.time() - (time.monotonic() - pipe.delivery.last_progress)


def build(settings: Settings, log: Any,
          loader: Callable[[], Settings] | None = None) -> Daemon:
    """Every component, in dependency order. Opens (and recovers) the spools; starts nothing.

    `loader` reads the config again as at start-up (same file, same overrides): SIGHUP."""
    check_fd_limit(settings, log)
    registry = Registry(build_info())
    counters = registry.counters
    pressure = Backpressure()
    s = settings
    intakes = IntakeSet(registry, log, pressure)
    try:
        for name in s.intake_table:
            intakes.add(intakes.build(s, name))
    except BaseException:
        for pipe in intakes:
            if pipe.spool is not None:
                pipe.spool.close()
        raise
    _unconfigured_spools(s, log)
    filt = ProgramFilter(s.filter.programs, s.filter.keep_tag)
    first = next(iter(intakes.live.values()))
    # `sink` is what a source without routes would use; here every source goes through
    # `routes` (SourceContext.inlet), so it is never called.
    ctx = SourceContext(first.collector, counters, log, filt, pressure,
                        s.listen.max_message_size)
    ctx.routes = Routes(Table(s.route_list), intakes.live, counters, filt,
                        lambda: ctx.max_message_size, ctx.reader, log, intakes.retired)
    if s.tls_needed:
        # One for every TLS listener (RELP's with relp.tls too): certificate, handshake cap.
        ctx.server_tls.load(s.tls)  # validated with the config: it does not fail here
    listeners = ListenerSet(ctx)
    register_gauges(registry, intakes, listeners, pressure, spool=not s.dry_run)
    return Daemon(settings, log, registry, intakes, ctx.routes, listeners, loader=loader)
