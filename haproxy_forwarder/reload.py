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
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from .collector import Collector
from .config import ConfigError, Settings
from .delivery import Backoff, Delivery
from .observability import logs
from .observability.counters import Counters
from .sinks import Sink, make_sink
from .sources import RelpSource, SourceContext, TcpSource, TlsSource, UdpSource, split_hostport
from .sources.guard import Allow
from .tlscontext import ServerTls, TlsFileError, build_context, tls_needed

# Settings applied live, each by the part of the daemon that owns it. Anything else that
# changes (spool.*, status.listen, log.level, a setting added later and not listed here) is
# kept as it runs, with a warning that a restart is needed: never silently claimed applied.
SINK = frozenset(f"intake.{k}" for k in (
    "url", "region", "key", "key_file", "endpoint", "gzip", "ca_file", "insecure_skip_verify",
    "proxy", "timeout", "concurrency"))
FILTER = frozenset({"filter.programs", "filter.keep_tag"})
BATCH = frozenset(f"batch.{k}" for k in ("max_events", "max_bytes", "max_delay", "idle_flush"))
BACKOFF = frozenset({"intake.retry_max", "intake.auth_retry"})
IN_FLIGHT = frozenset({"batch.max_in_flight"})
LISTENERS = frozenset({"listen.tcp", "listen.udp", "listen.tls", "listen.relp"})
# Applied to the RELP sessions open, too (a narrower window pauses them sooner).
RELP = frozenset({"relp.max_window"})
# [tls]: the files are read again at every reload anyway (same paths, new certificate).
TLS = frozenset(f"tls.{k}" for k in ("cert_file", "key_file", "min_version", "client_ca_file",
                                     "allowed_names", "handshake_timeout", "max_handshakes"))
TCP_LIMITS = frozenset(f"listen.{k}" for k in (
    "max_connections", "evict_idle_after", "idle_timeout", "max_connections_per_address",
    "max_buffered_bytes", "allow"))
# Read from the settings each time they are used: replacing the settings applies them.
READ_LIVE = frozenset({"status.stall_after", "log.stats_interval", "shutdown_timeout"})
LIVE = SINK | FILTER | BATCH | BACKOFF | IN_FLIGHT | LISTENERS | TCP_LIMITS | READ_LIVE | TLS
LIVE |= RELP

MASK = "********"
# The same grace as at shutdown (app.TCP_DRAIN_GRACE): senders of a removed listener get as
# long to finish what they were writing.
TCP_DRAIN_GRACE = 2.0

_S = TypeVar("_S", TcpSource, TlsSource, UdpSource, RelpSource)
_T = TypeVar("_T")

# The new config is read in a thread, never on the event loop: a slow or hung filesystem
# must not freeze the daemon (health checks, SIGTERM). Past this it is refused; the thread,
# a daemon thread, cannot keep the process from exiting should it never come back.
LOAD_TIMEOUT = 10.0


def flatten(settings: Settings) -> dict[str, Any]:
    """Dotted name -> plain value (JSON-like), the key masked."""
    out: dict[str, Any] = {}
    for name, value in settings.model_dump(mode="json").items():
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    if settings.intake.key is not None:
        out["intake.key"] = MASK
    return out


def _keys_differ(old: Settings, new: Settings) -> bool:
    a, b = old.intake.key, new.intake.key
    return (a is None) != (b is None) or (
        a is not None and b is not None and a.get_secret_value() != b.get_secret_value()
    )


@dataclass(frozen=True)
class Plan:
    """What a reload does. `changes` and `restart` map a dotted setting to (old, new), the key
    masked; `effective` is the new config with every `restart` setting at its running value."""

    effective: Settings
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    restart: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    tcp_add: list[str] = field(default_factory=list)
    tcp_remove: list[str] = field(default_factory=list)
    udp_add: list[str] = field(default_factory=list)
    udp_remove: list[str] = field(default_factory=list)
    tls_add: list[str] = field(default_factory=list)
    tls_remove: list[str] = field(default_factory=list)
    relp_add: list[str] = field(default_factory=list)
    relp_remove: list[str] = field(default_factory=list)

    def touches(self, names: Iterable[str]) -> bool:
        return any(n in self.changes for n in names)

    @property
    def sink(self) -> bool:
        return self.touches(SINK)

    @property
    def workers(self) -> bool:
        return "intake.concurrency" in self.changes

    @property
    def filter(self) -> bool:
        return self.touches(FILTER)

    @property
    def batch(self) -> bool:
        return self.touches(BATCH)

    @property
    def backoff(self) -> bool:
        return self.touches(BACKOFF)

    @property
    def in_flight(self) -> bool:
        return self.touches(IN_FLIGHT)

    @property
    def tcp_limits(self) -> bool:
        return self.touches(TCP_LIMITS)


def _multiset_diff(old: list[str], new: list[str]) -> tuple[list[str], list[str]]:
    """(added, removed), as multisets: an address listed twice is two listeners."""
    a, b = Counter(old), Counter(new)
    return list((b - a).elements()), list((a - b).elements())


def _keep_running(new: Settings, old: Settings, names: Iterable[str]) -> Settings:
    """`new` with the settings `names` put back to their values in `old`."""
    sections: dict[str, BaseModel] = {}
    top: dict[str, Any] = {}
    for name in names:
        section, _, key = name.partition(".")
        if not key:
            top[section] = getattr(old, section)
            continue
        current = sections.get(section, getattr(new, section))
        sections[section] = current.model_copy(update={key: getattr(getattr(old, section), key)})
    return new.model_copy(update={**sections, **top})


def make_plan(old: Settings, new: Settings) -> Plan:
    """Pure: what changed between the running config and the new one, and what to do."""
    before, after = flatten(old), flatten(new)
    changed = {
        name: (before.get(name), after.get(name))
        for name in sorted(before.keys() | after.keys())
        if before.get(name) != after.get(name)
    }
    if _keys_differ(old, new):
        changed["intake.key"] = (before.get("intake.key"), after.get("intake.key"))
    live = {n: v for n, v in changed.items() if n in LIVE}
    restart = {n: v for n, v in changed.items() if n not in LIVE}
    tcp_add, tcp_remove = _multiset_diff(old.listen.tcp, new.listen.tcp)
    udp_add, udp_remove = _multiset_diff(old.listen.udp, new.listen.udp)
    tls_add, tls_remove = _multiset_diff(old.listen.tls, new.listen.tls)
    relp_add, relp_remove = _multiset_diff(old.listen.relp, new.listen.relp)
    return Plan(
        effective=_keep_running(new, old, restart),
        changes=live,
        restart=restart,
        tcp_add=tcp_add,
        tcp_remove=tcp_remove,
        udp_add=udp_add,
        udp_remove=udp_remove,
        tls_add=tls_add,
        tls_remove=tls_remove,
        relp_add=relp_add,
        relp_remove=relp_remove,
    )


# -- applying it to a running daemon --------------------------------------------------------


class Target(Protocol):
    """The running daemon, as a reload sees it."""

    settings: Settings
    log: Any
    counters: Counters
    delivery: Delivery
    collector: Collector
    ctx: SourceContext
    tcp: list[TcpSource]
    udp: list[UdpSource]
    tls: list[TlsSource]
    server_tls: ServerTls

    def new_tls(self, address: str, settings: Settings) -> TlsSource: ...

    relp: list[RelpSource]

    def new_relp(self, address: str, settings: Settings) -> RelpSource: ...

    def new_tcp(self, address: str, settings: Settings) -> TcpSource: ...

    def new_udp(self, address: str, settings: Settings) -> UdpSource: ...


class Refused(Exception):
    """The new config cannot be applied; `problems` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class _Prepared:
    tcp: list[TcpSource] = field(default_factory=list)
    udp: list[UdpSource] = field(default_factory=list)
    sink: Sink | None = None
    bound: list[tuple[str, str, int]] = field(default_factory=list)  # (proto, host, port)
    tls: list[TlsSource] = field(default_factory=list)
    tls_context: ssl.SSLContext | None = None
    tls_before: ServerTls | None = None  # put back if the reload is refused after all
    tls_changed: bool = False  # the files hold something new (a renewed certificate...)
    relp: list[RelpSource] = field(default_factory=list)
    relp_removed: list[RelpSource] = field(default_factory=list)  # set by _commit

    async def undo(self) -> None:
        for t in (*self.tcp, *self.tls):
            await t.stop(0.0)
        for r in self.relp:
            await r.stop(0.0)
        for u in self.udp:
            await u.stop()
        if self.sink is not None:
            await self.sink.aclose()


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
    if new.intake.key is not None:
        # Before anything logs: a new key is masked like the old one (the CLI's loader does
        # it too; a reload must not depend on that).
        logs.add_secret(new.intake.key.get_secret_value())
    return new


async def _prepare(target: Target, plan: Plan) -> _Prepared:
    """Everything that can fail, before anything running is touched."""
    s = plan.effective
    problems: list[str] = []
    try:
        s.require_key()
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise Refused(problems)
    done = _Prepared()
    if tls_needed(s):
        # Read again even if no path changed: the files may hold a renewed certificate.
        try:
            done.tls_context = build_context(s.tls)
        except TlsFileError as exc:
            raise Refused([str(exc)]) from None
    # The client first: a listener bound and then undone could have taken a connection.
    if plan.sink:
        try:
            done.sink = make_sink(s.intake)
        except Exception as exc:  # whatever the new client refuses (a CA file not PEM...)
            problems.append(logs.redact(f"intake: cannot build the client: {exc}"))
    done.tcp = await _open("tcp", plan.tcp_add, lambda a: target.new_tcp(a, s), done, problems)
    if done.tls_context is not None:
        # The listeners added below must handshake with the new files from their first peer.
        done.tls_before = target.server_tls.copy()
        done.tls_changed = target.server_tls.install(done.tls_context, s.tls)
    done.tls = await _open("tls", plan.tls_add, lambda a: target.new_tls(a, s), done, problems)
    done.relp = await _open("relp", plan.relp_add, lambda a: target.new_relp(a, s), done,
                            problems)
    done.udp = await _open("udp", plan.udp_add, lambda a: target.new_udp(a, s), done, problems)
    if problems:
        await done.undo()
        if done.tls_before is not None:
            target.server_tls.restore(done.tls_before)
        raise Refused(problems)
    return done


async def _open(proto: str, addresses: list[str], make: Callable[[str], _S],
                done: _Prepared, problems: list[str]) -> list[_S]:
    """The listeners of `addresses` started, each noted in `done.bound`; one problem line
    per address that cannot be bound (the others stay open, for undo() if any failed)."""
    opened: list[_S] = []
    for addr in addresses:
        src = make(addr)
        try:
            h, p = await src.start()
        except OSError as exc:
            if not isinstance(src, UdpSource):
                await src.stop(0.0)  # never listening; stop() also ends its backpressure hook
            problems.append(f"listen.{proto}: cannot listen on {addr}: {exc.strerror or exc}")
            continue
        opened.append(src)
        done.bound.append((proto, h, p))
    return opened


def _commit(target: Target, plan: Plan, ready: _Prepared) -> tuple[list[TcpSource],
                                                                   list[UdpSource]]:
    """The swaps: nothing here can fail, nothing here closes a connection or drops a batch."""
    s = plan.effective
    if plan.filter:
        # The one filter object every reader holds: open connections follow from their next
        # chunk, a frame cut across the reload included.
        target.ctx.filter.update(s.filter.programs, s.filter.keep_tag)
    if plan.batch:
        c = target.collector
        # The open batch closes under the limits it was opened with (a lower max_events must
        # not meet a batch already over it).
        c.flush()
        c.batcher.max_events = s.batch.max_events
        c.batcher.max_bytes = s.batch.max_bytes
        c.max_delay = s.batch.max_delay
        c.idle_flush = min(s.batch.idle_flush, s.batch.max_delay)
    d = target.delivery
    if plan.in_flight:
        d.set_max_in_flight(s.batch.max_in_flight)
    if plan.backoff:
        d.set_backoff(Backoff(s.intake.retry_max, s.intake.auth_retry))
    if ready.sink is not None:
        # Requests on the wire finish on the old client; retries and new batches use this one.
        d.replace_sink(ready.sink)
    if plan.workers:
        d.set_workers(s.intake.concurrency)
    removed_tcp = _take_out(target.tcp, plan.tcp_remove, lambda src: (src.host, src.port))
    removed_udp = _take_out(target.udp, plan.udp_remove, lambda src: (src.host, src.port))
    removed_tls = _take_out(target.tls, plan.tls_remove, lambda src: (src.host, src.port))
    removed_tcp = [*removed_tcp, *removed_tls]  # drained alike
    target.tls.extend(ready.tls)
    ready.relp_removed = _take_out(target.relp, plan.relp_remove,
                                   lambda src: (src.host, src.port))
    target.relp.extend(ready.relp)
    if plan.tcp_limits or plan.touches(RELP):
        for rsrc in target.relp:
            rsrc.configure(s.listen, s.relp)
    target.tcp.extend(ready.tcp)
    target.udp.extend(ready.udp)
    if plan.tcp_limits:
        for src in (*target.tcp, *target.tls):
            src.configure(s.listen)
        for udp in target.udp:
            udp.allow = Allow(s.listen.allow)
    if ready.tls_context is not None:
        # A narrowed allow-list of names (or newly required certificates) applies to the
        # peers already connected too, as a narrowed listen.allow does.
        for tsrc in target.tls:
            if tsrc.gate is not None:
                tsrc.gate.recheck(tsrc.connections)
        for rsrc in target.relp:
            if rsrc.gate is not None:  # none without relp.tls
                rsrc.gate.recheck(rsrc.connections)
    target.settings = s
    return removed_tcp, removed_udp


def _take_out(sources: list[_S], addresses: list[str],
              where: Callable[[_S], tuple[str, int]]) -> list[_S]:
    """Remove (in place) and return one source per address in `addresses`."""
    out: list[_S] = []
    for addr in addresses:
        want = split_hostport(addr)
        for src in sources:
            if where(src) == want:
                sources.remove(src)
                out.append(src)
                break
    return out


async def apply(target: Target, new: Settings) -> Plan:
    """Apply `new` to the running daemon; Refused (nothing changed) if it cannot be."""
    plan = make_plan(target.settings, new)
    ready = await _prepare(target, plan)
    removed_tcp, removed_udp = _commit(target, plan, ready)
    log = target.log
    if ready.tls_changed:
        log.info("tls_certificate_loaded", cert_file=str(plan.effective.tls.cert_file),
                 fingerprint=target.server_tls.fingerprint, reload=True,
                 action="new connections get it; open ones keep theirs")
    for proto, host, port in ready.bound:
        log.info("listening", proto=proto, host=host, port=port, reload=True)
    # Closed like at shutdown: no more accepts, a FIN, then what senders already wrote is read
    # (the drain, up to the grace, goes on after the `reloaded` line).
    grace = min(TCP_DRAIN_GRACE, plan.effective.shutdown_timeout)
    drains = [asyncio.create_task(t.stop(grace)) for t in removed_tcp]
    drains += [asyncio.create_task(r.stop(grace)) for r in ready.relp_removed]
    for u in removed_udp:
        await u.stop()
    await asyncio.sleep(0)  # the drains' first step: accepting stops, FINs go out
    log.info("reloaded", changes={k: list(v) for k, v in plan.changes.items()},
             restart_needed=sorted(plan.restart))
    for name, (running, configured) in plan.restart.items():
        log.warning("reload_restart_needed", setting=name, running=running,
                    configured=configured, action="the running value is kept until a restart")
    await asyncio.gather(*drains)
    for t in removed_tcp:
        log.info("listener_closed", proto=t.proto, host=t.host, port=t.port)
    for u in removed_udp:
        log.info("listener_closed", proto="udp", host=u.host, port=u.port)
    for r in ready.relp_removed:
        log.info("listener_closed", proto="relp", host=r.host, port=r.port)
    return plan


async def reload(target: Target, loader: Callable[[], Settings] | None) -> bool:
    """One reload, logged and counted; True if the new config is in force. The file is read
    off the event loop (config.load reads only a regular file, and refuses an empty one)."""
    try:
        await apply(target, await read_new(loader))
    except Refused as exc:
        for problem in exc.problems:
            target.log.error("reload_failed", problem=problem,
                             action="the running config stays in force")
        target.counters.reload_failures += 1
        return False
    target.counters.reloads += 1
    return True
