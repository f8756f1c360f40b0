"""The one registry of counters every component writes to, the spool included.

Plain int attributes on slotted dataclasses: incrementing them is the cheapest thing Python
can do, which matters on the per-chunk path; nothing here takes a lock or calls a metrics
library. /metrics reads them at scrape time (observability/prometheus.py). One name per
thing: the flat names of `snapshot()` are the `stats` log line and `spool stats`; /metrics
exports the same names as haproxy_forwarder_<name>_total, split by labels where they belong
(per intake, per listener, per framing, per reason, per status class).

Several intakes (issue 19): `Registry.counters` are the global counters (listeners, reloads,
accept errors, unrouted events); each intake's pipeline (collector, delivery, spool, dead
letters) writes to its own `Counters`, `Registry.intake(name)`, kept for good once created so
that a reload removing an intake never makes a total go down. Which fields are per intake:
INTAKE_FIELDS. The flat snapshot sums the global counters and every intake's.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

# Label values of `framing` on the per-listener frame counters.
OCTET = "octet"
LF = "lf"
DATAGRAM = "datagram"

# Upper bounds (seconds) of the intake request latency histogram: a loopback answer takes a
# few ms, a healthy intake tens to hundreds, a struggling one seconds, the timeout is 30 s.
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# Present from the start (at 0), so that rate() and increase() work from the first scrape.
STATUS_CLASSES = ("2xx", "4xx", "5xx", "network")
DEAD_LETTER_REASONS = ("rejected", "too_large", "oversized", "internal")
# Why events were lost for good (`reason` label of dropped_events). Each is also a
# rate-limited warning where it happens: a drop is never only a debug line.
#   spool_full: when_full = "drop_oldest" deleted un-acked events to make room;
#   spool_corrupt: a spool record failed its checksum (at open or when read back);
#   dead_letter_full / dead_letter_failed: a refused event could not be dead-lettered;
#   shutdown: still in memory when the shutdown timeout ran out and the spool refused them.
DROP_REASONS = ("spool_full", "spool_corrupt", "dead_letter_full", "dead_letter_failed",
                "shutdown")
# Why events went to no intake (`reason` label of unrouted_events; routing.UnroutedReason,
# spelled again here so that this module imports nothing of the package): a `drop = true`
# route matched them, or no route did.
UnroutedReason = Literal["drop", "no_route"]
UNROUTED_REASONS: tuple[UnroutedReason, ...] = ("drop", "no_route")
# The name of the one intake of a config with a single [intake] (config.DEFAULT_INTAKE).
DEFAULT_INTAKE = "default"


@dataclass(slots=True)
class SpoolCounters:
    """What the disk spool did; exported with the prefix `spool_`."""

    appended_batches: int = 0
    appended_events: int = 0
    acked_batches: int = 0
    acked_events: int = 0
    # when_full = "drop_oldest": un-acked batches deleted to make room (lost, and said so)
    dropped_batches: int = 0
    dropped_events: int = 0
    # dropped from disk while handed out: still delivered from memory, only not durable
    evicted_inflight: int = 0
    rejected_full: int = 0  # when_full = "block": appends refused (input held back)
    write_errors: int = 0
    space_reclaims: int = 0  # ENOSPC answered by deleting fully acked segments
    ack_write_errors: int = 0  # an ack not persisted: a duplicate after a restart
    delete_errors: int = 0
    quarantined_segments: int = 0
    repair_errors: int = 0
    corrupt_records: int = 0  # records that failed their checksum (at open or when read)
    # the events of those records, where the record's header was still readable (else unknown)
    corrupt_events: int = 0
    # un-acked events found at open (left by the previous run): input of this process, like
    # accepted_events, in the accounting identity
    recovered_events: int = 0
    purged_batches: int = 0
    purged_events: int = 0

    def snapshot(self) -> dict[str, int]:
        return {f"spool_{k}": v for k, v in asdict(self).items()}


@dataclass(slots=True, eq=False)
class FramingCounters:
    """One listener's frames in one framing: a TCP connection picks its object once, when its
    first byte decides the framing, and then only adds to it."""

    frames: int = 0
    framing_errors: int = 0


# Why a TLS peer was refused before any byte of it was read (`reason` label).
TLS_REFUSALS = ("no_certificate", "untrusted", "name_not_allowed", "handshake_timeout",
                "protocol_error", "closed_in_handshake", "too_many_handshakes")


@dataclass(slots=True, eq=False)
class TlsCounters:
    """A TLS listener's handshakes: completed, and refused by reason."""

    handshakes: int = 0
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TLS_REFUSALS, 0))


# RELP commands counted by name (`command` label); any other name is counted as "other".
RELP_COMMANDS = ("open", "syslog", "close", "other")
# Upper bounds (seconds) of the RELP acknowledgement latency: batch.idle_flush (50 ms) plus
# an fsync at best, batch.max_delay plus a slow disk or intake at worst.
ACK_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True, eq=False)
class RelpCounters:
    """A RELP listener's sessions, commands, session-ending errors and acknowledgements."""

    sessions: int = 0  # sessions opened (an `open` answered 200)
    commands: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RELP_COMMANDS, 0))
    # Sessions ended for a protocol error or aborted by us (a message lost before it was
    # durable, a close never answered), by reason (relp.ERROR_REASONS; filled on first use).
    frame_errors: dict[str, int] = field(default_factory=dict)
    acks: int = 0  # syslog commands answered "200 OK"
    ack_buckets: list[int] = field(default_factory=lambda: [0] * (len(ACK_BUCKETS) + 1))
    ack_seconds: float = 0.0

    def command(self, name: str, n: int = 1) -> None:
        key = name if name in self.commands else "other"
        self.commands[key] += n

    def acked(self, n: int, seconds: float) -> None:
        """`n` messages answered after `seconds` (one durability wait, one observation)."""
        self.acks += n
        self.ack_buckets[bisect_left(ACK_BUCKETS, seconds)] += 1
        self.ack_seconds += seconds


@dataclass(slots=True, eq=False)
class ListenerCounters:
    """One listener's input; `name` ("tcp://127.0.0.1:1514") is its `listener` label."""

    name: str
    connections_accepted: int = 0
    connections_refused: int = 0
    connections_evicted: int = 0
    connections_idle_closed: int = 0  # listen.idle_timeout: no complete frame for that long
    connections_shed: int = 0  # listen.max_buffered_bytes: closed for holding the most
    access_denied: int = 0  # connections (TCP) or datagrams (UDP) from outside listen.allow
    received_bytes: int = 0
    oversized_frames: int = 0
    udp_dropped: int = 0
    # UDP datagrams the kernel dropped (receive queue full): kept by the kernel, copied in by
    # `refresh` when read (scrape, stats line), so nothing is done per datagram.
    udp_kernel_dropped: int = 0
    # listen.proxy_protocol: headers read (the connection then stands for their source),
    # and connections refused for their header (by PROXY_REFUSALS reason; filled on use).
    proxy_headers: int = 0
    proxy_refused: dict[str, int] = field(default_factory=dict)
    framings: dict[str, FramingCounters] = field(default_factory=dict)
    refresh: Callable[[], None] | None = None
    tls: TlsCounters | None = None  # set on listeners that speak TLS
    relp: RelpCounters | None = None  # set on RELP listeners

    def framing(self, name: str) -> FramingCounters:
        fc = self.framings.get(name)
        if fc is None:
            fc = self.framings[name] = FramingCounters()
        return fc


# The per-listener counters, summed over listeners in the flat snapshot.
LISTENER_FIELDS = tuple(
    f.name for f in fields(ListenerCounters)
    if f.name not in ("name", "framings", "refresh", "tls", "relp", "proxy_refused")
)


@dataclass(slots=True, eq=False)
class RequestStats:
    """Intake requests, recorded once per HTTP request (never per event)."""

    # buckets[i]: requests that took at most DURATION_BUCKETS[i] (and more than the bound
    # before it); the last one, slower than every bound (le="+Inf" once accumulated).
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    by_class: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUS_CLASSES, 0))
    # 401/403: the intake refuses the key (what the IntakeKeyRejected alert watches).
    key_rejected: int = 0

    def observe(self, seconds: float, status: int | None) -> None:
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds
        cls = "network" if status is None else f"{status // 100}xx"
        self.by_class[cls] = self.by_class.get(cls, 0) + 1
        if status in (401, 403):
            self.key_rejected += 1


@dataclass(slots=True)
class Counters:
    # input: the listeners' counters (`listeners`), summed in snapshot()
    # filter
    filtered_out: int = 0
    # Events no route sends to an intake (a `drop = true` route, or no route matched), the
    # sum of unrouted_reasons: global only, and outside the accounting identity (like
    # filtered_out, they never became an intake's events).
    unrouted_events: int = 0
    accepted_events: int = 0
    # header times that were no real date/time (the reception time was used instead)
    invalid_timestamps: int = 0
    # delivery
    batches_sent: int = 0
    delivered_events: int = 0
    delivered_batches: int = 0
    retries: int = 0
    uncertain_deliveries: int = 0
    # 413 on a single small event (a proxy's body limit): kept and retried slowly
    body_limit_refusals: int = 0
    dead_lettered_events: int = 0  # the sum of dead_letter_reasons
    requeued_events: int = 0
    dropped_events: int = 0  # lost for good: the sum of drop_reasons
    # SIGHUP: configs applied, and configs refused (the running one stayed)
    reloads: int = 0
    reload_failures: int = 0
    # connections closed, or accept() failing, for want of file descriptors (descriptors.py)
    accept_errors: int = 0
    spool: SpoolCounters = field(default_factory=SpoolCounters)
    listeners: list[ListenerCounters] = field(default_factory=list)
    requests: RequestStats = field(default_factory=RequestStats)
    dead_letter_reasons: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(DEAD_LETTER_REASONS, 0))
    drop_reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    unrouted_reasons: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(UNROUTED_REASONS, 0))

    def add_listener(self, lc: ListenerCounters) -> None:
        """A listener just bound; its counters stay after it closes: totals never go down."""
        self.listeners.append(lc)

    def dead_lettered(self, events: int, reason: str) -> None:
        self.dead_lettered_events += events
        self.dead_letter_reasons[reason] = self.dead_letter_reasons.get(reason, 0) + events

    def dropped(self, events: int, reason: str) -> None:
        self.dropped_events += events
        self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + events

    def unrouted(self, events: int, reason: UnroutedReason) -> None:
        """`events` sent to no intake, for `reason` (on the global counters)."""
        self.unrouted_events += events
        self.unrouted_reasons[reason] += events

    def refresh_listeners(self) -> None:
        """Bring in the counts kept outside the process (the kernel's UDP drops)."""
        for lc in self.listeners:
            if lc.refresh is not None:
                lc.refresh()

    def snapshot(self) -> dict[str, int]:
        self.refresh_listeners()
        out = {name: getattr(self, name) for name in SCALAR_FIELDS}
        for name in LISTENER_FIELDS:
            out[name] = sum(getattr(lc, name) for lc in self.listeners)
        out["proxy_refused"] = sum(sum(lc.proxy_refused.values()) for lc in self.listeners)
        framings = [fc for lc in self.listeners for fc in lc.framings.values()]
        out["received_frames"] = sum(fc.frames for fc in framings)
        out["framing_errors"] = sum(fc.framing_errors for fc in framings)
        tls = [lc.tls for lc in self.listeners if lc.tls is not None]
        out["tls_handshakes"] = sum(t.handshakes for t in tls)
        out["tls_handshakes_refused"] = sum(sum(t.refused.values()) for t in tls)
        relp = [lc.relp for lc in self.listeners if lc.relp is not None]
        out["relp_sessions"] = sum(r.sessions for r in relp)
        out["relp_commands"] = sum(sum(r.commands.values()) for r in relp)
        out["relp_frame_errors"] = sum(sum(r.frame_errors.values()) for r in relp)
        out["relp_acks"] = sum(r.acks for r in relp)
        out.update(self.spool.snapshot())
        return out


# Plain int counters of `Counters`, exported as they are (fields added later included).
SCALAR_FIELDS = tuple(
    f.name for f in fields(Counters)
    if f.name not in ("spool", "listeners", "requests", "dead_letter_reasons", "drop_reasons",
                      "unrouted_reasons")
)

# The counters of `Counters` that belong to an intake: written by its pipeline (collector,
# delivery, spool via `spool`, dead letters) to its own Counters and exported once per intake
# with the label intake="NAME", like the spool_* counters and the intake request counters
# (`requests`: status classes, key rejections, latency histogram). Every other scalar is
# exported unlabelled, as its total over the global counters and every intake's: those only
# the global side writes (reloads, reload_failures, accept_errors, unrouted_events; the
# listeners' counters, by listener) and those both sides may write (filtered_out and
# invalid_timestamps: each intake's collector counts them, so does a global reader).
INTAKE_FIELDS: tuple[str, ...] = (
    "accepted_events", "batches_sent", "delivered_events", "delivered_batches", "retries",
    "uncertain_deliveries", "body_limit_refusals", "dead_lettered_events", "requeued_events",
    "dropped_events",
)
# Written by the global side only: not in an intake's flat snapshot (`intake_snapshot`).
GLOBAL_FIELDS: tuple[str, ...] = ("reloads", "reload_failures", "accept_errors",
                                  "unrouted_events")
# Written by either side: exported as the total, and in an intake's flat snapshot its own.
SHARED_FIELDS: tuple[str, ...] = ("filtered_out", "invalid_timestamps")


def holds_intake_counts(c: Counters) -> bool:
    """Something counted on `c` what belongs to an intake (see Registry.intake_parts)."""
    q = c.requests
    return (any(getattr(c, f) for f in INTAKE_FIELDS)
            or any(v for v in c.spool.snapshot().values())
            or any(q.buckets) or q.key_rejected > 0)


Combine = Callable[[list[float]], float]


@dataclass(frozen=True, slots=True)
class LabelledGauge:
    """A gauge read at scrape time with labels: `read()` returns {label values: value}."""

    labels: tuple[str, ...]
    read: Callable[[], Mapping[tuple[str, ...], float]]
    # How the flat snapshot (and an intake's, over its other labels) folds the values.
    combine: Combine


def _as_tuples(read: Callable[[], Mapping[Any, float]]
               ) -> Callable[[], Mapping[tuple[str, ...], float]]:
    def wrapped() -> Mapping[tuple[str, ...], float]:
        return {(k,): v for k, v in read().items()}
    return wrapped


def _combined(combine: Combine, values: Iterable[float]) -> float:
    got = [float(v) for v in values]
    return float(combine(got)) if got else 0.0


class Registry:
    """Counters (global and per intake) plus gauges read at scrape time from the components
    that own them."""

    def __init__(self, info: dict[str, str] | None = None) -> None:
        # The global counters: listeners, filter, reloads, accept errors, unrouted events.
        self.counters = Counters()
        # Each intake's counters by name, created by `intake()` and kept for good (a reload
        # removing the intake keeps its totals). Read-only outside this class.
        self.intakes: dict[str, Counters] = {}
        self._gauges: dict[str, Callable[[], float]] = {}
        self._labelled: dict[str, LabelledGauge] = {}
        # Labels of the build_info metric: version, which ingest and gzip implementations run.
        self.info: dict[str, str] = dict(info or {})

    def intake(self, name: str) -> Counters:
        """The counters of intake `name` (its name, never its key), created on first call."""
        c = self.intakes.get(name)
        if c is None:
            c = self.intakes[name] = Counters()
        return c

    def all_counters(self) -> list[Counters]:
        """The global counters, then every intake's."""
        return [self.counters, *self.intakes.values()]

    def intake_parts(self) -> dict[str, list[Counters]]:
        """{intake name: the Counters its per-intake series add up}: each intake's own, and,
        under DEFAULT_INTAKE, the global counters too when they hold per-intake counts (a
        component given the global counters rather than an intake's: a single-pipeline build,
        a tool) or when no intake was registered at all, so that those counts are exported
        under one label set and the sum over intakes stays the flat snapshot's."""
        out = {name: [c] for name, c in self.intakes.items()}
        if not out or holds_intake_counts(self.counters):
            out.setdefault(DEFAULT_INTAKE, []).append(self.counters)
        return out

    def total(self, name: str) -> int:
        """A scalar counter summed over the global counters and every intake's."""
        return sum(int(getattr(c, name)) for c in self.all_counters())

    def _check_new(self, name: str) -> None:
        if name in self._gauges or name in self._labelled:
            raise ValueError(f"gauge {name!r} registered twice")

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._check_new(name)
        self._gauges[name] = read

    def labelled_gauge(self, name: str, label: str | tuple[str, ...],
                       read: Callable[[], Mapping[Any, float]],
                       combine: Combine = sum) -> None:
        """A gauge with labels. One label (`label` a str): `read` returns {label value: value}
        (e.g. per listener, per intake); several (a tuple, e.g. ("intake", "where")): `read`
        returns {tuple of label values: value}. `combine` folds the values into the flat
        snapshot's one number (sum; max for an age, min for a timestamp...), and, for a gauge
        with the label "intake" and others, an intake's values into its snapshot's."""
        self._check_new(name)
        if isinstance(label, str):
            self._labelled[name] = LabelledGauge((label,), _as_tuples(read), combine)
        else:
            self._labelled[name] = LabelledGauge(tuple(label), read, combine)

    def gauges(self) -> dict[str, float]:
        return {name: float(read()) for name, read in self._gauges.items()}

    def labelled_gauges(self) -> dict[str, tuple[tuple[str, ...], dict[tuple[str, ...], float]]]:
        """{name: (label names, {label values: value})}, read now."""
        return {name: (g.labels, {tuple(k): float(v) for k, v in g.read().items()})
                for name, g in self._labelled.items()}

    def snapshot(self) -> dict[str, float]:
        """Everything, flat: counters summed over the global counters and every intake's,
        labelled gauges folded by their `combine`. The `stats` log line."""
        out: dict[str, float] = {}
        for c in self.all_counters():
            for k, v in c.snapshot().items():
                out[k] = out.get(k, 0) + v
        out.update(self.gauges())
        for name, g in self._labelled.items():
            out[name] = _combined(g.combine, g.read().values())
        return out

    def intake_snapshot(self, name: str) -> dict[str, float]:
        """Intake `name`, flat: its counters (INTAKE_FIELDS and spool_* as exported under its
        label; filtered_out and invalid_timestamps its collector counted) and the values of the
        labelled gauges with the label "intake" for it. The per-intake `stats` line and the
        per-intake lines of `status`."""
        parts = self.intake_parts().get(name, [])
        own = self.intakes.get(name)
        out: dict[str, float] = {f: sum(getattr(c, f) for c in parts) for f in INTAKE_FIELDS}
        for f in SHARED_FIELDS:
            out[f] = getattr(own, f) if own is not None else 0
        for c in parts:
            for k, v in c.spool.snapshot().items():
                out[k] = out.get(k, 0) + v
        if not parts:
            out.update(SpoolCounters().snapshot())
        for gname, g in self._labelled.items():
            if "intake" not in g.labels:
                continue
            i = g.labels.index("intake")
            values = [v for k, v in g.read().items() if k[i] == name]
            if values:
                out[gname] = _combined(g.combine, values)
        return out
