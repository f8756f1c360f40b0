"""`haproxy-forwarder spool deliver`: deliver a spool another forwarder left behind.

A forwarder that dies keeps its backlog in its spool, on its own disk, until it starts again.
When it will not (a dead host, a replaced VM, a scaled-down pod), an operator mounts that disk
(or copies the spool) on a machine that reaches the intake and runs

    haproxy-forwarder --config CONFIG spool deliver --dir PATH [--intake NAME] [--timeout S]

PATH is the dead forwarder's `spool.dir` (what its config said): intake "default"'s spool is
PATH itself, another intake's PATH/intakes/NAME, exactly as the daemon lays them out (PATH may
also be that intake folder itself, .../intakes/NAME). The batches are delivered with CONFIG's
settings of that intake (URL, key, endpoint, concurrency, retries), by the daemon's own
pipeline (intakes.build_pipeline: the spool opened and recovered, Delivery's workers, its
dead letters) with no listener: each batch is acked on the spool once the intake took it, so
an interrupted run resumes where it stopped, and events the intake refuses for good go to
PATH's dead letters as in the daemon. Dead letters re-queued there (`spool replay-dead-letter`)
and not yet spooled are delivered too.

The spool's lock (segments/LOCK) is taken as the daemon takes it: a spool in use by a running
daemon is refused. Exit 0 once the spool is empty (every batch acked); 1 when nothing was
delivered for `timeout` seconds (the intake keeps failing) or when interrupted, what remains
staying on disk for a later run; 2 for a bad argument (no spool there, no such intake).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .buildinfo import build_info
from .config import DEFAULT_INTAKE, ConfigError, Settings
from .intakes import INTAKES_DIR, Pipeline, build_pipeline, spool_dir
from .observability.counters import Registry
from .spool import SpoolError, SpoolLocked

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

# Give up when nothing was delivered for this long (seconds) while batches remain.
DEFAULT_TIMEOUT = 600.0
# How often a progress line is printed while batches remain.
PROGRESS_EVERY = 5.0
# How often the spool and the intake's state are looked at.
POLL = 0.05

Out = Callable[[str], None]


def _stdout(line: str) -> None:
    print(line, flush=True)


def choose_intake(settings: Settings, only: str | None) -> str:
    """The intake whose settings (and spool folder) are used: `only`, else the config's only
    one, else "default"; ConfigError otherwise."""
    names = list(settings.intake_table)
    if only is not None:
        if only not in names:
            raise ConfigError([f"--intake {only}: no such intake (the config has: "
                               f"{', '.join(names)})"])
        return only
    if len(names) == 1:
        return names[0]
    if DEFAULT_INTAKE in names:
        return DEFAULT_INTAKE
    raise ConfigError([f"--intake: the config has several intakes ({', '.join(names)}): name "
                       "the one whose spool this is"])


def locate(settings: Settings, path: Path, name: str) -> Settings:
    """`settings` with spool.dir moved so that intake `name`'s spool folder (intakes.spool_dir)
    is the one under `path`; ConfigError when `path` holds no spool of that intake.

    Also spool.when_full="block": the only appends here are re-queued dead letters, which must
    never make room by deleting the batches being delivered."""
    path = path.absolute()
    if not path.is_dir():
        raise ConfigError([f"--dir {path}: no such directory"])
    if name == DEFAULT_INTAKE:
        root = path
    elif (path / INTAKES_DIR / name / "segments").is_dir():
        root = path  # the dead forwarder's spool.dir
    elif path.name == name and path.parent.name == INTAKES_DIR:
        root = path.parent.parent  # that intake's own folder, .../intakes/NAME
    else:
        root = path
    spool = settings.spool.model_copy(update={"dir": root, "when_full": "block"})
    moved = settings.model_copy(update={"spool": spool})
    folder = spool_dir(moved, name)
    if not (folder / "segments").is_dir():
        hint = ""
        if name != DEFAULT_INTAKE and (path / "segments").is_dir():
            hint = (f"; {path} holds a spool of its own: for intake {name}, --dir names the "
                    f"spool.dir holding {INTAKES_DIR}/{name}, or that folder itself (a copy: "
                    f"put it back as DIR/{INTAKES_DIR}/{name})")
        elif name == DEFAULT_INTAKE and (path / INTAKES_DIR).is_dir():
            others = sorted(p.name for p in (path / INTAKES_DIR).iterdir() if p.is_dir())
            hint = f"; it holds the spools of intakes {', '.join(others)}: name one with --intake"
        raise ConfigError([f"--dir {path}: no spool of intake {name} there (no {folder}/"
                           f"segments){hint}"])
    return moved


def _requeue_files(folder: Path) -> int:
    from .delivery.requeue import list_files
    from .spool import Filesystem

    return len(list_files(Filesystem(), folder / "requeue"))


def deliver(settings: Settings, path: Path, only: str | None = None,
            timeout: float | None = None, out: Out = _stdout,
            progress_every: float = PROGRESS_EVERY) -> int:
    """The command: the exit code. Logs (the pipeline's, as the daemon's) go to stderr."""
    from .observability import logs

    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    if not timeout > 0:
        raise ConfigError([f"--timeout {timeout:g}: must be more than 0 seconds"])
    name = choose_intake(settings, only)
    moved = locate(settings, path, name)
    if moved.dry_run:
        raise ConfigError(["intake.dry_run: nothing would be delivered"])
    moved.require_key()
    logs.configure(settings.log.level, settings.log.format)
    return asyncio.run(_deliver(moved, name, timeout, out, progress_every))


class _Progress:
    def __init__(self, pipe: Pipeline, total: int, out: Out) -> None:
        self.pipe = pipe
        self.total = total
        self.out = out
        self.t0 = time.monotonic()

    def line(self, what: str) -> str:
        pipe = self.pipe
        c = pipe.counters
        spool = pipe.spool
        left_b = spool.pending_batches if spool is not None else 0
        left_e = spool.pending_events if spool is not None else 0
        rate = c.delivered_events / max(time.monotonic() - self.t0, 1e-3)
        parts = [f"{c.delivered_events}/{self.total} events delivered",
                 f"{left_e} events in {left_b} batches left",
                 f"{rate:,.0f} events/s"]
        if c.dead_lettered_events:
            parts.append(f"{c.dead_lettered_events} dead-lettered")
        if pipe.delivery.failing:
            parts.append("intake failing: retrying")
        return f"spool deliver: {what}: " + ", ".join(parts)


def _done(pipe: Pipeline) -> bool:
    spool = pipe.spool
    return (spool is not None and spool.pending_batches == 0 and pipe.delivery.in_memory == 0
            and pipe.delivery.requeue_files == 0)


async def _deliver(settings: Settings, name: str, timeout: float, out: Out,
                   progress_every: float) -> int:
    from .observability import logs

    log = logs.get_logger("haproxy_forwarder").bind(command="spool deliver")
    folder = spool_dir(settings, name)
    try:
        pipe = build_pipeline(settings, name, Registry(build_info()), log,
                              lambda _pipe, _on: None)
    except SpoolLocked:
        out(f"spool deliver: {folder} is locked by a running daemon (segments/LOCK): that "
            "daemon delivers it itself; stop it first to deliver it from here")
        return EXIT_FAILED
    except SpoolError as exc:
        out(f"spool deliver: cannot open the spool {folder}: {exc}")
        return EXIT_FAILED
    spool = pipe.spool
    assert spool is not None  # not a dry-run (deliver() refused it)
    total, batches = spool.pending_events, spool.pending_batches
    requeue = _requeue_files(folder)
    if not batches and not requeue:
        spool.close()
        out(f"spool deliver: {folder}: nothing to deliver (the spool is empty)")
        return EXIT_OK
    oldest = spool.stats()["oldest_age_seconds"]
    files = f", {requeue} re-queued dead-letter files" if requeue else ""
    out(logs.redact(f"spool deliver: {folder}: {total} events in {batches} batches (oldest "
                    f"{oldest:.0f} s){files} to intake {name} at {pipe.config.endpoint_url}"))
    progress = _Progress(pipe, total, out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    pipe.start(settings)
    verdict = EXIT_FAILED
    why = ""
    next_line = loop.time() + progress_every
    # Progress: events delivered or dead-lettered (a batch the intake refuses for good is
    # settled too: a spool of refused events is not an intake that keeps failing).
    settled, moved_at = 0, time.monotonic()
    try:
        while True:
            if _done(pipe):
                verdict = EXIT_OK
                break
            if stop.is_set():
                why = "interrupted"
                break
            now_settled = pipe.counters.delivered_events + pipe.counters.dead_lettered_events
            if now_settled != settled:
                settled, moved_at = now_settled, time.monotonic()
            idle = time.monotonic() - moved_at
            if idle >= timeout:
                why = (f"gave up: nothing delivered for {idle:.0f} s (--timeout {timeout:g}); "
                       "the intake keeps failing (the intake_retry / "
                       "intake_refused_check_config lines above say why)")
                break
            if loop.time() >= next_line:
                out(progress.line("in progress"))
                next_line = loop.time() + progress_every
            await asyncio.sleep(POLL)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        # Requests cut off here may have been taken (counted as uncertain): their records
        # stay on the spool and are sent again by the next run.
        await pipe.stop()
    c = pipe.counters
    if verdict == EXIT_OK:
        out(progress.line("done") + f"; the spool {folder} is empty")
        if c.dead_lettered_events:
            out(f"spool deliver: {c.dead_lettered_events} events refused for good by the intake "
                f"are in {folder}/dead-letter (see `spool stats`)")
        return EXIT_OK
    out(progress.line(why))
    out(f"spool deliver: {pipe.kept_events} events stay in {folder}: run the command again "
        "once the intake takes them (or start a forwarder on that spool)")
    sys.stdout.flush()
    return verdict

