"""One pipeline per intake: its own batches, delivery workers, retries, spool share and dead
letters, so that an intake refusing or silent for an hour never delays another's events.

Why one spool directory per intake rather than per-intake queues in one spool: the spool is
an append-only log read in order and reclaimed by whole segments; in one log, a failing
intake's records would pin every segment they sit in (the healthy intakes' acked records
with them) and one full intake would fill the space of all. Apart, each intake recovers,
fills, blocks, drops (when_full) and is replayed on its own, by the same tested code, and an
operator sees on disk which intake holds what. The intake "default" (the one of a config with
a single [intake]) keeps spool.dir itself, so upgrading changes nothing on disk; any other
intake has spool.dir/intakes/NAME.

Shares: `[intakes.NAME] spool_max_size`, else what those leave of spool.max_size divided
equally; computed when an intake's spool opens (at start, or when a reload adds the intake:
the intakes already running keep theirs until a restart, so for that while the shares may
add up to more than spool.max_size). Dead letters: each intake's own, under its directory,
up to spool.dead_letter_max_size each.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batching import Batcher
from .collector import Collector
from .config import DEFAULT_INTAKE, IntakeConfig, Settings, segment_size
from .delivery import Backoff, Delivery
from .observability.counters import Counters, Registry
from .sinks import make_sink
from .sinks.deadletter import DeadLetters
from .sources import Backpressure
from .spool import Spool

# Below spool.dir: the directories of the intakes other than "default".
INTAKES_DIR = "intakes"
# How often a retired intake (removed by a reload) is looked at: closed once it holds nothing.
RETIRE_POLL = 1.0


def spool_dir(settings: Settings, name: str) -> Path:
    """Where intake `name` keeps its spool, dead letters and re-queued files."""
    root = settings.spool.dir
    return root if name == DEFAULT_INTAKE else root / INTAKES_DIR / name


def spool_share(settings: Settings, name: str) -> int:
    """The bytes of spool intake `name` may use."""
    table = settings.intake_table
    own = table[name].spool_max_size
    if own is not None:
        return own
    # What the intakes with a share of their own leave, divided equally among the others
    # (config.py refuses shares adding up to more than spool.max_size).
    fixed = sum(c.spool_max_size or 0 for c in table.values())
    rest = sum(1 for c in table.values() if c.spool_max_size is None)
    return max(64 * 1024, (settings.spool.max_size - fixed) // rest)


def open_spool(settings: Settings, name: str, counters: Counters, log: Any) -> Spool | None:
    """Intake `name`'s spool, recovered; none in dry-run, where stdout never fails."""
    if settings.dry_run:
        return None
    s = settings.spool
    size = spool_share(settings, name)
    spool = Spool(spool_dir(settings, name), max_size=size, when_full=s.when_full,
                  segment_size=segment_size(size),
                  counters=counters.spool)
    report = spool.open()
    st = spool.stats()
    fields = {**report.as_dict(), "batches": st["batches"], "events": st["events"]}
    folder = spool_dir(settings, name)
    if report.quarantined:
        log.error("spool_recovered_with_corruption", **fields,
                  quarantine=str(folder / "quarantine"))
    elif report.truncated:
        log.warning("spool_recovered_torn_tail", **fields)
    else:
        log.info("spool_opened", **fields, spool_dir=str(folder), max_size=size)
    return spool


@dataclass(eq=False)
class Pipeline:
    """Intake `name`: collector → delivery (router, workers, spool writer) → its sink."""

    name: str
    config: IntakeConfig
    counters: Counters
    spool: Spool | None
    delivery: Delivery
    collector: Collector
    # On while this intake's delivery lags (spool full and blocking, or in-memory batches at
    # batch.max_in_flight): the senders routed to it wait, the others do not.
    pressure: Backpressure
    folder: Path
    log: Any
    retired: bool = False
    closing: bool = False  # a retired one whose stop has begun: it cannot be revived
    kept_events: int = 0  # on its spool when it stopped

    def start(self, settings: Settings) -> None:
        self.delivery.start()
        b = settings.batch
        # Dead letters an operator re-queued (`spool replay-dead-letter`); none in dry-run.
        self.delivery.start_requeue(self.folder / "requeue", b.max_events, b.max_bytes,
                                    settings.status.stall_after)

    @property
    def idle(self) -> bool:
        """Holds nothing any more: no open batch, nothing in memory or on its spool."""
        return not self.collector.batcher.current.lens and self.delivery.backlog == 0 \
            and self.delivery.in_memory == 0

    def held_events(self) -> dict[str, int]:
        """The `held` term of the accounting identity for this intake, by where."""
        memory = len(self.collector.batcher.current) + sum(
            len(e.batch) for e in self.delivery.router.memory_only())
        return {"memory": memory,
                "spool": self.spool.pending_events if self.spool is not None else 0}

    async def drain(self, timeout: float) -> bool:
        self.collector.flush()
        return await self.delivery.drain(timeout)

    async def stop(self) -> tuple[int, int]:
        """Spool what is only in memory and stop; (spooled, dropped) events."""
        self.collector.flush()
        result = await self.delivery.stop()
        if self.spool is not None:
            self.kept_events = self.spool.pending_events
            self.spool.close()
        return result


def build_pipeline(settings: Settings, name: str, registry: Registry, log: Any,
                   on_pressure: Callable[[Pipeline, bool], None]) -> Pipeline:
    """Intake `name` of `settings`, its spool opened and recovered; nothing started. Raises
    what opening the spool or building the client raises."""
    cfg = settings.intake_table[name]
    counters = registry.intake(name)
    ilog = log.bind(intake=name)
    spool = open_spool(settings, name, counters, ilog)
    s = settings
    pressure = Backpressure()
    folder = spool_dir(settings, name)
    try:
        delivery = Delivery(
            make_sink(cfg), spool, DeadLetters(folder, s.spool.dead_letter_max_size, intake=name),
            counters, ilog,
            workers=cfg.concurrency,
            backoff=Backoff(cfg.retry_max, cfg.auth_retry),
            max_in_flight=s.batch.max_in_flight,
            write_ahead=s.spool.mode == "always",
            on_pressure=pressure.set,
        )
    except Exception:
        if spool is not None:
            spool.close()
        raise
    collector = Collector(Batcher(s.batch.max_events, s.batch.max_bytes), delivery, counters,
                          s.batch.max_delay, s.batch.idle_flush)
    pipe = Pipeline(name, cfg, counters, spool, delivery, collector, pressure, folder, ilog)
    pressure.subscribe(lambda on: on_pressure(pipe, on))
    return pipe


class IntakeSet:
    """The pipelines of the running daemon: live ones (routes lead to them) and retired ones
    (a reload removed them: they deliver what they still hold, then close)."""

    def __init__(self, registry: Registry, log: Any, pressure: Backpressure) -> None:
        self.registry = registry
        self.log = log
        # Announced to the listeners on every change of any intake's pressure; `on` while
        # any intake lags (sources.base.Backpressure).
        self.pressure = pressure
        self.live: dict[str, Pipeline] = {}
        self.retired: dict[str, Pipeline] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def build(self, settings: Settings, name: str) -> Pipeline:
        return build_pipeline(settings, name, self.registry, self.log, self._pressure_changed)

    def __iter__(self) -> Iterator[Pipeline]:
        """Every pipeline, live then retired."""
        yield from self.live.values()
        yield from self.retired.values()

    def _pressure_changed(self, pipe: Pipeline, on: bool) -> None:
        if on:
            pipe.log.warning("backpressure_on",
                             action="senders routed to this intake wait (TCP, TLS, RELP not "
                                    "read); their UDP datagrams dropped and counted",
                             in_memory_batches=pipe.delivery.in_memory)
        else:
            pipe.log.info("backpressure_off")
        self.pressure.set(any(p.pressure.on for p in self))

    def add(self, pipe: Pipeline) -> None:
        self.live[pipe.name] = pipe

    def retire(self, name: str) -> Pipeline:
        """No route leads to `name` any more: it delivers what it holds, then closes."""
        pipe = self.live.pop(name)
        pipe.retired = True
        # Same name again later (re-added while still draining): the newer one is live.
        self.retired[name] = pipe
        pipe.collector.flush()
        pipe.log.warning("intake_removed", backlog_batches=pipe.delivery.backlog,
                         action="delivering what it still holds, then closing it")
        task = asyncio.create_task(self._close_when_idle(pipe), name=f"retire-{name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return pipe

    async def _close_when_idle(self, pipe: Pipeline) -> None:
        while pipe.retired and not pipe.idle:
            await asyncio.sleep(RETIRE_POLL)
        if not pipe.retired:
            return  # revived by a later reload
        pipe.closing = True
        spooled, dropped = await pipe.stop()
        if self.retired.get(pipe.name) is pipe:
            del self.retired[pipe.name]
        pipe.log.info("intake_closed", spooled_events=spooled, dropped_events=dropped)

    def revive(self, name: str) -> Pipeline | None:
        """A reload adds back an intake still draining: the same pipeline, live again."""
        pipe = self.retired.get(name)
        if pipe is None or pipe.closing:
            return None
        del self.retired[name]
        pipe.retired = False
        self.live[name] = pipe
        return pipe

    async def stop_retiring(self) -> None:
        """Shutdown: the retired intakes are drained and stopped with the others."""
        for task in list(self._retiring):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._retiring, return_exceptions=True)
