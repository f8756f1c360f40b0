"""`make bench`: haproxy-forwarder against syslog-ng 3.38 and rsyslog as Sekoia's concentrator.

    .venv/bin/python -m bench [--rounds N] [--frames N] [--quick] [--no-syslog-ng]
                              [--no-rsyslog] [--variants-once] [--profile]
                              [--impl default|python] [--json PATH]
    .venv/bin/python -m bench.micro [--frames N] [--impl default|python]   # per stage

Systems under test, each a fresh process per measurement, on the same octet-counted stream:
  haproxy-forwarder   defaults, delivering to a lean fake HTTPS intake (bench/intake.py);
                      also spool.mode = "always", /plain/batch without gzip (syslog-ng's
                      work) and the pure-Python path (HAPROXY_FORWARDER_NO_EXTENSIONS=1);
  syslog-ng 3.38      Debian's, http() to /plain/batch of the same intake (bench/suts.py);
  rsyslog concentrator  Debian's rsyslogd configured as Sekoia's concentrator (imtcp ->
                      ruleset with its LinkedList queue -> omfwd over gtls, octet-counted, RFC
                      5424 with the intake key) to a local TLS sink (bench/concentrator.py).

Rounds (--rounds, 5 by default): each round runs every system once, in an order rotated from
round to round (interleaved, so that a slow minute of the machine does not fall on one
system), then the latency runs, then a spool replay. Every figure is printed as the median
and the min-max over the rounds, e.g. `714,286 (655,738-769,231)`; ratios are those of the
medians, followed by the min-max of the ratios taken within each round.

What it measures (see BENCHMARKS.md for recorded runs):
  burst     a 2,000,000-message stream (--frames) sent with socket.sendfile as fast as the
            system under test reads it: end-to-end events/s (first byte sent -> last event
            received), input messages per CPU-second of the SUT process (user+sys from
            /proc/<pid>/stat, over the burst), peak RSS (VmHWM);
  latency   the same stream paced at 20k msg/s: receipt time at the intake minus the
            scheduled send time of each event's sequence number, p50/p99 (forwarder and
            syslog-ng: the concentrator's sink does not read sequence numbers);
  spool     haproxy-forwarder only: spool.mode = "always" vs "overflow" on the burst, and
            replay of a pre-filled spool (events/s until the intake has everything);
  moved     what the tests used to time, measured once (not per round): the spool scan's
            resync over garbage and the tests' FakeIntake ingest rate (bench.micro).
Everything runs on 127.0.0.1; every child is killed on exit; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from devtools import REPO

from . import micro, procs, runs, suts
from .concentrator import Rsyslog, RsyslogUnavailable, Sink, ensure_rsyslog
from .control import Intake
from .machine import commit, loadavg, machine
from .stream import Stream, load_stream

CACHE = suts.CACHE

# Events per spooled batch in the replay run: batch.max_events' default, as a daemon spools.
REPLAY_PER_BATCH = 10_000
TARGETS = {
    "cpu_ratio": 2.0,  # forwarder input msgs per CPU-s >= 2x syslog-ng (issue 21)
    "cpu_ratio_aim": 3.0,  # ... and the aim: 3x
    "rsyslog_cpu_ratio": 10.0,  # >= 10x rsyslog configured as Sekoia's concentrator
    "eps_ratio": 1.5,  # forwarder end-to-end events/s >= 1.5x syslog-ng
    "rss_mib": 64.0,  # peak RSS through the burst, worst round
    "p99_extra_ms": 100.0,  # p99 <= batch.max_delay + 100 ms at 20k msg/s
    "replay_eps": 1_000_000.0,  # spool replay
    "py_msgs_per_cpu_s": 180_000.0,  # the pure-Python path
}

#: The systems of a round's bursts, in the first round's order; later rounds rotate it.
BURSTS = ("fwd", "sng", "rsy", "fwd_always", "fwd_plain", "fwd_py")
VARIANTS = ("fwd_always", "fwd_plain")  # --variants-once: run in the first round only
LABELS = {"fwd": "haproxy-forwarder", "sng": "syslog-ng", "rsy": "rsyslog concentrator",
          "fwd_always": "haproxy-forwarder (always)",
          "fwd_plain": "haproxy-forwarder (plain, no gzip)",
          "fwd_py": "haproxy-forwarder (pure Python)"}


def _sigterm(signum: int, _frame: Any) -> None:
    # SIGTERM/SIGHUP must run atexit (kills the children), like Ctrl-C does.
    raise SystemExit(128 + signum)


def say(msg: str = "") -> None:
    print(msg, flush=True)


def burst_line(b: runs.Burst) -> str:
    if b.error:
        return f"    {b.sut:<28} FAILED: {b.error}"
    return (f"    {b.sut:<28} {b.events_per_s:>9,.0f} ev/s e2e ({b.seconds:5.2f} s, steady "
            f"{b.steady_per_s:>9,.0f})  {b.msgs_per_cpu_s:>9,.0f} msg/CPU-s (cpu {b.cpu:4.2f} s)"
            f"  VmHWM {b.peak_rss_mib:5.1f} MiB  {b.requests} req  main-thread "
            f"{100 * b.main_thread_cpu / b.seconds if b.seconds else 0:.0f} %  other-cpu "
            f"{b.other_cpu:.2f}"
            + (f"  spooled {b.sut_counters.get('spooled_batches', 0)}/"
               f"{b.sut_counters.get('delivered_batches', 0)} batches, backpressure x"
               f"{b.sut_counters.get('backpressure_on', 0)}" if b.sut_counters else "")
            + (f"  [{'; '.join(b.notes)}]" if b.notes else ""))


def rotated(items: Sequence[str], r: int) -> list[str]:
    """`items` rotated by `r` places: round r starts with a different system."""
    k = r % len(items) if items else 0
    return [*items[k:], *items[:k]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=2_000_000,
                    help="burst size in messages (default 2,000,000: at least 2 CPU-seconds "
                    "for each daemon; e.g. 200000 for a quick run)")
    ap.add_argument("--rounds", "--repeat", dest="rounds", type=int, default=5,
                    help="interleaved rounds, each running every system once (default 5)")
    ap.add_argument("--rate", type=float, default=20_000, help="latency run: messages/s")
    ap.add_argument("--latency-seconds", type=float, default=15.0)
    ap.add_argument("--replay-batches", type=int, default=200, help="spool replay: batches of "
                    f"batch.max_events ({REPLAY_PER_BATCH:,}) events (default 200: 2M events, "
                    "about 2 CPU-seconds)")
    ap.add_argument("--quick", action="store_true", help="1 round, shorter latency run")
    ap.add_argument("--variants-once", action="store_true",
                    help="run the forwarder's spool-always and /plain/batch variants in the "
                    "first round only (defaults and pure Python stay in every round)")
    ap.add_argument("--no-syslog-ng", action="store_true")
    ap.add_argument("--no-rsyslog", action="store_true",
                    help="leave out rsyslog configured as Sekoia's concentrator")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the forwarder on a burst with py-spy (if installed)")
    ap.add_argument("--impl", choices=sorted(suts.IMPLEMENTATIONS), default="default",
                    help="which implementations the forwarder runs: 'python' sets "
                    "HAPROXY_FORWARDER_NO_EXTENSIONS=1 (the pure-Python reference)")
    ap.add_argument("--json", type=Path, default=CACHE / "results.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 1
        args.latency_seconds = 8.0
    if args.rounds < 1 or args.frames < 1000:
        ap.error("--rounds must be >= 1 and --frames >= 1000")
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)

    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")  # nothing from the cache goes into git
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    t_start = time.monotonic()
    results: dict[str, Any] = {"machine": machine(), "args": {k: str(v) for k, v in
                                                             vars(args).items()}}
    try:
        return _main(args, tmp, results, t_start)
    finally:
        procs.kill_children()
        shutil.rmtree(tmp, ignore_errors=True)


class Peers:
    """The two other systems: whether each can run, and what it needs."""

    def __init__(self) -> None:
        self.sng_error: str | None = None
        self.rsy_error: str | None = None
        self.rsyslogd: Any = None
        self.sink: Sink | None = None


def _setup_syslog_ng(args: argparse.Namespace, tmp: Path, intake: Intake,
                     results: dict[str, Any]) -> str | None:
    if args.no_syslog_ng:
        return "skipped (--no-syslog-ng)"
    try:
        version, info = suts.ensure_syslog_ng(lambda s: say(s))
        say(f"  syslog-ng: {version} in {suts.SNG_ROOT.relative_to(REPO)} "
            f"(packages: {', '.join(info['debs'])})")
        results["syslog_ng"] = {"version": version, **info}
        check = suts.SyslogNg(tmp, intake).syntax_check()
        if check:
            raise suts.SyslogNgUnavailable(f"config rejected: {check}")
    except (suts.SyslogNgUnavailable, OSError, subprocess.SubprocessError) as exc:
        say(f"  syslog-ng CANNOT RUN: {type(exc).__name__}: {exc}")
        return f"{type(exc).__name__}: {exc}"
    return None


def _setup_rsyslog(args: argparse.Namespace, tmp: Path, peers: Peers,
                   results: dict[str, Any]) -> str | None:
    if args.no_rsyslog:
        return "skipped (--no-rsyslog)"
    try:
        binary, info = ensure_rsyslog(lambda s: say(s))
        version = binary.version()
        say(f"  rsyslog concentrator: {version}, {info['from']} {info['path']}; imtcp -> "
            "ruleset with a LinkedList queue (100,000, disk-assisted) -> omfwd gtls, "
            "octet-counted, RFC 5424 + intake key")
        results["rsyslog"] = {"version": version, **info}
        peers.rsyslogd = binary
        peers.sink = sink = Sink(tmp).start()
        say(f"  TLS sink for it (octet-counted frame counter, trustme CA) on "
            f"127.0.0.1:{sink.port}")
        check = Rsyslog(tmp, sink, binary).syntax_check()
        if check:
            raise RsyslogUnavailable(f"rsyslogd -N1 rejected the config: {check}")
    except (RsyslogUnavailable, OSError, subprocess.SubprocessError, RuntimeError) as exc:
        say(f"  rsyslog CANNOT RUN: {type(exc).__name__}: {exc}")
        return f"{type(exc).__name__}: {exc}"
    return None


def _main(args: argparse.Namespace, tmp: Path, results: dict[str, Any], t_start: float) -> int:
    m = results["machine"]
    say("haproxy-forwarder benchmark")
    say(f"  {m['date']}  nproc={m['nproc']}  cpu={m['cpu']}  mem={m['memory']}  "
        f"kernel={m['kernel']}  python={m['python']}")
    say(f"  commit {m['commit']}")
    say(f"  load average at start {m['loadavg']}")
    impl = args.impl
    say(f"  forwarder implementations: {impl} "
        f"(extra environment {suts.IMPLEMENTATIONS[impl] or 'none'})")
    say(f"  {args.rounds} round(s) of {args.frames:,}-message bursts")

    say("\n[1/6] input stream")
    stream = load_stream(args.frames, CACHE)
    say(f"  {stream.count:,} octet-counted frames, {stream.size / 2**20:.1f} MiB, "
        f"{stream.haproxy:,} from haproxy ({100 * stream.haproxy / stream.count:.1f} %), "
        f"HAProxy MSG {stream.msg_bytes_avg:.0f} bytes on average ({stream.path.name})")

    intake = Intake(tmp).start()
    say(f"  bench intake (lean asyncio HTTPS, trustme CA) on {intake.url}")

    say("\n[2/6] the other systems")
    peers = Peers()
    peers.sng_error = _setup_syslog_ng(args, tmp, intake, results)
    peers.rsy_error = _setup_rsyslog(args, tmp, peers, results)
    results["syslog_ng_error"] = peers.sng_error
    results["rsyslog_error"] = peers.rsy_error

    # The same work as syslog-ng does here: /plain/batch, no gzip (like for like).
    plain = {"intake": {"endpoint": "plain-batch", "gzip": False}}
    makers: dict[str, Callable[[], Any]] = {
        "fwd": lambda: suts.Forwarder(tmp, intake, impl=impl),
        "sng": lambda: suts.SyslogNg(tmp, intake),
        "rsy": lambda: Rsyslog(tmp, peers.sink, peers.rsyslogd),  # type: ignore[arg-type]
        "fwd_always": lambda: suts.Forwarder(tmp, intake, spool_mode="always", impl=impl),
        "fwd_plain": lambda: suts.Forwarder(tmp, intake, extra=plain, impl=impl),
        "fwd_py": lambda: suts.Forwarder(tmp, intake, impl="python"),
    }
    skip = set()
    if peers.sng_error:
        skip.add("sng")
    if peers.rsy_error:
        skip.add("rsy")
    if impl == "python":
        skip.add("fwd_py")  # the defaults are the pure-Python path already
    plan = [k for k in BURSTS if k not in skip]
    lat_plan = [k for k in ("fwd", "sng") if k not in skip]
    burst_timeout = max(120.0, stream.count / 5000)

    rounds = args.rounds
    kinds: dict[str, list[runs.Burst | None]] = {k: [] for k in BURSTS}
    lats: dict[str, list[runs.Latency | None]] = {k: [] for k in ("fwd", "sng")}
    reps: list[runs.Replay] = []
    lat_frames = int(args.rate * args.latency_seconds)
    say(f"\n[3/6] {rounds} round(s): bursts of {stream.count:,} messages (fresh process "
        f"each, order rotated every round), latency at {args.rate:,.0f} msg/s for "
        f"{args.latency_seconds:.0f} s, spool replay of {args.replay_batches} x "
        f"{REPLAY_PER_BATCH:,} events")
    if args.variants_once:
        say(f"  --variants-once: {', '.join(LABELS[k] for k in VARIANTS)} run in round 1 "
            "only (their figures are ONE measurement, not a median)")
    for r in range(rounds):
        say(f"  round {r + 1}/{rounds} (load average {loadavg()})")
        for key in rotated(plan, r):
            if args.variants_once and r > 0 and key in VARIANTS:
                continue
            sink_or_intake: Any = peers.sink if key == "rsy" else intake
            try:
                b = runs.burst(makers[key](), sink_or_intake, stream, timeout=burst_timeout)
            except Exception as exc:  # a failed start: recorded, the rest goes on
                b = runs.Burst(key, stream.count, stream.haproxy, error=f"{exc}"[:800])
            b.sut = LABELS[key]
            kinds[key].append(b)
            say("    " + burst_line(b).strip())
        for key in rotated(lat_plan, r):
            try:
                lt = runs.latency(makers[key](), intake, stream, args.rate, lat_frames)
            except Exception as exc:
                lt = runs.Latency(key, args.rate, lat_frames, 0, error=f"{exc}"[:800])
            lt.sut = LABELS[key]
            lats[key].append(lt)
            say(f"    latency {lt.sut:<18} p50 {lt.p50_ms:7.1f} ms  p90 {lt.p90_ms:7.1f} ms  "
                f"p99 {lt.p99_ms:7.1f} ms  max {lt.max_ms:7.1f} ms  ({lt.unique:,}/"
                f"{lt.expected:,} events, sent at {lt.achieved_rate:,.0f}/s, CPU "
                f"{100 * lt.cpu_per_s:.0f} % of a core, VmHWM {lt.peak_rss_mib:.1f} MiB)"
                + (f"  ERROR {lt.error}" if lt.error else ""))
        try:
            rp = runs.replay(lambda d: suts.Forwarder(tmp, intake, spool_dir=d, impl=impl),
                             intake, tmp, args.replay_batches, REPLAY_PER_BATCH)
        except Exception as exc:
            rp = runs.Replay(args.replay_batches, args.replay_batches * REPLAY_PER_BATCH,
                             error=f"{exc}"[:800])
        reps.append(rp)
        say(f"    replay {rp.received:,}/{rp.events:,} events: {rp.events_per_s:,.0f} ev/s "
            f"from 'started' ({rp.seconds_from_started:.2f} s), {rp.events_per_s_spawn:,.0f} "
            f"ev/s from spawn ({rp.seconds_from_spawn:.2f} s); prefill "
            f"{rp.prefill_seconds:.1f} s, CPU {rp.cpu:.2f} s, VmHWM {rp.peak_rss_mib:.1f} MiB"
            + (f"  ERROR {rp.error}" if rp.error else ""))
    results["burst"] = {k: [asdict(b) for b in v if b] for k, v in kinds.items()}
    results["latency"] = {k: [asdict(x) for x in v if x] for k, v in lats.items()}
    results["replay"] = [asdict(r) for r in reps]

    say("\n[4/6] figures that used to be timed assertions in the tests (once, not per round)")
    lines: list[str] = []
    for figure in (micro.scan_resync, micro.fake_intake_ingest):
        try:
            got = figure()
            lines += [got] if isinstance(got, str) else got
        except Exception as exc:  # a figure that fails is said, the run goes on
            lines.append(f"{figure.__name__}: ERROR {exc}"[:800])
    for line in lines:
        say(f"  {line}")
    results["moved_from_tests"] = lines

    if args.profile:
        say("\n[5/6] profile of the forwarder on one burst (py-spy)")
        results["profile"] = profile(tmp, intake, stream, args.impl, native=True)
    else:
        say("\n[5/6] profile: not asked (--profile)")

    intake.stop()
    if peers.sink is not None:
        peers.sink.stop()
    say("\n[6/6] results")
    table(results, kinds, lats, reps, peers)
    results["elapsed_s"] = round(time.monotonic() - t_start, 1)
    results["loadavg_end"] = loadavg()
    results["commit_end"] = commit()
    say(f"\n  load average at start {m['loadavg']}, at end {results['loadavg_end']}")
    say(f"  commit at start {m['commit']}, at end {results['commit_end']}"
        + ("" if results["commit_end"] == m["commit"] else
           "  (CHANGED DURING THE RUN: the forwarder runs from the work tree, so rounds may "
           "have run different code)"))
    say(f"\n(total {results['elapsed_s']:.0f} s; raw results in {args.json})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


def _vals(items: Sequence[Any], attr: str) -> list[float | None]:
    """One value per round (None for a round that failed or did not run this system)."""
    return [getattr(x, attr) if x is not None and not x.error else None for x in items]


def table(results: dict[str, Any], kinds: dict[str, list[runs.Burst | None]],
          lats: dict[str, list[runs.Latency | None]], reps: list[runs.Replay],
          peers: Peers) -> None:
    def b(key: str, attr: str) -> list[float | None]:
        return _vals(kinds.get(key, []), attr)

    def lt(key: str, attr: str, scale: float = 1.0) -> list[float | None]:
        return [v * scale if v is not None else None for v in _vals(lats.get(key, []), attr)]

    none: list[float | None] = []
    w, c, q = 38, 30, 19
    for key in ("fwd", "fwd_always", "fwd_plain", "fwd_py", "sng", "rsy"):
        errs = [x.error for x in kinds.get(key, []) if x is not None and x.error]
        if errs:
            say(f"  {LABELS[key]}: {len(errs)} failed run(s): {errs[0][:300]}")
    counters = [x.sut_counters for x in kinds["fwd"] if x is not None and x.sut_counters]
    say(f"  (forwarder: batches spilled to the spool per burst run, overflow mode: "
        f"{[k.get('spooled_batches') for k in counters]}; backpressure episodes "
        f"{[k.get('backpressure_on') for k in counters]})")
    say("  each cell: median (min-max) over the rounds; a ratio: that of the medians "
        "(min-max of the ratios within each round)")
    rows: list[tuple[str, list[float | None], list[float | None], list[float | None]]] = [
        ("end-to-end events/s (burst)", b("fwd", "events_per_s"), b("sng", "events_per_s"),
         b("rsy", "events_per_s")),
        ("steady events/s (10-90 % of burst)", b("fwd", "steady_per_s"),
         b("sng", "steady_per_s"), b("rsy", "steady_per_s")),
        ("input msgs per CPU-second", b("fwd", "msgs_per_cpu_s"), b("sng", "msgs_per_cpu_s"),
         b("rsy", "msgs_per_cpu_s")),
        ("CPU-seconds for the burst", b("fwd", "cpu"), b("sng", "cpu"), b("rsy", "cpu")),
        ("peak RSS, VmHWM (MiB)", b("fwd", "peak_rss_mib"), b("sng", "peak_rss_mib"),
         b("rsy", "peak_rss_mib")),
        ("HTTPS requests for the burst", b("fwd", "requests"), b("sng", "requests"), none),
        ("msgs per CPU-s, /plain/batch no gzip", b("fwd_plain", "msgs_per_cpu_s"),
         b("sng", "msgs_per_cpu_s"), none),
        ("end-to-end ev/s, /plain/batch no gzip", b("fwd_plain", "events_per_s"),
         b("sng", "events_per_s"), none),
        ("latency p50 @20k msg/s (ms)", lt("fwd", "p50_ms"), lt("sng", "p50_ms"), none),
        ("latency p99 @20k msg/s (ms)", lt("fwd", "p99_ms"), lt("sng", "p99_ms"), none),
        ("CPU share of a core @20k msg/s (%)", lt("fwd", "cpu_per_s", 100),
         lt("sng", "cpu_per_s", 100), none),
    ]
    say(f"  {'':<{w}} {'haproxy-forwarder':>{c}} {'syslog-ng 3.38':>{c}} "
        f"{'rsyslog concentrator':>{c}} {'fwd / sng':>{q}} {'fwd / rsyslog':>{q}}")
    for name, f, s, r in rows:
        say(f"  {name:<{w}} {runs.with_spread(f):>{c}} "
            f"{runs.with_spread(s) if not peers.sng_error else 'n/a':>{c}} "
            f"{runs.with_spread(r) if not peers.rsy_error else 'n/a':>{c}} "
            f"{runs.ratio_cell(f, s):>{q}} {runs.ratio_cell(f, r):>{q}}")
    if peers.sng_error:
        say(f"  syslog-ng: {peers.sng_error}")
    if peers.rsy_error:
        say(f"  rsyslog concentrator: {peers.rsy_error}")
    else:
        say("  (the concentrator forwards every message: it has no program filter, so its "
            "end-to-end figures count the ~10 % non-HAProxy frames too)")
    notes = sorted({n for x in kinds["rsy"] if x is not None for n in x.notes})
    if notes:
        say(f"  rsyslog concentrator notes: {'; '.join(notes)}")

    say("\n  haproxy-forwarder variants")
    say(f"  {'':<{w}} {'defaults':>{c}} {'spool always':>{c}} {'/plain/batch no gzip':>{c}} "
        f"{'pure Python':>{c}}")
    for name, attr in (("end-to-end events/s (burst)", "events_per_s"),
                       ("input msgs per CPU-second", "msgs_per_cpu_s"),
                       ("CPU-seconds for the burst", "cpu"),
                       ("peak RSS, VmHWM (MiB)", "peak_rss_mib")):
        say(f"  {name:<{w}} " + " ".join(f"{runs.with_spread(b(k, attr)):>{c}}" for k in
                                         ("fwd", "fwd_always", "fwd_plain", "fwd_py")))
    rp_started = _vals(reps, "events_per_s")
    rp_spawn = _vals(reps, "events_per_s_spawn")
    say(f"  {'spool replay events/s (from started)':<{w}} {runs.with_spread(rp_started):>{c}}"
        f"   (from process spawn: {runs.with_spread(rp_spawn)})")

    max_delay = 1.0
    with contextlib.suppress(Exception):
        from haproxy_forwarder.config import BatchConfig

        max_delay = float(BatchConfig().max_delay)
    p99_limit = max_delay * 1000 + TARGETS["p99_extra_ms"]
    checks: list[tuple[str, str, bool | None]] = []

    def ratio_check(name: str, a: list[float | None], bb: list[float | None], target: float,
                    skipped: str | None) -> None:
        r = None if skipped else runs.ratio_of_medians(a, bb)
        checks.append((name, runs.ratio_cell(a, bb) if r is not None else "n/a",
                       None if r is None else r >= target))

    ratio_check(f">= {TARGETS['cpu_ratio']:.0f}x syslog-ng input msgs per CPU-second",
                b("fwd", "msgs_per_cpu_s"), b("sng", "msgs_per_cpu_s"), TARGETS["cpu_ratio"],
                peers.sng_error)
    ratio_check(f"  aim: {TARGETS['cpu_ratio_aim']:.0f}x syslog-ng", b("fwd", "msgs_per_cpu_s"),
                b("sng", "msgs_per_cpu_s"), TARGETS["cpu_ratio_aim"], peers.sng_error)
    ratio_check(f"  same, /plain/batch without gzip (like for like), >= "
                f"{TARGETS['cpu_ratio']:.0f}x", b("fwd_plain", "msgs_per_cpu_s"),
                b("sng", "msgs_per_cpu_s"), TARGETS["cpu_ratio"], peers.sng_error)
    ratio_check(f">= {TARGETS['rsyslog_cpu_ratio']:.0f}x rsyslog concentrator msgs per CPU-s",
                b("fwd", "msgs_per_cpu_s"), b("rsy", "msgs_per_cpu_s"),
                TARGETS["rsyslog_cpu_ratio"], peers.rsy_error)
    ratio_check(f">= {TARGETS['eps_ratio']:.1f}x syslog-ng end-to-end events/s",
                b("fwd", "events_per_s"), b("sng", "events_per_s"), TARGETS["eps_ratio"],
                peers.sng_error)
    rss = runs.spread(b("fwd", "peak_rss_mib"))
    checks.append((f"peak RSS <= {TARGETS['rss_mib']:.0f} MiB through the burst (worst round)",
                   f"{rss[2]:.1f} MiB" if rss else "n/a",
                   None if not rss else rss[2] <= TARGETS["rss_mib"]))
    p99 = runs.spread(lt("fwd", "p99_ms"))
    checks.append((f"p99 <= max_delay + 100 ms = {p99_limit:.0f} ms at 20k msg/s",
                   f"{runs.with_spread(lt('fwd', 'p99_ms'))} ms" if p99 else "n/a",
                   None if not p99 else p99[0] <= p99_limit))
    rep = runs.spread(rp_started)
    checks.append((f"spool replay >= {TARGETS['replay_eps'] / 1e6:.0f}M events/s",
                   runs.with_spread(rp_started) if rep else "n/a",
                   None if not rep else rep[0] >= TARGETS["replay_eps"]))
    py = runs.spread(b("fwd_py", "msgs_per_cpu_s"))
    checks.append((f"pure Python >= {TARGETS['py_msgs_per_cpu_s'] / 1000:.0f}k msgs per CPU-s",
                   runs.with_spread(b("fwd_py", "msgs_per_cpu_s")) if py else "n/a",
                   None if not py else py[0] >= TARGETS["py_msgs_per_cpu_s"]))
    say("\n  targets (medians; RSS: the worst round)")
    for name, got, ok in checks:
        verdict = "n/a" if ok is None else ("MET" if ok else "NOT MET")
        say(f"  {name:<58} {got:>30}  {verdict}")
    results["targets"] = [{"target": n, "measured": g, "met": ok} for n, g, ok in checks]
    noise = runs.spread([x.other_cpu for k in ("fwd", "sng", "rsy") for x in kinds[k]
                         if x is not None])
    if noise and noise[2] > 0.3:
        say(f"\n  note: other processes used up to {noise[2]:.1f} CPU-s during a burst run "
            "(a busy machine makes the figures noisier)")

IDLE_FRAMES = ("_queue_SimpleQueue_get", "PyThread_acquire_lock_timed", "epoll_pwait",
               "epoll_wait", "uv__io_poll", "select (")


def profile(tmp: Path, intake: Intake, stream: Stream, impl: str,
            native: bool = False) -> dict[str, Any]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        say("  py-spy not found: `.venv/bin/pip install py-spy` (not a project dependency)")
        return {"error": "py-spy not installed"}
    out = tmp / "profile.txt"
    sut = suts.Forwarder(tmp, intake, impl=impl)
    intake.reset("count")
    sut.start()
    spy = procs.spawn([pyspy, "record", "--pid", str(sut.pid), "--rate", "200", "--format",
                       "raw", "--function", *(["--native"] if native else ["--nonblocking"]),
                       "-o", str(out)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    cpu0 = procs.cpu_seconds(sut.pid)
    sender = procs.Sender(sut.port, stream.path, stream.offsets)
    sender.start()
    st = runs.wait_events(intake, stream.haproxy, time.monotonic() + 120)
    cpu = procs.cpu_seconds(sut.pid) - cpu0
    procs.stop(spy, signal.SIGINT, 30)
    sut.stop()
    if not out.exists():
        err = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
        say(f"  py-spy wrote nothing: {err[-500:]}")
        return {"error": err[-500:]}
    stacks = []
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = stack.split(";")
            # --native cannot tell a thread waiting for work from one doing it: drop the waits
            # (idle pool threads in SimpleQueue.get, the loop in epoll), keep the CPU.
            if not any(w in fr for fr in frames[-8:] for w in IDLE_FRAMES):
                stacks.append((frames, int(count)))
    total = sum(n for _, n in stacks) or 1
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    for frames, n in stacks:
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + n
        for fr in set(frames):
            incl[fr] = incl.get(fr, 0) + n
    top_own = sorted(own.items(), key=lambda kv: -kv[1])[:25]
    top_incl = sorted(incl.items(), key=lambda kv: -kv[1])[:30]
    say(f"  {total} busy samples at 200 Hz over the burst (forwarder CPU {cpu:.2f} s, "
        f"{st['events']:,} events); own time:")
    for name, n in top_own:
        say(f"    {100 * n / total:5.1f} %  {name}")
    say("  inclusive:")
    for name, n in top_incl:
        say(f"    {100 * n / total:5.1f} %  {name}")
    keep = tmp.parent / "profile-raw.txt"
    shutil.copy(out, keep)
    return {"samples": total, "cpu": cpu, "own": top_own, "inclusive": top_incl,
            "raw": str(keep)}


if __name__ == "__main__":
    sys.exit(main())
