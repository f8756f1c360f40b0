"""The daemon: every component built in `build()`, then started, run until a signal, drained.

sources → collector (batches) → delivery (router, workers, spool writer) → sink; the spool and
dead letters beside delivery; the registry and the status endpoint watching all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import resource
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .batching import Batcher
from .buildinfo import build_info
from .collector import Collector
from .config import Settings
from .delivery import Backoff, Delivery
from .ingest import ProgramFilter
from .observability.accounting import balance
from .observability.counters import Registry
from .observability.descriptors import OUT_OF_DESCRIPTORS, Descriptors
from .observability.status import StatusServer
from .reload import reload as reload_config
from .sinks import make_sink
from .sinks.deadletter import DeadLetters
from .sources import (
    Backpressure,
    RelpSource,
    SourceContext,
    TcpSource,
    TlsSource,
    UdpSource,
    split_hostport,
)
from .spool import Spool
from .systemd import Notifier, keep_status, keep_watchdog
from .tlscontext import ServerTls, tls_needed

# Descriptors needed beside the TCP connections: listeners, spool, HTTPS, logs.
FD_MARGIN = 64
# Longest wait at shutdown for TCP senders to close after our FIN.
TCP_DRAIN_GRACE = 2.0
# Longest time between two refreshes of the systemd STATUS= line (`systemctl status`).
STATUS_INTERVAL = 5.0


class ListenError(Exception):
    """An address of the config cannot be bound (in use, not on this host, no such name): a
    configuration problem (exit 2), told in one line naming the setting and the address."""


async def _bind(setting: str, host: str, port: int,
                start: Coroutine[Any, Any, tuple[str, int]]) -> tuple[str, int]:
    try:
        return await start
    except OSError as exc:
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # uvloop wraps the errno text in a sentence of its own, or gives none (UDP).
        err = exc.__cause__ if not exc.errno and isinstance(exc.__cause__, OSError) else exc
        reason = (os.strerror(err.errno) if err.errno and err.errno > 0
                  else err.strerror or str(err))
        raise ListenError(f"cannot bind {setting} {address}: {reason}") from None


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


def stall_reason(delivery: Delivery, stall_after: float) -> str | None:
    """Why delivery counts as stalled, or None: batches wait and nothing went out for a while.

    The one rule behind /healthz failing and the systemd watchdog pings stopping.
    """
    backlog = delivery.backlog
    idle = time.monotonic() - delivery.last_progress
    if backlog and idle > stall_after:
        return f"{backlog} batches waiting and nothing delivered for {idle:.0f} s"
    return None


def _spool_gauge(spool: Spool, name: str) -> float:
    return float(spool.stats()[name])


def held_events(collector: Collector, delivery: Delivery,
                spool: Spool | None) -> dict[str, int]:
    """The `held` term of the accounting identity (observability/accounting.py), by where."""
    memory = len(collector.batcher.current) + sum(
        len(e.batch) for e in delivery.router.memory_only())
    return {"memory": memory, "spool": spool.pending_events if spool is not None else 0}


def tcp_source(ctx: SourceContext, address: str, s: Settings) -> TcpSource:
    return TcpSource(ctx, *split_hostport(address), s.listen)


def tls_source(ctx: SourceContext, address: str, s: Settings,
               server_tls: ServerTls) -> TlsSource:
    return TlsSource(ctx, *split_hostport(address), s.listen, server_tls)


def relp_source(ctx: SourceContext, address: str, s: Settings,
                server_tls: ServerTls) -> RelpSource:
    # relp.tls is restart-only: a reload's `s` keeps the running value, so listeners added by
    # SIGHUP speak what the ones started with do.
    return RelpSource(ctx, *split_hostport(address), s.listen, s.relp,
                      server_tls if s.relp.tls else None)


def udp_source(ctx: SourceContext, address: str, s: Settings) -> UdpSource:
    return UdpSource(ctx, *split_hostport(address), s.listen.allow, s.listen.udp_rcvbuf)


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
    tcp = [tcp_source(ctx, a, s) for a in s.listen.tcp]
    udp = [udp_source(ctx, a, s) for a in s.listen.udp]
    # One for every TLS listener (RELP's with relp.tls too): certificate, handshake cap.
    server_tls = ServerTls()
    if tls_needed(s):
        server_tls.load(s.tls)  # validated with the config: it does not fail here
    tls = [tls_source(ctx, a, s, server_tls) for a in s.listen.tls]
    relp = [relp_source(ctx, a, s, server_tls) for a in s.listen.relp]
    return Daemon(settings, log, registry, spool, pressure, delivery, collector, tcp, udp,
                  ctx=ctx, loader=loader, tls=tls, server_tls=server_tls, relp=relp)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        log: Any,
        registry: Registry,
        spool: Spool | None,
        pressure: Backpressure,
        delivery: Delivery,
        collector: Collector,
        tcp: list[TcpSource],
        udp: list[UdpSource],
        *,
        ctx: SourceContext,
        loader: Callable[[], Settings] | None = None,
        tls: list[TlsSource] | None = None,
        server_tls: ServerTls | None = None,
        relp: list[RelpSource] | None = None,
    ) -> None:
        self.settings = settings
        self.tls: list[TlsSource] = tls or []
        self.relp: list[RelpSource] = relp or []
        self.server_tls = server_tls or ServerTls()
        self.ctx = ctx
        self.loader = loader
        self.log = log
        self.registry = registry
        self.counters = registry.counters
        self.spool = spool
        self.pressure = pressure
        self.delivery = delivery
        self.collector = collector
        self.tcp = tcp
        self.udp = udp
        self.status = (
            StatusServer(*split_hostport(settings.status.listen), registry, self.health, log,
                         ready=self.ready)
            if settings.status.listen else None
        )
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self.notifier = Notifier(log)
        self._supervision: list[asyncio.Task[None]] = []
        # (monotonic time, accepted, delivered) at the last STATUS= line: its rates.
        self._status_mark = (time.monotonic(), 0, 0)
        pressure.subscribe(self._log_pressure)
        self._register_gauges()

    def _register_gauges(self) -> None:
        g = self.registry.gauge
        d = self.delivery
        # Per listener, read from self.tcp / self.udp at each scrape (a reload changes them).
        self.registry.labelled_gauge(
            "connections_open", "listener",
            lambda: {**{t.name: len(t.connections) for t in (*self.tcp, *self.tls)},
                     **{r.name: len(r.connections) for r in self.relp}})
        self.registry.labelled_gauge(
            "listener_up", "listener",
            lambda: {s.name: float(s.listening) for s in self._listeners()})
        self.registry.labelled_gauge(
            "events_held", "where",
            lambda: held_events(self.collector, self.delivery, self.spool))
        g("in_memory_batches", lambda: d.in_memory)
        # Dead-letter files given back by `spool replay-dead-letter` still to go, and how long
        # since one moved (the requeue stalls when the spool has no room for them).
        g("requeue_files", lambda: d.requeue_files)
        g("requeue_idle_seconds", d.requeue_idle_seconds)
        g("buffered_bytes", lambda: self.ctx.budget.total)
        # RELP messages received, not yet durable, hence not yet acknowledged to their sender.
        g("acks_pending", lambda: self.collector.acks_pending)
        g("tls_handshakes_in_progress", lambda: self.server_tls.handshaking)
        g("backlog_batches", lambda: d.backlog)
        g("paused", lambda: self.pressure.on)
        g("intake_failing", lambda: d.failing)
        g("seconds_since_last_delivery", lambda: time.monotonic() - d.last_progress)
        g("last_delivery_timestamp_seconds", self._last_delivery_time)
        spool = self.spool
        if spool is not None:
            for name in ("batches", "events", "bytes", "oldest_age_seconds", "segments"):
                g(f"spool_{name}", functools.partial(_spool_gauge, spool, name))
            # Beside spool_bytes: how full it is (the SpoolFillingUp alert).
            g("spool_max_bytes", functools.partial(_spool_gauge, spool, "max_size"))
            g("spool_blocked", lambda: d.spool_blocked)

    def _last_delivery_time(self) -> float:
        """Unix time of the last accepted request; 0 before the first (last_progress starts at
        the daemon's start, which is no delivery)."""
        if not self.counters.delivered_batches:
            return 0.0
        return time.time() - (time.monotonic() - self.delivery.last_progress)

    def _log_pressure(self, on: bool) -> None:
        if on:
            self.log.warning(
                "backpressure_on", action="TCP listeners stop reading; UDP dropped and counted",
                in_memory_batches=self.delivery.in_memory,
            )
        else:
            self.log.info("backpressure_off")

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.delivery.start()
        bound: list[str] = []
        for tcp in self.tcp:
            h, p = await _bind("listen.tcp", tcp.host, tcp.port, tcp.start())
            self.log.info("listening", proto="tcp", host=h, port=p)
            bound.append(f"tcp://{h}:{p}")
        for t in self.tls:
            h, p = await _bind("listen.tls", t.host, t.port, t.start())
            self.log.info("listening", proto="tls", host=h, port=p,
                          client_certificates=self.settings.tls.client_ca_file is not None)
            bound.append(f"tls://{h}:{p}")
        for r in self.relp:
            h, p = await _bind("listen.relp", r.host, r.port, r.start())
            self.log.info("listening", proto="relp", host=h, port=p,
                          max_window=s.relp.max_window, tls=r.tls,
                          **({"client_certificates": s.tls.client_ca_file is not None}
                             if r.tls else {}))
            bound.append(f"relp://{h}:{p}")
        for udp in self.udp:
            h, p = await _bind("listen.udp", udp.host, udp.port, udp.start())
            self.log.info("listening", proto="udp", host=h, port=p)
            bound.append(f"udp://{h}:{p}")
        if self.status is not None:
            st = self.status
            h, p = await _bind("status.listen", st.host, st.port, st.start())
            self.log.info("listening", proto="http", host=h, port=p,
                          paths=["/metrics", "/healthz", "/readyz"])
            bound.append(f"http://{h}:{p}")
        if s.intake.insecure_skip_verify and not s.intake.dry_run:
            self.log.warning("intake_tls_verification_disabled",
                             reason="intake.insecure_skip_verify = true",
                             risk="the intake's certificate is not checked: the key and events "
                                  "can be read on the path",
                             hint="remove it; use intake.ca_file for a private CA")
        self.log.info(
            "started",
            **self.registry.info,
            listen=bound,
            intake=("dry-run (stdout)" if s.intake.dry_run else s.intake.endpoint_url),
            endpoint=s.intake.endpoint,
            gzip=s.intake.gzip,
            programs=s.filter.programs,
            keep_tag=s.filter.keep_tag,
            batch_max_events=s.batch.max_events,
            batch_max_bytes=s.batch.max_bytes,
            batch_max_delay=s.batch.max_delay,
            batch_idle_flush=s.batch.idle_flush,
            spool_dir=str(s.spool.dir),
            spool_mode=s.spool.mode if self.spool else "off (dry-run)",
        )
        self._supervise()

    def _supervise(self) -> None:
        """Listeners bound, spool recovered: tell systemd, then keep it informed."""
        n = self.notifier
        if not n.enabled:
            return
        n.ready()
        n.status(self.status_line())
        every = min(self.settings.log.stats_interval, STATUS_INTERVAL)
        self._supervision = [
            asyncio.create_task(keep_status(n, self.status_line, every), name="sd-status"),
            asyncio.create_task(keep_watchdog(n, self.stall_reason, self.log), name="sd-watchdog"),
        ]

    def status_line(self) -> str:
        """The STATUS= summary: rates since the previous line, what waits, the last delivery."""
        now = time.monotonic()
        c = self.counters
        then, accepted, delivered = self._status_mark
        self._status_mark = (now, c.accepted_events, c.delivered_events)
        span = max(now - then, 1e-3)
        d = self.delivery
        spooled = (f"spool {self.spool.stats()['events']} events" if self.spool is not None
                   else "no spool (dry-run)")
        line = (f"in {(c.accepted_events - accepted) / span:.0f} events/s, "
                f"out {(c.delivered_events - delivered) / span:.0f} events/s, "
                f"backlog {d.backlog} batches, {spooled}, "
                f"last delivery {now - d.last_progress:.0f} s ago")
        if d.failing:
            line += ", intake failing"
        stalled = self.stall_reason()
        return f"STALLED: {stalled}; {line}" if stalled else line

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.log.stats_interval)
            self.log_stats("stats")

    def log_stats(self, name: str) -> None:
        snap: dict[str, Any] = self.registry.snapshot()
        # The identity's terms on every stats line: in = out + held, `events_unaccounted` 0
        # at rest (observability/accounting.py).
        snap.update(balance(snap))
        for flag in ("paused", "intake_failing", "spool_blocked"):
            if flag in snap:
                snap[flag] = bool(snap[flag])
        self.log.info(name, **snap)

    def stall_reason(self) -> str | None:
        return stall_reason(self.delivery, self.settings.status.stall_after)

    def health(self) -> tuple[bool, dict[str, Any]]:
        d = self.delivery
        backlog = d.backlog
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
        if not self._stop.is_set():  # at shutdown they close on purpose
            reasons += [f"listener {s.name} is down (closed, not by us)"
                        for s in self._listeners() if s.down]
        return not reasons, {
            "status": "ok" if not reasons else "failing",
            "reasons": reasons,
            "intake_failing": d.failing,
            "backlog_batches": backlog,
            "seconds_since_last_delivery": round(idle, 1),
        }

    def _listeners(self) -> list[TcpSource | UdpSource | RelpSource]:
        return [*self.tcp, *self.tls, *self.relp, *self.udp]

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """/readyz: every listener bound and the spool recovered (build() recovers it before
        anything starts); not ready from the moment shutdown begins."""
        reasons: list[str] = []
        if self._stop.is_set():
            reasons.append("shutting down")
        reasons += [f"listener {s.name} is not bound" for s in self._listeners()
                    if not s.listening]
        return not reasons, {"status": "ready" if not reasons else "not ready",
                             "reasons": reasons}

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Errors asyncio would print as bare text (e.g. accept() out of file descriptors)
        # become log lines like every other, so they are seen and grepped for.
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in OUT_OF_DESCRIPTORS:
            # accept() out of descriptors (the asyncio loop retries each second): counted,
            # one line per few seconds.
            Descriptors(self.counters, self.ctx.quiet).exhausted(
                reason=os.strerror(exc.errno), action="accept retried in 1 s")
            return
        self.log.error("event_loop_error", message=context.get("message", ""),
                       error=repr(exc) if exc else None)

    def request_stop(self, signame: str) -> None:
        if not self._stop.is_set():
            self.log.info("stopping", signal=signame)
            self._stop.set()

    # -- reload (SIGHUP) ------------------------------------------------------------------------

    def new_tcp(self, address: str, settings: Settings) -> TcpSource:
        return tcp_source(self.ctx, address, settings)

    def new_tls(self, address: str, settings: Settings) -> TlsSource:
        return tls_source(self.ctx, address, settings, self.server_tls)

    def new_relp(self, address: str, settings: Settings) -> RelpSource:
        return relp_source(self.ctx, address, settings, self.server_tls)

    def new_udp(self, address: str, settings: Settings) -> UdpSource:
        return udp_source(self.ctx, address, settings)

    def request_reload(self) -> None:
        """SIGHUP: one reload at a time; a SIGHUP during one runs one more after it."""
        if self._stop.is_set():
            self.log.warning("reload_ignored", reason="stopping")
            return
        self._reload_again = True
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.create_task(self._reloads(), name="reload")

    async def _reloads(self) -> None:
        await self._started.wait()  # a SIGHUP during start-up waits for it
        while self._reload_again and not self._stop.is_set():
            self._reload_again = False
            await self.reload()

    async def reload(self) -> bool:
        """Read the config again and apply it; an invalid one is refused and the old stays."""
        self.notifier.reloading()
        try:
            return await reload_config(self, self.loader)
        except Exception:
            # A bug in a reload must not take the daemon down with it.
            self.log.exception("reload_failed", problem="internal error")
            self.counters.reload_failures += 1
            return False
        finally:
            self.notifier.ready()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        # Not the default action (terminate): `kill -HUP`, as logrotate scripts send, reloads.
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        loop.set_exception_handler(self._loop_error)
        await self.start()
        self._started.set()
        background = [asyncio.create_task(self._stats_loop())]
        s = self.settings
        # Dead letters an operator re-queued (`spool replay-dead-letter`); none in dry-run.
        self.delivery.start_requeue(s.spool.dir / "requeue", s.batch.max_events,
                                    s.batch.max_bytes, s.status.stall_after)
        await self._stop.wait()
        for task in background:
            task.cancel()
        if self._reload_task is not None:
            # Half-applied is no state to stop in: a reload under way finishes (it is short).
            await self._reload_task
        await self.shutdown()

    async def shutdown(self) -> None:
        self.notifier.stopping()
        for task in self._supervision:
            task.cancel()
        if self.notifier.enabled:
            self.notifier.status(f"stopping: delivering what is in memory "
                                 f"(up to {self.settings.shutdown_timeout:.0f} s)")
        # The status endpoint stays up until the end: /readyz answers 503 while we drain,
        # /metrics shows the drain.
        # Stop accepting, take in what senders already wrote (half-close, then read until
        # they close), so nothing they consider sent is reset away; then flush.
        grace = min(TCP_DRAIN_GRACE, self.settings.shutdown_timeout)
        # RELP senders get the same grace for the answers of what is becoming durable.
        await asyncio.gather(*(src.stop(grace) for src in (*self.tcp, *self.tls)),
                             *(r.stop(grace) for r in self.relp))
        for u in self.udp:
            await u.stop()
        self.collector.flush()
        timeout = self.settings.shutdown_timeout
        in_memory = self.delivery.in_memory
        drained = await self.delivery.drain(timeout)
        spooled, lost = await self.delivery.stop()
        if self.spool is not None:
            self.spool.close()
        if spooled or lost or not drained:
            self.log.warning(
                "shutdown_incomplete",
                reason=f"not delivered within shutdown_timeout={timeout}s",
                spooled_events=spooled,
                dropped_events=lost,
                in_memory_batches_at_stop=in_memory,
                hint="spooled events are delivered at the next start",
            )
        if lost:
            self.log.error("shutdown_dropped", events=lost)
        if self.status is not None:
            await self.status.stop()
        self.log_stats("stopped")
