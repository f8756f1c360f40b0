"""Every component of the daemon built in dependency order, and the gauges that watch them.

sources → collector (batches) → delivery (router, workers, spool writer) → sink; the spool and
dead letters beside delivery; the registry and the status endpoint watching all of it.
`build()` opens (and recovers) the spool and starts nothing: app.Daemon does that.
"""

from __future__ import annotations

import contextlib
import functools
import resource
import time
from collections.abc import Callable
from typing import Any

from .app import Daemon
from .batching import Batcher
from .buildinfo import build_info
from .collector import Collector
from .config import Settings
from .delivery import Backoff, Delivery
from .ingest import ProgramFilter
from .observability.counters import Registry
from .sinks import make_sink
from .sinks.deadletter import DeadLetters
from .sources import Backpressure, ListenerSet, SourceContext
from .spool import Spool

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


def open_spool(settings: Settings, registry: Registry, log: Any) -> Spool | None:
    """The disk spool, recovered; none in dry-run, where stdout never fails."""
    s = settings.spool
    if settings.intake.dry_run:
        return None
    spool = Spool(s.dir, max_size=s.max_size, when_full=s.when_full,
                  segment_size=s.segment_size, counters=registry.counters.spool)
    report = spool.open()
    st = spool.stats()
    fields = {**report.as_dict(), "batches": st["batches"], "events": st["events"]}
    if report.quarantined:
        log.error("spool_recovered_with_corruption", **fields,
                  quarantine=str(s.dir / "quarantine"))
    elif report.truncated:
        log.warning("spool_recovered_torn_tail", **fields)
    else:
        log.info("spool_opened", **fields)
    return spool


def held_events(collector: Collector, delivery: Delivery,
                spool: Spool | None) -> dict[str, int]:
    """The `held` term of the accounting identity (observability/accounting.py), by where."""
    memory = len(collector.batcher.current) + sum(
        len(e.batch) for e in delivery.router.memory_only())
    return {"memory": memory, "spool": spool.pending_events if spool is not None else 0}


def _spool_gauge(spool: Spool, name: str) -> float:
    return float(spool.stats()[name])


def _last_delivery_time(registry: Registry, delivery: Delivery) -> float:
    """Unix time of the last accepted request; 0 before the first (last_progress starts at
    the daemon's start, which is no delivery)."""
    if not registry.counters.delivered_batches:
        return 0.0
    return time.time() - (time.monotonic() - delivery.last_progress)


def register_gauges(registry: Registry, collector: Collector, delivery: Delivery,
                    spool: Spool | None, listeners: ListenerSet,
                    pressure: Backpressure) -> None:
    """The gauges, each read at scrape time (a reload changes the listeners)."""
    g = registry.gauge
    d = delivery
    ctx = listeners.context
    registry.labelled_gauge("connections_open", "listener", listeners.connections)
    registry.labelled_gauge("listener_up", "listener", listeners.up)
    registry.labelled_gauge("events_held", "where",
                            functools.partial(held_events, collector, delivery, spool))
    g("in_memory_batches", lambda: d.in_memory)
    # Dead-letter files given back by `spool replay-dead-letter` still to go, and how long
    # since one moved (the requeue stalls when the spool has no room for them).
    g("requeue_files", lambda: d.requeue_files)
    g("requeue_idle_seconds", d.requeue_idle_seconds)
    g("buffered_bytes", lambda: ctx.budget.total)
    # RELP messages received, not yet durable, hence not yet acknowledged to their sender.
    g("acks_pending", lambda: collector.acks_pending)
    g("tls_handshakes_in_progress", lambda: ctx.server_tls.handshaking)
    g("backlog_batches", lambda: d.backlog)
    g("paused", lambda: pressure.on)
    g("intake_failing", lambda: d.failing)
    g("seconds_since_last_delivery", lambda: time.monotonic() - d.last_progress)
    g("last_delivery_timestamp_seconds", functools.partial(_last_delivery_time, registry, d))
    if spool is not None:
        for name in ("batches", "events", "bytes", "oldest_age_seconds", "segments"):
            g(f"spool_{name}", functools.partial(_spool_gauge, spool, name))
        # Beside spool_bytes: how full it is (the SpoolFillingUp alert).
        g("spool_max_bytes", functools.partial(_spool_gauge, spool, "max_size"))
        g("spool_blocked", lambda: d.spool_blocked)


def _pressure_logger(log: Any, delivery: Delivery) -> Callable[[bool], None]:
    def changed(on: bool) -> None:
        if on:
            log.warning("backpressure_on",
                        action="TCP listeners stop reading; UDP dropped and counted",
                        in_memory_batches=delivery.in_memory)
        else:
            log.info("backpressure_off")
    return changed


def build(settings: Settings, log: Any,
          loader: Callable[[], Settings] | None = None) -> Daemon:
    """Every component, in dependency order. Opens (and recovers) the spool; starts nothing.

    `loader` reads the config again as at start-up (same file, same overrides): SIGHUP."""
    check_fd_limit(settings, log)
    registry = Registry(build_info())
    counters = registry.counters
    spool = open_spool(settings, registry, log)
    pressure = Backpressure()
    s = settings
    delivery = Delivery(
        make_sink(s.intake), spool,
        DeadLetters(s.spool.dir, s.spool.dead_letter_max_size), counters, log,
        workers=s.intake.concurrency,
        backoff=Backoff(s.intake.retry_max, s.intake.auth_retry),
        max_in_flight=s.batch.max_in_flight,
        write_ahead=s.spool.mode == "always",
        on_pressure=pressure.set,
    )
    collector = Collector(Batcher(s.batch.max_events, s.batch.max_bytes), delivery, counters,
                          s.batch.max_delay, s.batch.idle_flush)
    ctx = SourceContext(collector, counters, log,
                        ProgramFilter(s.filter.programs, s.filter.keep_tag), pressure,
                        s.listen.max_message_size)
    if s.tls_needed:
        # One for every TLS listener (RELP's with relp.tls too): certificate, handshake cap.
        ctx.server_tls.load(s.tls)  # validated with the config: it does not fail here
    listeners = ListenerSet(ctx)
    pressure.subscribe(_pressure_logger(log, delivery))
    register_gauges(registry, collector, delivery, spool, listeners, pressure)
    return Daemon(settings, log, registry, spool, delivery, collector, listeners,
                  loader=loader)
