"""Wiring: listeners → header reader → program filter → batcher → delivery; start and stop.

`ingest` is the per-message hot path: keep it to byte scanning and list appends.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import time
from pathlib import Path
from typing import Any

from . import __version__
from .batching import Batch, Batcher
from .config import MAX_EVENT_BYTES, Settings
from .deadletter import DeadLetters, read_dead_letters
from .delivery import Backoff, Delivery, DryRunSink, IntakeSink, Sink
from .intake import IntakeClient
from .listeners import TcpListener, UdpListener
from .metrics import Counters
from .spool import Spool, SpoolError
from .status import StatusServer
from .syslog.header import event_text, read_header

HAPEE = b"hapee"
OVERSIZED_REASON = f"event over 250 KiB ({MAX_EVENT_BYTES} bytes), the intake limit"
# Descriptors needed beside the TCP connections: listeners, spool, HTTPS, logs.
FD_MARGIN = 64
# Longest wait at shutdown for TCP senders to close after our FIN.
TCP_DRAIN_GRACE = 2.0
# How often the daemon looks for dead letters an operator re-queued.
REQUEUE_INTERVAL = 2.0


class _Clock:
    """Reception time as the intake wants it (UTC, milliseconds), formatted once per ms."""

    __slots__ = ("_ms", "_text")

    def __init__(self) -> None:
        self._ms = -1
        self._text = ""

    def now(self) -> str:
        t = time.time()
        ms = int(t * 1000)
        if ms != self._ms:
            self._ms = ms
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms % 1000:03d}Z"
        return self._text


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class Pipeline:
    def __init__(self, settings: Settings, log: Any) -> None:
        self.settings = settings
        self.log = log
        self.counters = Counters()
        self.paused = False
        self.prefixes = tuple(p.encode() for p in settings.filter.programs)
        self.batcher = Batcher(settings.batch.max_events, settings.batch.max_bytes)
        self.clock = _Clock()
        self.dead = DeadLetters(settings.spool.dir, settings.spool.dead_letter_max_size)
        self.spool: Spool | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.tcp: list[TcpListener] = []
        self.udp: list[UdpListener] = []
        self.delivery: Delivery | None = None
        self.status: StatusServer | None = None
        self._stop = asyncio.Event()

    # -- hot path ---------------------------------------------------------------------------

    def ingest(self, frames: list[bytes]) -> None:
        received_at = self.clock.now()
        prefixes = self.prefixes
        add = self.batcher.add
        accepted = 0
        for frame in frames:
            h = read_header(frame)
            # startswith with a span: no slice, no object for messages we drop.
            if not frame.startswith(prefixes, h.prog_start, h.prog_end):
                continue
            accepted += 1
            keep_tag = frame.startswith(HAPEE, h.prog_start, h.prog_end)
            event = event_text(frame, h, keep_tag)
            size = len(frame) - h.msg_start
            ts = frame[h.ts_start : h.ts_end].decode("ascii") if h.ts_zoned else received_at
            # Decoding can at most triple the size (U+FFFD), so most events skip the encode.
            if size * 3 > MAX_EVENT_BYTES and len(event.encode("utf-8")) > MAX_EVENT_BYTES:
                self._oversized_event(event, ts)
                continue
            full = add(event, ts, size)
            if full is not None:
                self._submit(full)
        c = self.counters
        c.received_frames += len(frames)
        c.accepted_events += accepted
        c.filtered_out += len(frames) - accepted
        if self._timer is None and self.batcher.current.events:
            self._timer = asyncio.get_running_loop().call_later(
                self.settings.batch.max_delay, self._on_timer
            )

    # -- batches and backpressure -------------------------------------------------------------

    def _oversized_event(self, event: str, timestamp: str) -> None:
        assert self.delivery is not None
        self.delivery.write_dead(Batch([event], [timestamp]), OVERSIZED_REASON)

    def _on_timer(self) -> None:
        self._timer = None
        full = self.batcher.take()
        if full is not None:
            self._submit(full)

    def _submit(self, batch: Batch) -> None:
        assert self.delivery is not None
        self.delivery.submit(batch)

    def _on_pressure(self, on: bool) -> None:
        """Backpressure: TCP listeners stop reading, so senders queue on their side."""
        self.paused = on
        for lst in self.tcp:
            if on:
                lst.pause()
            else:
                lst.resume()
        if on:
            self.log.warning(
                "backpressure_on", action="TCP listeners stop reading; UDP dropped and counted",
                in_memory_batches=self.delivery.in_memory if self.delivery else 0,
            )
        else:
            self.log.info("backpressure_off")

    # -- lifecycle ------------------------------------------------------------------------------

    def _make_sink(self) -> Sink:
        cfg = self.settings.intake
        if cfg.dry_run:
            return DryRunSink()
        return IntakeSink(IntakeClient(cfg), cfg.endpoint, cfg.gzip)

    def _open_spool(self) -> Spool | None:
        """The disk spool; none in dry-run, where stdout never fails."""
        s = self.settings.spool
        if self.settings.intake.dry_run:
            return None
        spool = Spool(s.dir, max_size=s.max_size, when_full=s.when_full,
                      segment_size=s.segment_size)
        report = spool.open()
        st = spool.stats()
        fields = {**report.as_dict(), "batches": st["batches"], "events": st["events"]}
        if report.quarantined:
            self.log.error("spool_recovered_with_corruption", **fields,
                           quarantine=str(s.dir / "quarantine"))
        elif report.truncated:
            self.log.warning("spool_recovered_torn_tail", **fields)
        else:
            self.log.info("spool_opened", **fields)
        return spool

    def _check_fd_limit(self) -> None:
        """Each TCP connection is a file descriptor: make sure max_connections fits.

        Out of descriptors, accept() fails quietly and senders wait in the kernel backlog;
        better to raise the soft limit, or say at start-up that it is too low.
        """
        need = self.settings.listen.max_connections + FD_MARGIN
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < need:
            target = need if hard == resource.RLIM_INFINITY else min(need, hard)
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft < need:
            self.log.warning(
                "fd_limit_low", nofile=soft, max_connections=self.settings.listen.max_connections,
                hint="raise LimitNOFILE (systemd) / ulimit -n, or lower listen.max_connections",
            )

    async def start(self) -> None:
        s = self.settings
        self._check_fd_limit()
        self.spool = self._open_spool()
        self.delivery = Delivery(
            self._make_sink(), self.counters, self.dead, self.log,
            workers=s.intake.concurrency,
            backoff=Backoff(s.intake.retry_max, s.intake.auth_retry),
            max_in_flight=s.batch.max_in_flight,
            on_pressure=self._on_pressure,
            spool=self.spool,
            write_ahead=s.spool.mode == "always",
        )
        bound: list[str] = []
        for addr in s.listen.tcp:
            host, port = _split_hostport(addr)
            tcp = TcpListener(self, host, port, s.listen.max_message_size,
                              s.listen.max_connections, s.listen.evict_idle_after)
            h, p = await tcp.start()
            self.tcp.append(tcp)
            self.log.info("listening", proto="tcp", host=h, port=p)
            bound.append(f"tcp://{h}:{p}")
        for addr in s.listen.udp:
            host, port = _split_hostport(addr)
            udp = UdpListener(self, host, port, s.listen.max_message_size)
            h, p = await udp.start()
            self.udp.append(udp)
            self.log.info("listening", proto="udp", host=h, port=p)
            bound.append(f"udp://{h}:{p}")
        if s.status.listen:
            host, port = _split_hostport(s.status.listen)
            self.status = StatusServer(host, port, self.counters.snapshot, self.gauges,
                                       self.health, self.log)
            h, p = await self.status.start()
            self.log.info("listening", proto="http", host=h, port=p, paths=["/metrics", "/healthz"])
            bound.append(f"http://{h}:{p}")
        self.log.info(
            "started",
            version=__version__,
            listen=bound,
            intake=("dry-run (stdout)" if s.intake.dry_run else s.intake.endpoint_url),
            endpoint=s.intake.endpoint,
            gzip=s.intake.gzip,
            programs=s.filter.programs,
            batch_max_events=s.batch.max_events,
            batch_max_bytes=s.batch.max_bytes,
            batch_max_delay=s.batch.max_delay,
            spool_dir=str(s.spool.dir),
            spool_mode=s.spool.mode if self.spool else "off (dry-run)",
        )

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.log.stats_interval)
            self.log_stats("stats")

    def log_stats(self, name: str) -> None:
        g = self.gauges()
        g["paused"] = self.paused
        g["intake_failing"] = bool(g["intake_failing"])
        self.log.info(name, **self.counters.snapshot(), **g)

    def gauges(self) -> dict[str, float]:
        d = self.delivery
        out: dict[str, float] = {
            "in_memory_batches": d.in_memory if d else 0,
            "paused": float(self.paused),
            "intake_failing": float(d.failing) if d else 0.0,
            "seconds_since_last_delivery": (time.monotonic() - d.last_progress) if d else 0.0,
        }
        if self.spool is not None:
            st = self.spool.stats()
            out.update(spool_batches=st["batches"], spool_events=st["events"],
                       spool_bytes=st["bytes"], spool_oldest_age_seconds=st["oldest_age_seconds"],
                       spool_blocked=float(d.spool_blocked) if d else 0.0)
        return out

    def health(self) -> tuple[bool, dict[str, Any]]:
        d = self.delivery
        assert d is not None
        backlog = d.in_memory + (self.spool.pending_batches if self.spool else 0)
        idle = time.monotonic() - d.last_progress
        reasons: list[str] = []
        if d.spool_blocked:
            reasons.append("the spool refuses writes (full or disk error): input is held back")
        if backlog and idle > self.settings.status.stall_after:
            reasons.append(f"{backlog} batches waiting and nothing delivered for {idle:.0f} s")
        return not reasons, {
            "status": "ok" if not reasons else "failing",
            "reasons": reasons,
            "intake_failing": d.failing,
            "backlog_batches": backlog,
            "seconds_since_last_delivery": round(idle, 1),
        }

    async def _requeue_loop(self) -> None:
        """Pick up dead-letter files moved to spool.dir/requeue/ by `spool replay-dead-letter`."""
        folder = self.settings.spool.dir / "requeue"
        while True:
            try:
                files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
                for path in files:
                    await self._requeue_file(path)
            except (OSError, SpoolError) as exc:
                self.log.error("requeue_failed", error=str(exc))
            await asyncio.sleep(REQUEUE_INTERVAL)

    async def _requeue_file(self, path: Path) -> None:
        assert self.delivery is not None
        size = self.settings.batch.max_events
        batch = Batch()
        n = 0
        for event, ts in read_dead_letters(path):
            if len(event.encode("utf-8")) > MAX_EVENT_BYTES:
                # The intake would refuse it again (silently, per event): keep it dead.
                self._oversized_event(event, ts)
                continue
            batch.events.append(event)
            batch.times.append(ts)
            if len(batch) >= size:
                await self.delivery.spool_append(batch)
                n += len(batch)
                batch = Batch()
        if batch.events:
            await self.delivery.spool_append(batch)
            n += len(batch)
        # Only once every event is durable in the spool is the file removed.
        path.unlink()
        self.counters.requeued_events += n
        self.log.info("dead_letters_requeued", file=path.name, events=n)
        self.delivery.poke()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Errors asyncio would print as bare text (e.g. accept() out of file descriptors)
        # become log lines like every other, so they are seen and grepped for.
        exc = context.get("exception")
        self.log.error("event_loop_error", message=context.get("message", ""),
                       error=repr(exc) if exc else None)

    def request_stop(self, signame: str) -> None:
        if not self._stop.is_set():
            self.log.info("stopping", signal=signame)
            self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.set_exception_handler(self._loop_error)
        await self.start()
        background = [asyncio.create_task(self._stats_loop())]
        if self.spool is not None:
            background.append(asyncio.create_task(self._requeue_loop()))
        await self._stop.wait()
        for task in background:
            task.cancel()
        await self.shutdown()

    async def shutdown(self) -> None:
        assert self.delivery is not None
        if self.status is not None:
            await self.status.stop()
        # Stop accepting, take in what senders already wrote (half-close, then read until
        # they close), so nothing they consider sent is reset away; then flush.
        grace = min(TCP_DRAIN_GRACE, self.settings.shutdown_timeout)
        await asyncio.gather(*(lst.stop(grace) for lst in self.tcp))
        for u in self.udp:
            await u.stop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        last = self.batcher.take()
        if last is not None:
            self.delivery.submit(last)
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
        self.log_stats("stopped")
