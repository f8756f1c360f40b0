"""The event ledger: what was sent, against what the intake took and the dead letters hold,
every difference explained by a cause or counted as unaccounted. Pure: data in, a report out.

Every sent event ends in one of:
- delivered (once, or more: each extra copy needs a cause, below);
- dead-lettered (a line in spool.dir/dead-letter/, with its reason); an event dead-lettered
  for a 400 must have been in a body the intake answered 400;
- missing, and then explained by one of these causes:
    udp_while_down     UDP sent while no daemon was reading (stopping, killed, starting);
    send_failed        part of a TCP write that failed (the connection reset by a kill);
    kill_in_flight     TCP/UDP sent to a run later killed (-9), past what that run had read
                       at the scrape just before the kill: in kernel buffers or read after it;
    corrupt            in the un-acked spool record the soak damaged: within the daemon's
                       dropped_events{reason="spool_corrupt"};
  or else the daemon read it and must have counted its loss. Per run: UDP first against
  that run's udp_dropped + udp_kernel_dropped (udp_counted); for a killed run, then against
  what it held in memory at its last scrape (kill_in_memory: what a kill -9 may lose); what
  is left (RELP always: rsyslog resends whatever was not acknowledged, so RELP has no kill
  excuse) against the dropped_events{reason} of all runs together (dropped). What exceeds
  the bounds is UNACCOUNTED.

A copy beyond the first is explained when the earlier outcome was a dead letter that
`spool replay-dead-letter` re-queued; when it was taken from a run later killed (-9) and the
next one from a later run (the record's ack was not on disk yet, or parts of its batch were
still to send); when it was uncertain (no answer written, an answer after intake.timeout, or
an answer in the last second of its process); or, for RELP, when the daemon stopped between
the event's sending and the later copy (omrelp resends what was not answered). Else it is an
unexplained duplicate.
"""

from __future__ import annotations

import bisect
import itertools
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .events import MAYBE, SOURCE_NAMES, SOURCES, UNSENT, SentLog, unkey
from .intake import Request
from .metrics import Scrape
from .spoolfault import Flip

DROP_REASONS = ("spool_full", "spool_corrupt", "dead_letter_full", "dead_letter_failed",
                "shutdown")
# An answer written this close to its process's exit may have come too late to be acked.
EXIT_MARGIN = 1.0
# An answer this close to intake.timeout may have come after the daemon gave up.
TIMEOUT_MARGIN = 0.3


@dataclass
class RunInfo:
    """One daemon process: when it ran, how it ended, what it said about itself."""

    index: int
    config: dict[str, Any]
    t_spawn: float
    t_started: float = float("inf")
    t_signal: float = float("inf")  # the stop signal (or the kill)
    t_exit: float = float("inf")
    end: str = ""  # "term", "kill", "final", "died" (exited by itself)
    last: Scrape | None = None  # the last /metrics answer
    first: Scrape | None = None  # the first, after start (recovery counts)
    before_kill: Scrape | None = None
    stopped: dict[str, Any] | None = None  # its `stopped` log line
    opened: dict[str, Any] | None = None  # its spool_opened / spool_recovered_* line
    flip: Flip | None = None  # done after this run stopped, before the next
    reloads: int = 0
    reload_failures: int = 0

    def counter(self, flat: str, metric: str | None = None) -> int:
        """The run's final value of a counter: the `stopped` line when there is one, else
        the last scrape (stale for a killed run: what it did after that is unknown)."""
        if self.stopped is not None and flat in self.stopped:
            return int(self.stopped[flat])
        scrape = self.before_kill or self.last
        if scrape is None:
            return 0
        return int(scrape.get(metric or f"{flat}_total"))

    def drops(self) -> dict[str, int]:
        """dropped_events by reason: the last scrape's labels, and whatever the `stopped`
        line adds after it (only shutdown can drop once the status endpoint is closed)."""
        scrape = self.before_kill or self.last
        out = {r: 0 for r in DROP_REASONS}
        if scrape is not None:
            for reason, v in scrape.by_label("dropped_events_total", "reason").items():
                out[reason] = out.get(reason, 0) + int(v)
        late = self.counter("dropped_events") - sum(out.values())
        if late > 0:
            out["shutdown"] += late
        return out


@dataclass
class DeadLetter:
    key: int
    reason: str
    status: int | None
    replayed: bool = False  # moved away by `spool replay-dead-letter`: sent again after


@dataclass
class Report:
    sent: dict[str, int] = field(default_factory=dict)
    maybe: dict[str, int] = field(default_factory=dict)
    delivered_once: int = 0
    duplicated_events: int = 0
    extra_copies: Counter[str] = field(default_factory=Counter)
    dead_lettered: Counter[str] = field(default_factory=Counter)
    dead_letter_not_carried: int = 0
    missing: Counter[str] = field(default_factory=Counter)  # cause -> events
    missing_by_source: Counter[str] = field(default_factory=Counter)
    bounds: dict[str, tuple[int, int]] = field(default_factory=dict)  # cause -> (used, bound)
    unaccounted: Counter[str] = field(default_factory=Counter)
    phantom: int = 0
    altered: int = 0
    foreign: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    udp_counters: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def example(self, what: str, text: str) -> None:
        ex = self.examples.setdefault(what, [])
        if len(ex) < 5:
            ex.append(text)

    @property
    def failed(self) -> bool:
        return bool(sum(self.unaccounted.values()) or self.phantom or self.altered
                    or self.foreign or self.dead_letter_not_carried
                    or self.extra_copies.get("UNEXPLAINED") or self.problems)


@dataclass
class Inputs:
    logs: dict[str, SentLog]
    delivered: list[Request]
    refused_400: list[Request]
    dead_letters: list[DeadLetter]
    runs: list[RunInfo]
    flips: list[Flip]
    intake_timeout: float
    altered: int = 0
    foreign: int = 0


class _Outcome:
    """Where one copy of an event went: a request of the intake (2xx or 400)."""

    __slots__ = ("answered", "replayed", "t0", "t1")

    def __init__(self, r: Request) -> None:
        self.t0, self.t1, self.answered = r.t0, r.t1, r.answered
        self.replayed = False  # its dead letter was re-queued: a later copy is due


class Ledger:
    def __init__(self, inp: Inputs) -> None:
        self.inp = inp
        self.report = Report()
        runs = inp.runs
        self._spawns = [r.t_spawn for r in runs]
        self._starts = [r.t_started for r in runs]
        self._stops = sorted(r.t_signal for r in runs if r.t_signal != float("inf"))
        self._kills = sorted(r.t_signal for r in runs if r.end == "kill")

    # -- helpers ------------------------------------------------------------------------------
    def run_at(self, t: float) -> RunInfo | None:
        i = bisect.bisect_right(self._spawns, t) - 1
        return self.inp.runs[i] if i >= 0 else None

    def _uncertain(self, o: _Outcome) -> bool:
        if not o.answered or o.t1 - o.t0 >= self.inp.intake_timeout - TIMEOUT_MARGIN:
            return True
        run = self.run_at(o.t0)
        return run is not None and o.t1 >= run.t_exit - EXIT_MARGIN

    def _between(self, times: list[float], a: float, b: float) -> bool:
        i = bisect.bisect_right(times, a)
        return i < len(times) and times[i] < b

    def _copy_cause(self, src: str, sent_t: float, prev: _Outcome, nxt: _Outcome) -> str:
        if prev.replayed:
            return "after a dead-letter replay"
        first_run, next_run = self.run_at(prev.t0), self.run_at(nxt.t0)
        if first_run is not None and first_run.end == "kill" and next_run is not first_run:
            # Taken by the intake from a run later killed, before that run's ack was on disk
            # (or with parts of its batch still to send): the record is replayed.
            return "after kill -9"
        if self._uncertain(prev):
            return "after an uncertain delivery"
        if src == "R" and self._between(self._stops, sent_t, nxt.t0):
            return "RELP resend after a stop"
        return "UNEXPLAINED"

    # -- the ledger ---------------------------------------------------------------------------
    def build(self) -> Report:
        inp, rep = self.inp, self.report
        rep.altered, rep.foreign = inp.altered, inp.foreign
        n = {src: len(inp.logs[src]) for src in SOURCES}
        outcomes: dict[str, array[int]] = {s: array("H", bytes(2 * n[s])) for s in SOURCES}
        first: dict[str, array[int]] = {s: array("i", [-1]) * n[s] for s in SOURCES}
        requests: list[_Outcome] = []
        extra: dict[int, list[int]] = {}

        def note(k: int, req: int) -> None:
            src, seq = unkey(k)
            if seq >= n[src] or inp.logs[src].states[seq] == UNSENT:
                rep.phantom += 1
                rep.example("phantom", f"{src}{seq:09d}")
                return
            if outcomes[src][seq] == 0:
                first[src][seq] = req
            else:
                extra.setdefault(k, [first[src][seq]]).append(req)
            outcomes[src][seq] = min(outcomes[src][seq] + 1, 65535)

        for r in inp.delivered:
            requests.append(_Outcome(r))
            for k in r.ids:
                note(k, len(requests) - 1)
        # Dead letters: each is an outcome too; a 400 one is matched to the 400 request that
        # carried it (FIFO per event), the others have no request (kept as their own copy).
        carried: dict[int, list[int]] = {}
        for r in inp.refused_400:
            requests.append(_Outcome(r))
            for k in r.ids:
                carried.setdefault(k, []).append(len(requests) - 1)
        for dl in inp.dead_letters:
            rep.dead_lettered[f"{dl.reason} ({dl.status})"] += 1
            reqs = carried.get(dl.key)
            if dl.status == 400 and not reqs:
                rep.dead_letter_not_carried += 1
                rep.example("dead-lettered for 400 but in no body answered 400",
                            "{}{:09d}".format(*unkey(dl.key)))
                continue
            if reqs:
                req = reqs.pop(0)
                requests[req].replayed = requests[req].replayed or dl.replayed
                note(dl.key, req)
            else:
                # No request to time it by (e.g. over 250 KiB): counted once, never a copy.
                src, seq = unkey(dl.key)
                if seq < n[src] and outcomes[src][seq] == 0:
                    outcomes[src][seq] = 1
                else:
                    note(dl.key, -1)

        self._duplicates(extra, requests)
        self._missing(n, outcomes)
        return rep

    def _duplicates(self, extra: dict[int, list[int]], requests: list[_Outcome]) -> None:
        rep = self.report
        rep.duplicated_events = len(extra)
        for k, reqs in extra.items():
            src, seq = unkey(k)
            sent_t = self.inp.logs[src].times[seq]
            known = sorted((requests[i] for i in reqs if i >= 0), key=lambda o: o.t0)
            if len(known) < len(reqs):
                rep.extra_copies["UNEXPLAINED"] += len(reqs) - len(known)
            for prev, nxt in itertools.pairwise(known):
                cause = self._copy_cause(src, sent_t, prev, nxt)
                rep.extra_copies[cause] += 1
                if cause == "UNEXPLAINED":
                    rep.example("unexplained duplicate",
                                f"{src}{seq:09d}: copies at t={prev.t0:.2f}-{prev.t1:.2f} and "
                                f"t={nxt.t0:.2f}-{nxt.t1:.2f}")

    def _missing(self, n: dict[str, int], outcomes: dict[str, array[int]]) -> None:
        inp, rep = self.inp, self.report
        flipped = {k for f in inp.flips if not f.acked for k in f.ids}
        pending: Counter[str] = Counter()  # cause -> events needing no counter
        read: Counter[tuple[int, str]] = Counter()  # (run, source) -> events read and lost
        by_src: dict[str, Counter[str]] = {}
        for src in SOURCES:
            log = inp.logs[src]
            rep.sent[SOURCE_NAMES[src]] = sum(1 for s in log.states if s != UNSENT)
            rep.maybe[SOURCE_NAMES[src]] = sum(1 for s in log.states if s == MAYBE)
            got = outcomes[src]
            for seq in range(n[src]):
                state = log.states[seq]
                if state == UNSENT:
                    continue
                if got[seq]:
                    if got[seq] == 1:
                        rep.delivered_once += 1
                    continue
                cause = self._cause(src, seq, state, flipped)
                if cause == "read":
                    read[(self._run_of(log.runs[seq], log.times[seq]), src)] += 1
                    rep.example(f"missing {SOURCE_NAMES[src]}, needing a counter",
                                f"{src}{seq:09d} sent at t={log.times[seq]:.2f} to run "
                                f"{log.runs[seq]}")
                else:
                    pending[cause] += 1
                by_src.setdefault(cause, Counter())[SOURCE_NAMES[src]] += 1
                rep.missing_by_source[SOURCE_NAMES[src]] += 1
        self._bounds(pending, read)
        for cause, counts in by_src.items():
            rep.example("missing by source", f"{cause}: {dict(counts)}")

    def _run_of(self, run_i: int, t: float) -> int:
        """The run an event went to: the one up when it was sent, else the next to be up
        (RELP fed into rsyslog meanwhile waits for it)."""
        return run_i if run_i >= 0 else bisect.bisect_right(self._starts, t)

    def _cause(self, src: str, seq: int, state: int, flipped: set[int]) -> str:
        """Why (src, seq) may be missing without a counter, or "read": the daemon took it in
        and must have counted its loss (or, killed, held it in memory)."""
        log, runs = self.inp.logs[src], self.inp.runs
        if (SOURCES.index(src) << 40) | seq in flipped:
            return "corrupt"
        if state == MAYBE:
            return "send_failed"
        if src == "R":
            return "read"
        run_i, t = log.runs[seq], log.times[seq]
        if src == "U" and (run_i < 0 or run_i >= len(runs) or t >= runs[run_i].t_signal):
            return "udp_while_down"
        run = runs[run_i]
        scrape = run.before_kill or run.last
        if run.end != "kill":
            return "read"
        if scrape is None:
            return "kill_in_flight"
        if src == "T":
            got = sum(v for name, v in scrape.by_label("received_bytes_total", "listener").items()
                      if name.startswith("tcp://"))
            return "kill_in_flight" if log.offsets[seq] > got else "read"
        return "kill_in_flight" if t > scrape.t else "read"

    def _bounds(self, pending: Counter[str], read: Counter[tuple[int, str]]) -> None:
        """Events the daemon read and lost, against its counters: per run, UDP's own drop
        counters first, then (killed runs) what the run held in memory at its last scrape;
        what is left against the drop reasons, where an event sent to run r can only have
        been counted by run r or a later one (the spool carries it forward, never back)."""
        rep, runs = self.report, self.inp.runs
        for cause in ("udp_while_down", "send_failed", "kill_in_flight"):
            if pending[cause]:
                rep.missing[cause] = pending[cause]
        drops: Counter[str] = Counter()
        supply: list[int] = []
        for run in runs:
            run_drops = run.drops()
            drops.update(run_drops)
            supply.append(sum(run_drops.values()))
            for name in ("udp_dropped", "udp_kernel_dropped"):
                rep.udp_counters[name] = rep.udp_counters.get(name, 0) + run.counter(name)
        rep.drops = dict(drops)
        demand: list[int] = []
        udp_used = udp_bound = mem_used = mem_bound = 0
        for run in runs:
            udp = read[(run.index, "U")]
            pool = run.counter("udp_dropped") + run.counter("udp_kernel_dropped")
            from_udp = min(udp, pool)
            udp_used, udp_bound = udp_used + from_udp, udp_bound + pool
            rest = udp - from_udp + read[(run.index, "T")] + read[(run.index, "R")]
            if run.end == "kill":
                scrape = run.before_kill or run.last
                held = int(scrape.by_label("events_held", "where").get("memory", 0)) if scrape \
                    else 0
                from_mem = min(rest, held)
                mem_used, mem_bound = mem_used + from_mem, mem_bound + held
                rest -= from_mem
            demand.append(rest)
        # RELP fed after the last run started and never read: no run to count it.
        late = sum(n for (r, _), n in read.items() if r >= len(runs))
        if udp_used:
            rep.missing["udp_counted"] = udp_used
            rep.bounds["udp_counted"] = (udp_used, udp_bound)
        if mem_used:
            rep.missing["kill_in_memory"] = mem_used
            rep.bounds["kill_in_memory"] = (mem_used, mem_bound)
        corrupt_pool = drops["spool_corrupt"]
        if pending["corrupt"]:
            rep.missing["corrupt"] = pending["corrupt"]
            rep.bounds["corrupt"] = (pending["corrupt"], corrupt_pool)
            if pending["corrupt"] > corrupt_pool:
                rep.unaccounted["in the damaged spool record, not counted spool_corrupt"] += (
                    pending["corrupt"] - corrupt_pool)
        # The corruption explained above used spool_corrupt drops: out of the supply, from
        # the first runs that counted some.
        used = min(pending["corrupt"], corrupt_pool)
        for i, run in enumerate(runs):
            take = min(used, run.drops()["spool_corrupt"])
            supply[i] -= take
            used -= take
        left = sum(demand) + late
        if left:
            rep.missing["dropped"] = left
            rep.bounds["dropped"] = (left, sum(supply))
            # Demand at run r may use the supply of runs >= r: the shortfall is the largest
            # deficit over the suffixes (late demand has no run after it at all).
            need, have = late, 0
            worst = late
            for d, s in zip(reversed(demand), reversed(supply), strict=True):
                need, have = need + d, have + s
                worst = max(worst, need - have)
            if worst > 0:
                rep.unaccounted["lost, counted by no drop reason of that run or later"] += worst
