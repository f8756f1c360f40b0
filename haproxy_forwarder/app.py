"""The daemon's lifecycle: start, run until a signal (SIGHUP reloads), drain, stop.

The components are built by wiring.build(); what health, readiness and the STATUS= line say
is observability/health.py's; re-queuing dead letters is delivery's.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

from .config import Settings
from .dispatch import Routes
from .intakes import IntakeSet
from .observability.accounting import stats_fields
from .observability.counters import Registry
from .observability.descriptors import loop_error_handler
from .observability.health import Health
from .observability.status import StatusServer
from .reload import reload as reload_config
from .sources import ListenError, ListenerSet, split_hostport
from .sources.listeners import bind_problem, wanted
from .systemd import Notifier, keep_status, keep_watchdog

# Longest wait at shutdown (and for a listener a reload removes) for TCP senders to close
# after our FIN.
TCP_DRAIN_GRACE = 2.0
# Longest time between two refreshes of the systemd STATUS= line (`systemctl status`).
STATUS_INTERVAL = 5.0


class Daemon:
    def __init__(self, settings: Settings, log: Any, registry: Registry, intakes: IntakeSet,
                 routes: Routes, listeners: ListenerSet, *,
                 loader: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self.log = log
        self.registry = registry
        self.counters = registry.counters
        self.intakes = intakes
        self.routes = routes
        self.listeners = listeners
        self.loader = loader
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False
        self.health = Health(
            intakes, listeners, registry,
            stall_after=lambda: self.settings.status.stall_after,
            stopping=self._stop.is_set, spool=not settings.dry_run)
        self.status = (
            StatusServer(*split_hostport(settings.status.listen), registry,
                         self.health.health, log, ready=self.health.ready,
                         live=self.health.live)
            if settings.status.listen else None
        )
        self.notifier = Notifier(log)
        self._supervision: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Delivery first, then every listener (all bound or none: ListenError), then the
        status endpoint; then systemd is told."""
        s = self.settings
        for pipe in self.intakes:
            pipe.start(s)
        opened = await self.listeners.open(self.listeners.build(wanted(s), s))
        self.listeners.add(listener for listener, _, _ in opened)
        bound: list[str] = []
        for listener, host, port in opened:
            self.log.info("listening", proto=listener.kind, host=host, port=port,
                          **listener.describe(s))
            bound.append(f"{listener.kind}://{host}:{port}")
        if self.status is not None:
            st = self.status
            try:
                host, port = await st.start()
            except OSError as exc:
                await self.listeners.drain(self.listeners, 0.0)
                raise ListenError([bind_problem("status.listen", st.host, st.port, exc)]) \
                    from None
            self.log.info("listening", proto="http", host=host, port=port,
                          paths=["/metrics", "/healthz", "/readyz", "/livez"])
            bound.append(f"http://{host}:{port}")
        table = s.intake_table
        for name, cfg in table.items():
            if cfg.insecure_skip_verify and not s.dry_run:
                self.log.warning("intake_tls_verification_disabled", intake=name,
                                 reason="insecure_skip_verify = true",
                                 risk="the intake's certificate is not checked: the key and "
                                      "events can be read on the path",
                                 hint="remove it; use ca_file for a private CA")
        urls = {name: "dry-run (stdout)" if s.dry_run else cfg.endpoint_url
                for name, cfg in table.items()}
        first = next(iter(table.values()))
        self.log.info(
            "started", **self.registry.info, listen=bound,
            intake=next(iter(urls.values())) if len(urls) == 1 else urls,
            endpoint=first.endpoint, gzip=first.gzip, programs=s.filter.programs,
            keep_tag=s.filter.keep_tag, batch_max_events=s.batch.max_events,
            batch_max_bytes=s.batch.max_bytes, batch_max_delay=s.batch.max_delay,
            batch_idle_flush=s.batch.idle_flush, spool_dir=str(s.spool.dir),
            spool_mode=s.spool.mode if not s.dry_run else "off (dry-run)",
            routes=len(s.routes),
        )
        self._supervise()

    def _supervise(self) -> None:
        """Listeners bound, spool recovered: tell systemd, then keep it informed."""
        n = self.notifier
        if not n.enabled:
            return
        n.ready()
        n.status(self.health.status_line())
        every = min(self.settings.log.stats_interval, STATUS_INTERVAL)
        self._supervision = [
            asyncio.create_task(keep_status(n, self.health.status_line, every),
                                name="sd-status"),
            asyncio.create_task(keep_watchdog(n, self.health.stall_reason, self.log),
                                name="sd-watchdog"),
        ]

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.log.stats_interval)
            self.log_stats("stats")

    def log_stats(self, name: str) -> None:
        self.log.info(name, **stats_fields(self.registry.snapshot()))
        if len(self.registry.intakes) > 1:
            # One more line per intake (its own counters and gauges): which one lags.
            for intake in self.registry.intakes:
                self.log.info(f"{name}_intake", intake=intake,
                              **stats_fields(self.registry.intake_snapshot(intake)))

    def request_stop(self, signame: str) -> None:
        if not self._stop.is_set():
            self.log.info("stopping", signal=signame)
            self._stop.set()

    # -- reload (SIGHUP) ------------------------------------------------------------------------

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
            return await reload_config(self, self.loader, TCP_DRAIN_GRACE, self._adopt)
        except Exception:
            # A bug in a reload must not take the daemon down with it.
            self.log.exception("reload_failed", problem="internal error")
            self.counters.reload_failures += 1
            return False
        finally:
            self.notifier.ready()

    def _adopt(self, settings: Settings) -> None:
        """A reload's settings are in force: read from here on (stall_after, intervals...)."""
        self.settings = settings

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        # Not the default action (terminate): `kill -HUP`, as logrotate scripts send, reloads.
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        loop.set_exception_handler(
            loop_error_handler(self.counters, self.listeners.context.quiet, self.log))
        await self.start()
        self._started.set()
        background = [asyncio.create_task(self._stats_loop())]
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
        timeout = self.settings.shutdown_timeout
        if self.notifier.enabled:
            self.notifier.status(f"stopping: delivering what is in memory "
                                 f"(up to {timeout:.0f} s)")
        # The status endpoint stays up until the end: /readyz answers 503 while we drain,
        # /metrics shows the drain.
        # Stop accepting, take in what senders already wrote (half-close, then read until
        # they close), so nothing they consider sent is reset away; RELP senders get the same
        # grace for the answers of what is becoming durable. Then flush.
        await self.listeners.drain(self.listeners, min(TCP_DRAIN_GRACE, timeout))
        await self.intakes.stop_retiring()
        pipes = list(self.intakes)
        removed = list(self.intakes.retired.values())
        in_memory = [p.delivery.in_memory for p in pipes]
        # Every intake drains at once, within the one shutdown_timeout.
        drained = await asyncio.gather(*(p.drain(timeout) for p in pipes))
        stopped = await asyncio.gather(*(p.stop() for p in pipes))
        for pipe, ok, (spooled, lost), held in zip(pipes, drained, stopped, in_memory,
                                                   strict=True):
            if spooled or lost or not ok:
                pipe.log.warning(
                    "shutdown_incomplete",
                    reason=f"not delivered within shutdown_timeout={timeout}s",
                    spooled_events=spooled, dropped_events=lost,
                    in_memory_batches_at_stop=held,
                    hint="spooled events are delivered at the next start",
                )
            if lost:
                pipe.log.error("shutdown_dropped", events=lost)
        for pipe in removed:
            # A reload removed it before it could deliver everything: kept, never dropped.
            pipe.log.warning("removed_intake_events_kept", events=pipe.kept_events,
                             spool_dir=str(pipe.folder),
                             hint=f"add [intakes.{pipe.name}] back to deliver them")
        if self.status is not None:
            await self.status.stop()
        self.log_stats("stopped")
