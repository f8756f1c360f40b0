"""SIGHUP: the config file read again, compared with the running one, applied in place.

Two halves. `make_plan` is pure: the running Settings and the new ones in, a `Plan` out (what
changed, what can be applied live, what needs a restart and is kept as it runs). `apply` does
it to a running daemon in two steps: first everything that can fail (binding new listeners,
building the new intake client), undone if anything fails so the old config stays wholly in
force; then the swaps, which cannot fail and never touch an open connection or a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from .config import ConfigError, IntakeConfig, Settings
from .delivery import Backoff
from .dispatch import Routes
from .intakes import IntakeSet, Pipeline
from .observability import logs
from .observability.counters import Counters
from .routing import Table
from .sinks import Sink, make_sink
from .sources import Listener, ListenError, ListenerSet
from .sources.listeners import KINDS, Key, diff
from .tlscontext import ServerTls, TlsFileError, build_context

# Settings applied live, each by the part of the daemon that owns it. Anything else that
# changes (spool.*, status.listen, log.level, a setting added later and not listed here) is
# kept as it runs, with a warning that a restart is needed: never silently claimed applied.
# An intake's own settings are by field name ([intake] or [intakes.NAME] alike).
SINK_FIELDS = frozenset({"url", "region", "key", "key_file", "endpoint", "gzip", "ca_file",
                         "insecure_skip_verify", "proxy", "timeout", "concurrency"})
BACKOFF_FIELDS = frozenset({"retry_max", "auth_retry"})
INTAKE_LIVE = SINK_FIELDS | BACKOFF_FIELDS
FILTER = frozenset({"filter.programs", "filter.keep_tag"})
BATCH = frozenset(f"batch.{k}" for k in ("max_events", "max_bytes", "max_delay", "idle_flush"))
IN_FLIGHT = frozenset({"batch.max_in_flight"})
LISTENERS = frozenset(f"listen.{kind}" for kind in KINDS)
# Applied to the RELP sessions open, too (a narrower window pauses them sooner).
RELP = frozenset({"relp.max_window"})
# [tls]: the files are read again at every reload anyway (same paths, new certificate).
TLS = frozenset(f"tls.{k}" for k in ("cert_file", "key_file", "min_version", "client_ca_file",
                                     "allowed_names", "handshake_timeout", "max_handshakes"))
TCP_LIMITS = frozenset(f"listen.{k}" for k in (
    "max_connections", "evict_idle_after", "idle_timeout", "max_connections_per_address",
    "max_buffered_bytes", "allow", "proxy_protocol"))
# Read from the settings each time they are used: replacing the settings applies them.
READ_LIVE = frozenset({"status.stall_after", "log.stats_interval", "shutdown_timeout"})
# The route table: applied from each connection's next chunk (dispatch.py).
ROUTES = frozenset({"routes"})
LIVE = FILTER | BATCH | IN_FLIGHT | LISTENERS | TCP_LIMITS | READ_LIVE | TLS | RELP | ROUTES

_T = TypeVar("_T")

# The new config is read in a thread, never on the event loop: a slow or hung filesystem
# must not freeze the daemon (health checks, SIGTERM). Past this it is refused; the thread,
# a daemon thread, cannot keep the process from exiting should it never come back.
LOAD_TIMEOUT = 10.0


def flatten(settings: Settings) -> dict[str, Any]:
    """Dotted name -> plain value (JSON-like), keys masked; the intakes apart (intake_fields)."""
    out: dict[str, Any] = {}
    for name, value in settings.model_dump(mode="json").items():
        if name in ("intake", "intakes"):
            continue
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def intake_prefix(old: Settings, new: Settings, name: str) -> str:
    """How a reload names an intake's settings: "intake" while both configs have a single
    [intake] (as before several intakes), else "intakes.NAME"."""
    return "intake" if not old.intakes and not new.intakes else f"intakes.{name}"


def intake_changes(old: IntakeConfig, new: IntakeConfig) -> dict[str, tuple[Any, Any]]:
    """Field -> (old, new) of one intake, the key masked (a new key shows as a change)."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    out = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
    ka, kb = old.key, new.key
    if (ka is None) != (kb is None) or (
            ka is not None and kb is not None
            and ka.get_secret_value() != kb.get_secret_value()):
        out["key"] = (logs.MASK if ka is not None else None, logs.MASK if kb is not None else None)
    return out


@dataclass(frozen=True)
class Plan:
    """What a reload does. `changes` and `restart` map a dotted setting to (old, new), the key
    masked; `effective` is the new config with every `restart` setting at its running value."""

    effective: Settings
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    restart: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    # Listeners as (kind, address): a multiset, an address listed twice is two listeners.
    listeners_add: list[Key] = field(default_factory=list)
    listeners_remove: list[Key] = field(default_factory=list)
    # Intakes by name: new ones, removed ones, and the live fields changed of the others.
    intakes_add: list[str] = field(default_factory=list)
    intakes_remove: list[str] = field(default_factory=list)
    intakes_changed: dict[str, frozenset[str]] = field(default_factory=dict)

    def touches(self, names: Iterable[str]) -> bool:
        return any(n in self.changes for n in names)

    def sink(self, intake: str) -> bool:
        return bool(self.intakes_changed.get(intake, frozenset()) & SINK_FIELDS)

    def workers(self, intake: str) -> bool:
        return "concurrency" in self.intakes_changed.get(intake, frozenset())

    def backoff(self, intake: str) -> bool:
        return bool(self.intakes_changed.get(intake, frozenset()) & BACKOFF_FIELDS)

    @property
    def filter(self) -> bool:
        return self.touches(FILTER)

    @property
    def batch(self) -> bool:
        return self.touches(BATCH)

    @property
    def in_flight(self) -> bool:
        return self.touches(IN_FLIGHT)

    @property
    def routes(self) -> bool:
        return bool(self.touches(ROUTES) or self.intakes_add or self.intakes_remove)


def _keep_running(new: Settings, old: Settings, names: Iterable[str],
                  intakes: dict[str, IntakeConfig]) -> Settings:
    """`new` with the settings `names` put back to their values in `old`, and its intakes
    as `intakes` (their restart-only fields at their running values)."""
    sections: dict[str, BaseModel] = {}
    top: dict[str, Any] = {}
    for name in names:
        section, _, key = name.partition(".")
        if section in ("intake", "intakes"):
            continue
        if not key:
            top[section] = getattr(old, section)
            continue
        current = sections.get(section, getattr(new, section))
        sections[section] = current.model_copy(update={key: getattr(getattr(old, section), key)})
    if new.intakes:
        top["intakes"] = intakes
    elif intakes:
        top["intake"] = next(iter(intakes.values()))
    return new.model_copy(update={**sections, **top})


def make_plan(old: Settings, new: Settings) -> Plan:
    """Pure: what changed between the running config and the new one, and what to do."""
    before, after = flatten(old), flatten(new)
    changed = {
        name: (before.get(name), after.get(name))
        for name in sorted(before.keys() | after.keys())
        if before.get(name) != after.get(name)
    }
    live = {n: v for n, v in changed.items() if n in LIVE}
    restart = {n: v for n, v in changed.items() if n not in LIVE}
    old_t, new_t = old.intake_table, new.intake_table
    kept: dict[str, IntakeConfig] = {}
    intakes_changed: dict[str, frozenset[str]] = {}
    for name, cfg in new_t.items():
        if name not in old_t:
            live[f"intakes.{name}"] = (None, "added")
            kept[name] = cfg
            continue
        prefix = intake_prefix(old, new, name)
        diffs = intake_changes(old_t[name], cfg)
        now = {k for k in diffs if k in INTAKE_LIVE}
        later = {k: getattr(old_t[name], k) for k in diffs if k not in INTAKE_LIVE}
        for k, v in diffs.items():
            (live if k in INTAKE_LIVE else restart)[f"{prefix}.{k}"] = v
        if now:
            intakes_changed[name] = frozenset(now)
        kept[name] = cfg.model_copy(update=later) if later else cfg
    removed = [name for name in old_t if name not in new_t]
    for name in removed:
        live[f"intakes.{name}"] = ("running", "removed")
    add, remove = diff(old, new)
    return Plan(effective=_keep_running(new, old, restart, kept), changes=live,
                restart=restart, listeners_add=add, listeners_remove=remove,
                intakes_add=[n for n in new_t if n not in old_t], intakes_remove=removed,
                intakes_changed=intakes_changed)


# -- applying it to a running daemon --------------------------------------------------------


class Target(Protocol):
    """The running daemon, as a reload sees it: each part applies its own settings."""

    @property
    def settings(self) -> Settings: ...

    log: Any
    counters: Counters
    intakes: IntakeSet
    routes: Routes
    listeners: ListenerSet


class Refused(Exception):
    """The new config cannot be applied; `problems` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class _Prepared:
    sinks: dict[str, Sink] = field(default_factory=dict)  # new clients of changed intakes
    pipelines: list[Pipeline] = field(default_factory=list)  # added intakes, not started
    revived: list[str] = field(default_factory=list)  # added back while still draining
    opened: list[tuple[Listener, str, int]] = field(default_factory=list)  # bound, not members
    tls_context: ssl.SSLContext | None = None
    tls_before: ServerTls | None = None  # put back if the reload is refused after all
    tls_changed: bool = False  # the files hold something new (a renewed certificate...)

    async def undo(self, listeners: ListenerSet) -> None:
        await listeners.drain([listener for listener, _, _ in self.opened], 0.0)
        if self.tls_before is not None:
            listeners.restore_tls(self.tls_before)
        for sink in self.sinks.values():
            await sink.aclose()
        for pipe in self.pipelines:
            await pipe.delivery.sink.aclose()
            if pipe.spool is not None:
                pipe.spool.close()


async def off_loop(fn: Callable[[], _T], timeout: float) -> _T:
    """fn() in a daemon thread of its own; TimeoutError after `timeout` (the thread is left
    to finish, or not, on its own; its result is then dropped)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():  # else timed out (cancelled) meanwhile
            outcome()

    def run() -> None:
        outcome: Callable[[], None]
        try:
            outcome = functools.partial(done.set_result, fn())
        except BaseException as exc:  # handed to the awaiting task, which decides
            outcome = functools.partial(done.set_exception, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="config-reload", daemon=True).start()
    # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that comes once the
    # result is there (CPython gh-86296), and a reload cancelled at shutdown would be applied.
    finished, _ = await asyncio.wait({done}, timeout=timeout)
    if not finished:
        done.cancel()
        raise TimeoutError
    return done.result()


async def read_new(loader: Callable[[], Settings] | None,
                   timeout: float = LOAD_TIMEOUT) -> Settings:
    """load_new() off the event loop, within `timeout`; Refused as load_new."""
    try:
        return await off_loop(lambda: load_new(loader), timeout)
    except TimeoutError:
        raise Refused([f"config: not read within {timeout:g} s (a hung filesystem?)"]) from None


def load_new(loader: Callable[[], Settings] | None) -> Settings:
    """The new config, validated as `run` would at start-up; Refused with every problem."""
    if loader is None:
        raise Refused(["no config file to read again (the daemon was built without a loader)"])
    try:
        new = loader()
    except ConfigError as exc:
        raise Refused(exc.problems) from None
    except Exception as exc:  # the loader's own bug must not pass for a config problem
        raise Refused([f"config: cannot be read: {type(exc).__name__}: {exc}"]) from None
    for key in new.intake_keys():
        # Before anything logs: a new key is masked like the old one (the CLI's loader does
        # it too; a reload must not depend on that).
        logs.add_secret(key)
    return new


async def _prepare(target: Target, plan: Plan) -> _Prepared:
    """Everything that can fail, before anything running is touched."""
    s = plan.effective
    try:
        s.require_key()
    except ConfigError as exc:
        raise Refused(exc.problems) from None
    problems: list[str] = []
    done = _Prepared()
    if s.tls_needed:
        # Read again even if no path changed: the files may hold a renewed certificate.
        try:
            done.tls_context = build_context(s.tls)
        except TlsFileError as exc:
            raise Refused([str(exc)]) from None
    # The clients and intakes first: a listener bound and then undone could have taken a
    # connection.
    table = s.intake_table
    for name in plan.intakes_changed:
        if plan.sink(name):
            try:
                done.sinks[name] = make_sink(table[name])
            except Exception as exc:  # whatever the new client refuses (a CA file not PEM...)
                where = intake_prefix(target.settings, s, name)
                problems.append(logs.redact(f"{where}: cannot build the client: {exc}"))
    for name in plan.intakes_add:
        if name in target.intakes.retired and not target.intakes.retired[name].closing:
            done.revived.append(name)  # still draining: the same pipeline, live again
            continue
        try:
            done.pipelines.append(target.intakes.build(s, name))
        except Exception as exc:  # its spool cannot be opened, its client not built...
            problems.append(logs.redact(f"intakes.{name}: cannot be started: {exc}"))
    listeners = target.listeners
    if done.tls_context is not None:
        # The listeners added below must handshake with the new files from their first peer.
        done.tls_changed, done.tls_before = listeners.swap_tls(done.tls_context, s.tls)
    try:
        done.opened = await listeners.open(listeners.build(plan.listeners_add, s))
    except ListenError as exc:
        problems += exc.problems
    if problems:
        await done.undo(listeners)
        raise Refused(problems)
    return done


def _commit(target: Target, plan: Plan, ready: _Prepared,
            adopt: Callable[[Settings], None]) -> list[Listener]:
    """The swaps: nothing here can fail, nothing here closes a connection or drops a batch.
    `adopt` makes the effective settings the daemon's. Returns the listeners removed, for the
    caller to drain."""
    s = plan.effective
    intakes = target.intakes
    for name in plan.intakes_remove:
        intakes.retire(name)
    for name in ready.revived:
        if intakes.revive(name) is None:  # it closed meanwhile: a new one, next reload
            target.log.warning("intake_not_revived", intake=name,
                               reason="it finished closing during this reload",
                               action="send SIGHUP again to start it")
    table = s.intake_table
    for pipe in intakes.live.values():
        name = pipe.name
        if plan.batch:
            pipe.collector.reconfigure(s.batch)
        d = pipe.delivery
        if plan.in_flight:
            d.set_max_in_flight(s.batch.max_in_flight)
        cfg = table.get(name)
        if cfg is None:
            continue
        pipe.config = cfg
        if plan.backoff(name):
            d.set_backoff(Backoff(cfg.retry_max, cfg.auth_retry))
        sink = ready.sinks.get(name)
        if sink is not None:
            # Requests on the wire finish on the old client; retries and new batches use it.
            d.replace_sink(sink)
        if plan.workers(name):
            d.set_workers(cfg.concurrency)
    for pipe in ready.pipelines:
        intakes.add(pipe)
        pipe.start(s)
    if plan.routes:
        target.routes.use(Table(s.route_list))
    listeners = target.listeners
    removed = listeners.take_out(plan.listeners_remove)
    listeners.add(listener for listener, _, _ in ready.opened)
    # The filter, listen.* limits, relp.max_window, and a narrowed allow-list of addresses
    # or of certificate names applied to the peers already connected: each listener its own.
    listeners.configure(s)
    adopt(s)
    return removed


async def apply(target: Target, new: Settings, grace: float,
                adopt: Callable[[Settings], None]) -> Plan:
    """Apply `new` to the running daemon; Refused (nothing changed) if it cannot be.
    Removed listeners are closed as at shutdown, their senders given `grace` seconds."""
    plan = make_plan(target.settings, new)
    ready = await _prepare(target, plan)
    removed = _commit(target, plan, ready, adopt)
    log = target.log
    if ready.tls_changed:
        log.info("tls_certificate_loaded", cert_file=str(plan.effective.tls.cert_file),
                 fingerprint=target.listeners.tls_fingerprint, reload=True,
                 action="new connections get it; open ones keep theirs")
    for listener, host, port in ready.opened:
        log.info("listening", proto=listener.kind, host=host, port=port, reload=True)
    # Closed like at shutdown: no more accepts, a FIN, then what senders already wrote is read
    # (the drain, up to the grace, goes on after the `reloaded` line).
    drain = asyncio.create_task(
        ListenerSet.drain(removed, min(grace, plan.effective.shutdown_timeout)))
    await asyncio.sleep(0)  # the drains' first step: accepting stops, FINs go out
    log.info("reloaded", changes={k: list(v) for k, v in plan.changes.items()},
             restart_needed=sorted(plan.restart))
    for name, (running, configured) in plan.restart.items():
        log.warning("reload_restart_needed", setting=name, running=running,
                    configured=configured, action="the running value is kept until a restart")
    await drain
    for listener in removed:
        log.info("listener_closed", proto=listener.kind, host=listener.host,
                 port=listener.port)
    return plan


async def reload(target: Target, loader: Callable[[], Settings] | None, grace: float,
                 adopt: Callable[[Settings], None]) -> bool:
    """One reload, logged and counted; True if the new config is in force. The file is read
    off the event loop (config.load reads only a regular file, and refuses an empty one)."""
    try:
        await apply(target, await read_new(loader), grace, adopt)
    except Refused as exc:
        for problem in exc.problems:
            target.log.error("reload_failed", problem=problem,
                             action="the running config stays in force")
        target.counters.reload_failures += 1
        return False
    target.counters.reloads += 1
    return True
