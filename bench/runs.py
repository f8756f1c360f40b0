"""The measurements: burst (throughput, CPU, peak RSS), paced latency, spool replay; and how
the figures of several rounds are told (median and min-max spread)."""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import procs
from .control import Intake
from .stream import Stream, spool_batches

STALL = 20.0  # seconds without a new event at the intake: give up on the run


@dataclass
class Burst:
    sut: str
    frames: int
    expected: int
    received: int = 0
    seconds: float = 0.0  # first byte sent -> last event received
    events_per_s: float = 0.0
    steady_per_s: float = 0.0  # 10 % -> 90 % of the events, excludes start-up and last batch
    send_seconds: float = 0.0  # first byte -> last byte taken by the receiver's kernel
    cpu: float = 0.0  # user + sys of the SUT over the run
    msgs_per_cpu_s: float = 0.0
    peak_rss_mib: float = 0.0  # VmHWM at the end (start-up included)
    rss_start_mib: float = 0.0
    intake_cpu: float = 0.0
    other_cpu: float = 0.0  # CPU used by anything else on the machine meanwhile (noise)
    main_thread_cpu: float = 0.0  # the SUT's main thread (the forwarder's event loop)
    sut_counters: dict[str, Any] = field(default_factory=dict)  # forwarder: final counters
    requests: int = 0
    leaked: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def wait_events(intake: Any, expected: int, deadline: float,
                 alive: Any = None) -> dict[str, Any]:
    last_n, last_change = -1, time.monotonic()
    while True:
        st: dict[str, Any] = intake.stats()
        if st["events"] >= expected:
            return st
        now = time.monotonic()
        if st["events"] != last_n:
            last_n, last_change = st["events"], now
        if now - last_change > STALL or now > deadline:
            st["timeout"] = True
            return st
        if alive is not None and not alive():
            st["died"] = True
            return st
        time.sleep(0.02)


def _rate_between(timeline: list[tuple[float, float]], lo: float, hi: float) -> float:
    t_lo = next((t for t, n in timeline if n >= lo), None)
    t_hi = next((t for t, n in timeline if n >= hi), None)
    if t_lo is None or t_hi is None or t_hi <= t_lo:
        return 0.0
    n_lo = next(n for t, n in timeline if t == t_lo)
    n_hi = next(n for t, n in timeline if t == t_hi)
    return (n_hi - n_lo) / (t_hi - t_lo)


def burst(sut: Any, intake: Any, stream: Stream, timeout: float = 120.0) -> Burst:
    """Start the SUT fresh, push the whole stream as fast as it takes it, until the intake
    has every event.

    `intake` is a bench.control.Intake, or anything that answers reset/stats/timeline and
    has a pid (bench.concentrator.Sink). A SUT with an `expected(count, haproxy)` method says
    how many events must arrive (the concentrator forwards every frame, having no filter);
    otherwise the HAProxy frames must. A SUT with `burst_notes()` adds notes before it stops.
    """
    want = (sut.expected(stream.count, stream.haproxy) if hasattr(sut, "expected")
            else stream.haproxy)
    res = Burst(sut.name, stream.count, want)
    intake.reset("count")
    sut.start()
    try:
        pid = sut.pid
        time.sleep(0.3)  # let start-up CPU settle out of the measured window
        res.rss_start_mib = procs.status_kib(pid, "VmRSS") / 1024
        cpu0 = procs.cpu_seconds(pid)
        main0 = procs.thread_cpu(pid, pid)
        icpu0 = procs.cpu_seconds(intake.pid)
        busy0, self0 = procs.machine_busy(), procs.self_cpu()
        sender = procs.Sender(sut.port, stream.path, stream.offsets, timeout=timeout)
        sender.start()
        st = wait_events(intake, want, time.monotonic() + timeout,
                          alive=lambda: sut.proc.poll() is None)
        cpu1 = procs.cpu_seconds(pid)
        res.main_thread_cpu = procs.thread_cpu(pid, pid) - main0
        res.intake_cpu = procs.cpu_seconds(intake.pid) - icpu0
        res.other_cpu = max(0.0, procs.machine_busy() - busy0 - (cpu1 - cpu0) - res.intake_cpu
                            - (procs.self_cpu() - self0))
        res.peak_rss_mib = procs.status_kib(pid, "VmHWM") / 1024
        res.received = st["events"]
        res.requests = st["requests"]
        res.leaked = st["leaked"]
        res.cpu = cpu1 - cpu0
        res.send_seconds = (sender.t_done - sender.t_first) if sender.t_done else 0.0
        if sender.t_first and st["last_t"]:
            res.seconds = st["last_t"] - sender.t_first
            res.events_per_s = res.received / res.seconds if res.seconds > 0 else 0.0
        res.msgs_per_cpu_s = stream.count / res.cpu if res.cpu > 0 else 0.0
        tl = intake.timeline()
        res.steady_per_s = _rate_between(tl, 0.1 * want, 0.9 * want)
        if st.get("timeout") or st.get("died"):
            why = "died" if st.get("died") else "stalled/timed out"
            res.error = (f"{why}: intake got {res.received} of {want} events"
                         + (f"; sender: {sender.error}" if sender.error else ""))
        elif res.received > want:
            res.notes.append(f"{res.received - want} duplicate events")
        if sender.error and not res.error:
            res.notes.append(f"sender: {sender.error}")
        if res.leaked:
            res.notes.append(f"{res.leaked} filtered-out (sshd) events reached the intake")
        if hasattr(sut, "burst_notes"):
            res.notes += sut.burst_notes(st)
    finally:
        sut.stop()
    res.sut_counters = _final_counters(sut)
    return res


def _final_counters(sut: Any) -> dict[str, Any]:
    """The forwarder's last stats line ("stopped") and how often backpressure engaged."""
    if not hasattr(sut, "logs"):
        return {}
    recs = sut.logs()
    last: dict[str, Any] = next((r for r in reversed(recs) if r.get("event") == "stopped"), {})
    keep = ("batches_sent", "delivered_batches", "spooled_batches", "retries", "dropped_events",
            "filtered_out", "accepted_events", "delivered_events")
    out: dict[str, Any] = {k: last[k] for k in keep if k in last}
    # One name per thing since issue 8: the spool counts what it appended.
    if "spool_appended_batches" in last:
        out["spooled_batches"] = last["spool_appended_batches"]
    out["backpressure_on"] = sum(1 for r in recs if r.get("event") == "backpressure_on")
    return out


@dataclass
class Latency:
    sut: str
    rate: float
    frames: int
    expected: int
    received: int = 0
    unique: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    sender_max_lag_ms: float = 0.0
    achieved_rate: float = 0.0
    cpu_per_s: float = 0.0  # SUT CPU seconds per wall second at this rate
    peak_rss_mib: float = 0.0
    error: str | None = None


def _pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return 0.0
    k = min(len(sorted_vals) - 1, max(0, round(p / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def latency(sut: Any, intake: Intake, stream: Stream, rate: float, frames: int,
            timeout: float = 120.0) -> Latency:
    """Send `frames` frames at a steady `rate`; latency = intake receipt - scheduled send."""
    frames = min(frames, stream.count)
    offsets = stream.offsets[: frames + 1]
    # frames that must arrive: HAProxy ones among the first `frames` (seq < frames)
    res = Latency(sut.name, rate, frames, 0)
    intake.reset("latency")
    sut.start()
    try:
        pid = sut.pid
        time.sleep(0.3)
        cpu0 = procs.cpu_seconds(pid)
        sender = procs.Sender(sut.port, stream.path, offsets, rate=rate, timeout=timeout)
        sender.start()
        sender.join(frames / rate + 60)
        res.sender_max_lag_ms = sender.max_lag * 1000
        if sender.t_done > sender.t_first:
            res.achieved_rate = frames / (sender.t_done - sender.t_first)
        # every HAProxy frame in the first `frames`: count them from the stream itself
        expected = _haproxy_in_prefix(stream, frames)
        res.expected = expected
        st = wait_events(intake, expected, time.monotonic() + timeout,
                          alive=lambda: sut.proc.poll() is None)
        wall = time.monotonic() - sender.t_first
        res.cpu_per_s = (procs.cpu_seconds(pid) - cpu0) / wall if wall > 0 else 0.0
        res.peak_rss_mib = procs.status_kib(pid, "VmHWM") / 1024
        res.received = st["events"]
        times, seqs = intake.latency()
        lat: list[float] = []
        seen: set[int] = set()
        for t, blob in zip(times, seqs, strict=True):
            if not blob:
                continue
            for s in blob.split(b" "):
                seq = int(s)
                if seq in seen:
                    continue
                seen.add(seq)
                lat.append((t - sender.send_time(seq)) * 1000)
        lat.sort()
        res.unique = len(seen)
        res.p50_ms, res.p90_ms = _pct(lat, 50), _pct(lat, 90)
        res.p99_ms, res.max_ms = _pct(lat, 99), (lat[-1] if lat else 0.0)
        if st.get("timeout") or st.get("died") or sender.error:
            res.error = (f"intake got {res.received} of {expected} events"
                         + (f"; sender: {sender.error}" if sender.error else ""))
    finally:
        sut.stop()
    return res


_prefix_cache: dict[tuple[str, int], int] = {}


def _haproxy_in_prefix(stream: Stream, frames: int) -> int:
    key = (str(stream.path), frames)
    if key not in _prefix_cache:
        with stream.path.open("rb") as f:
            data = f.read(stream.offsets[frames])
        _prefix_cache[key] = data.count(b" haproxy[")
    return _prefix_cache[key]


@dataclass
class Replay:
    batches: int
    events: int
    prefill_seconds: float = 0.0
    received: int = 0
    seconds_from_started: float = 0.0  # "started" log line seen -> last event at the intake
    seconds_from_spawn: float = 0.0  # process spawn (interpreter start, spool recovery) -> last
    events_per_s: float = 0.0  # events / seconds_from_started
    events_per_s_spawn: float = 0.0
    cpu: float = 0.0
    peak_rss_mib: float = 0.0
    error: str | None = None


def replay(make_sut: Any, intake: Intake, tmp: Path, batches: int, per_batch: int,
           timeout: float = 120.0) -> Replay:
    # Public spool API only: the prefill is what a daemon would have left behind.
    from haproxy_forwarder.batching import Batch
    from haproxy_forwarder.spool import Spool

    res = Replay(batches, batches * per_batch)
    # Filled once per size and copied for each round: filling 2M events takes longer than
    # replaying them, and every round must replay the same spool.
    template = tmp / f"replay-template-{batches}x{per_batch}"
    t = time.monotonic()
    if not (template / "done").exists():
        shutil.rmtree(template, ignore_errors=True)
        sp = Spool(template / "spool")
        sp.open()
        try:
            for events, times in spool_batches(batches, per_batch):
                sp.append(Batch.from_events(events, times))
        finally:
            sp.close()  # releases the spool's lock for the daemon
        (template / "done").touch()
    spool_dir = tmp / f"replay-spool-{time.monotonic_ns()}"
    shutil.copytree(template / "spool", spool_dir)
    res.prefill_seconds = time.monotonic() - t
    intake.reset("count")
    sut = make_sut(spool_dir)
    sut.start(poll=0.005)
    try:
        st = wait_events(intake, res.events, time.monotonic() + timeout,
                          alive=lambda: sut.proc.poll() is None)
        res.cpu = procs.cpu_seconds(sut.pid)
        res.peak_rss_mib = procs.status_kib(sut.pid, "VmHWM") / 1024
        res.received = st["events"]
        if st["last_t"]:
            res.seconds_from_started = st["last_t"] - sut.t_started
            res.seconds_from_spawn = st["last_t"] - sut.t_spawn
            res.events_per_s = res.received / res.seconds_from_started
            res.events_per_s_spawn = res.received / res.seconds_from_spawn
        if st.get("timeout") or st.get("died"):
            res.error = f"intake got {res.received} of {res.events} events"
    finally:
        sut.stop()
        shutil.rmtree(spool_dir, ignore_errors=True)
    return res


# -- several rounds: median and min-max spread ----------------------------------------------


def spread(values: Sequence[float | None]) -> tuple[float, float, float] | None:
    """(median, min, max) of the measured values; None or 0 is a round without the figure."""
    got = [v for v in values if v]
    if not got:
        return None
    return statistics.median(got), min(got), max(got)


def number(v: float, whole: bool = False) -> str:
    """714,286 / 281 / 66.6 / 1.4: thousands separated, one decimal below 100 unless `whole`."""
    if v >= 100 or whole:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def with_spread(values: Sequence[float | None]) -> str:
    """`714,286 (655,738-769,231)`: the median, then the min-max over the rounds; a single
    measurement alone; `-` when no round has it. Whole numbers (counts) without decimals."""
    s = spread(values)
    if s is None:
        return "-"
    med, lo, hi = s
    got = [v for v in values if v]
    whole = all(float(v).is_integer() for v in got) and float(med).is_integer()
    if len(got) == 1:
        return number(med, whole)
    return f"{number(med, whole)} ({number(lo, whole)}-{number(hi, whole)})"


def ratio_of_medians(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    sa, sb = spread(a), spread(b)
    return sa[0] / sb[0] if sa and sb else None


def ratio_cell(a: Sequence[float | None], b: Sequence[float | None]) -> str:
    """`1.29x (1.10-1.50)`: the ratio of the medians, then the min-max of the ratios taken
    round by round (the two figures of the same round, measured minutes apart at most)."""
    r = ratio_of_medians(a, b)
    if r is None:
        return "-"
    per_round = [x / y for x, y in zip(a, b, strict=False) if x and y]
    if len(per_round) < 2:
        return f"{r:.2f}x"
    return f"{r:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"
