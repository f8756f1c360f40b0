"""CPU of one forwarder per 300k burst, by thread, for trying settings side by side.

    .venv/bin/python -m bench.cpu [--rounds N] [--frames N] [--set JSON ...] [--perf FILE]

Each `--set` is a config overlay (JSON, e.g. '{"intake": {"concurrency": 2}}'; none: the
defaults); the settings are run in turn, `--rounds` times, each in a fresh daemon that first
delivers a 2,000-message warm-up (connections opened, lazy imports done) so that what is printed
is the cost of the burst itself: CPU-seconds (user + sys, per thread), msgs per CPU-second,
VmHWM and minor page faults. `--perf FILE` records the first run with `perf record` (then
`perf report -i FILE --no-children --sort dso`). Loopback only, like the rest of bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from . import procs, runs, suts
from .control import Intake
from .stream import Stream, load_stream

WARM_UP = 2000


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """(user, sys) seconds of each thread, by "name/tid"."""
    out: dict[str, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            data = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes()
        except OSError:
            continue  # the thread ended meanwhile
        name = data[data.index(b"(") + 1 : data.rindex(b")")].decode(errors="replace")
        f = data[data.rindex(b")") + 2 :].split()
        out[f"{name}/{tid}"] = (int(f[11]) / procs.TICK, int(f[12]) / procs.TICK)
    return out


def push(fwd: suts.Forwarder, intake: Intake, stream: Stream) -> None:
    intake.reset("count")
    sender = procs.Sender(fwd.port, stream.path, stream.offsets, timeout=60)
    sender.start()
    st = runs.wait_events(intake, stream.haproxy, time.monotonic() + 60,
                          alive=lambda: fwd.proc is not None and fwd.proc.poll() is None)
    if st.get("timeout") or st.get("died"):
        raise SystemExit(f"the forwarder did not deliver the stream: {st}")


def one_run(tmp: Path, intake: Intake, small: Stream, stream: Stream, extra: dict[str, Any],
            perf: str | None) -> str:
    fwd = suts.Forwarder(tmp, intake, extra=extra).start()
    try:
        pid = fwd.pid
        push(fwd, intake, small)
        time.sleep(0.3)
        rec = (subprocess.Popen(["perf", "record", "-q", "-F", "4000", "-o", perf, "-p", str(pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               if perf else None)
        if rec is not None:
            time.sleep(0.5)
        c0, t0, f0 = procs.cpu_seconds(pid), thread_cpu(pid), procs.minor_faults(pid)
        push(fwd, intake, stream)
        c1, t1, f1 = procs.cpu_seconds(pid), thread_cpu(pid), procs.minor_faults(pid)
        if rec is not None:
            rec.send_signal(2)
            rec.wait(30)
        busy = []
        for name, (u, s) in t1.items():
            u0, s0 = t0.get(name, (0.0, 0.0))
            if u - u0 + s - s0 > 0:
                busy.append(f"{name.split('/')[0]} {u - u0:.2f}u+{s - s0:.2f}s")
        cpu = c1 - c0
        rate = f"{stream.count / cpu:,.0f}" if cpu > 0 else "n/a"
        return (f"{cpu:.2f} CPU-s = {rate} msgs/CPU-s, VmHWM "
                f"{procs.status_kib(pid, 'VmHWM') / 1024:.1f} MiB, {f1 - f0:,} minor faults  "
                f"[{', '.join(busy)}]")
    finally:
        fwd.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=300_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="JSON",
                    help="a config overlay to run (repeatable; none: the defaults)")
    ap.add_argument("--perf", metavar="FILE", help="perf record the first burst into FILE")
    args = ap.parse_args(argv)
    overlays = [json.loads(s) for s in args.sets] or [{}]
    tmp = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    intake = Intake(tmp).start()
    try:
        stream = load_stream(args.frames, suts.CACHE)
        small = load_stream(WARM_UP, suts.CACHE)
        perf = args.perf
        for rnd in range(args.rounds):
            for extra in overlays:  # interleaved: each round runs every setting once
                line = one_run(tmp, intake, small, stream, extra, perf)
                perf = None
                print(f"round {rnd + 1}  {json.dumps(extra) if extra else 'defaults':<60} {line}",
                      flush=True)
    finally:
        intake.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
