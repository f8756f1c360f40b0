"""Wiring: listeners → header reader → program filter → batcher → delivery; start and stop.

`ingest` is the per-message hot path: keep it to byte scanning and list appends.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from . import __version__
from .batching import Batch, Batcher
from .config import MAX_EVENT_BYTES, Settings
from .deadletter import DeadLetters
from .delivery import Backoff, Delivery, DryRunSink, IntakeSink, Sink
from .intake import IntakeClient
from .listeners import TcpListener, UdpListener
from .metrics import Counters
from .syslog.header import event_text, read_header

HAPEE = b"hapee"


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
        self.dead = DeadLetters(settings.spool.dir)
        self._timer: asyncio.TimerHandle | None = None
        self.tcp: list[TcpListener] = []
        self.udp: list[UdpListener] = []
        self.delivery: Delivery | None = None
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
            keep_tag = frame.startswith(HAPEE, h.prog_start, h.prog_end)
            event = event_text(frame, h, keep_tag)
            size = len(frame) - h.msg_start
            if size * 3 > MAX_EVENT_BYTES and len(event.encode("utf-8")) > MAX_EVENT_BYTES:
                self._oversized_event(event, received_at)
                continue
            ts = frame[h.ts_start : h.ts_end].decode("ascii") if h.ts_zoned else received_at
            accepted += 1
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

    def _oversized_event(self, event: str, received_at: str) -> None:
        assert self.delivery is not None
        self.delivery.write_dead(
            Batch([event], [received_at]),
            f"event over 250 KiB ({MAX_EVENT_BYTES} bytes), the intake limit",
        )

    def _on_timer(self) -> None:
        self._timer = None
        full = self.batcher.take()
        if full is not None:
            self._submit(full)

    def _submit(self, batch: Batch) -> None:
        assert self.delivery is not None
        self.delivery.submit(batch)
        if not self.paused and self.delivery.pending >= self.settings.batch.max_in_flight:
            self.paused = True
            for lst in self.tcp:
                lst.pause()
            self.log.warning(
                "backpressure_on", pending_batches=self.delivery.pending,
                action="TCP listeners stop reading; UDP datagrams dropped and counted",
            )

    def _on_batch_done(self) -> None:
        assert self.delivery is not None
        if self.paused and self.delivery.pending < self.settings.batch.max_in_flight:
            self.paused = False
            for lst in self.tcp:
                lst.resume()
            self.log.info("backpressure_off", pending_batches=self.delivery.pending)

    # -- lifecycle ------------------------------------------------------------------------------

    def _make_sink(self) -> Sink:
        cfg = self.settings.intake
        if cfg.dry_run:
            return DryRunSink()
        return IntakeSink(IntakeClient(cfg), cfg.endpoint, cfg.gzip)

    async def start(self) -> None:
        s = self.settings
        self.delivery = Delivery(
            self._make_sink(), self.counters, self.dead, self.log,
            workers=s.intake.concurrency, on_done=self._on_batch_done,
            backoff=Backoff(s.intake.retry_max, s.intake.auth_retry),
        )
        bound: list[str] = []
        for addr in s.listen.tcp:
            host, port = _split_hostport(addr)
            tcp = TcpListener(self, host, port, s.listen.max_message_size,
                              s.listen.max_connections)
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
        )

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.log.stats_interval)
            self.log_stats("stats")

    def log_stats(self, name: str) -> None:
        pending = self.delivery.pending if self.delivery else 0
        self.log.info(name, **self.counters.snapshot(), pending_batches=pending,
                      paused=self.paused)

    def request_stop(self, signame: str) -> None:
        if not self._stop.is_set():
            self.log.info("stopping", signal=signame)
            self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        await self.start()
        stats = asyncio.create_task(self._stats_loop())
        await self._stop.wait()
        stats.cancel()
        await self.shutdown()

    async def shutdown(self) -> None:
        assert self.delivery is not None
        # Stop accepting and reading first, so what we flush is final.
        for lst in self.tcp:
            await lst.stop()
        for u in self.udp:
            await u.stop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        last = self.batcher.take()
        if last is not None:
            self.delivery.submit(last)
        timeout = self.settings.shutdown_timeout
        drained = await self.delivery.drain(timeout)
        if not drained:
            lost = self.delivery.pending_events()
            self.counters.dropped_events += lost
            self.log.error(
                "shutdown_dropped",
                events=lost,
                batches=self.delivery.pending,
                reason=f"not delivered within shutdown_timeout={timeout}s",
            )
        await self.delivery.stop()
        self.log_stats("stopped")
