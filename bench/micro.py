"""Per-stage cost of the forwarder's work on the benchmark stream, in one process.

    .venv/bin/python -m bench.micro [--frames N]

Times the real functions (no copies of them) on the frames `make bench` sends, and prints
microseconds per input message for each stage: de-framing, Pipeline.ingest (header reader,
filter, event text, batching), the /array JSON body, gzip level 1 with zlib (what ships) and,
when importable, isal / zlib-ng (candidates, not dependencies), and the write-ahead spool
record.  Used as evidence for the optimisation suggestions in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from haproxy_forwarder import encoding
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.config import Settings
from haproxy_forwarder.pipeline import Pipeline
from haproxy_forwarder.spool import Spool, _record
from haproxy_forwarder.syslog.framing import FrameDecoder
from haproxy_forwarder.syslog.header import event_text, read_header

from .__main__ import load_stream

READ = 256 * 1024  # what uvloop hands data_received at most


def best(fn: Callable[[], Any], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300_000)
    args = ap.parse_args()
    import sys

    from .suts import CACHE

    sys.path.append(str(CACHE / "pylib"))  # isal, if `python -m bench --variants` installed it
    stream = load_stream(args.frames)
    data = stream.path.read_bytes()
    n = stream.count
    chunks = [data[i : i + READ] for i in range(0, len(data), READ)]
    rows: list[tuple[str, float, str]] = []

    def per_msg(name: str, seconds: float, note: str = "") -> None:
        rows.append((name, seconds / n * 1e6, note))

    # -- de-framing ------------------------------------------------------------------------
    def deframe() -> list[list[bytes]]:
        dec = FrameDecoder()
        return [dec.feed(c) for c in chunks]

    per_msg("FrameDecoder.feed (256 KiB reads)", best(deframe))
    frame_lists = deframe()
    frames = [f for fl in frame_lists for f in fl]
    assert len(frames) == n

    # -- header reader alone, event text alone -----------------------------------------------
    def headers() -> None:
        for f in frames:
            read_header(f)

    per_msg("  read_header", best(headers))
    hs = [read_header(f) for f in frames]
    pairs = [(f, h) for f, h in zip(frames, hs, strict=True)
             if f.startswith(b"haproxy", h.prog_start, h.prog_end)]

    def texts() -> None:
        for f, h in pairs:
            event_text(f, h, False)

    per_msg("  event_text", best(texts))

    # -- the whole of Pipeline.ingest, with delivery stubbed ---------------------------------
    tmp = Path(tempfile.mkdtemp(prefix="micro-"))
    settings = Settings(intake={"dry_run": True}, spool={"dir": str(tmp)})

    async def ingest_all() -> list[Batch]:
        p = Pipeline(settings, SimpleNamespace(info=print, warning=print, error=print))
        out: list[Batch] = []
        p.delivery = SimpleNamespace(submit=out.append)  # type: ignore[assignment]
        for fl in frame_lists:
            p.ingest(fl)
        if p._timer is not None:
            p._timer.cancel()
        last = p.batcher.take()
        if last is not None:
            out.append(last)
        return out

    per_msg("Pipeline.ingest (header, filter, text, batch)",
            best(lambda: asyncio.run(ingest_all())))
    batches = asyncio.run(ingest_all())

    from haproxy_forwarder import pipeline as _pl

    from .patches import check_fasthdr, fast_read_header

    fast, bad = check_fasthdr(frames)
    _pl.read_header = fast_read_header  # type: ignore[assignment]
    try:
        per_msg("Pipeline.ingest with the fasthdr patch (candidate)",
                best(lambda: asyncio.run(ingest_all())),
                f"fast path {fast:,}/{n:,} frames, {bad} mismatches vs read_header")
    finally:
        _pl.read_header = read_header  # type: ignore[assignment]
    events = sum(len(b) for b in batches)

    # -- request bodies --------------------------------------------------------------------
    key = "BenchIntakeKey0123456789abcdefXY"
    per_msg("encode /array (orjson)", best(lambda: [encoding.encode(b, "array", key)
                                                    for b in batches]))
    bodies = [encoding.encode(b, "array", key) for b in batches]
    raw = sum(len(x) for x in bodies)
    per_msg("encode /plain/batch (join+utf-8)",
            best(lambda: [encoding.encode(b, "plain-batch", key) for b in batches]),
            "alternative endpoint")

    def gz_with(mod: Any, level: int) -> Callable[[], int]:
        def run() -> int:
            total = 0
            for body in bodies:
                co = mod.compressobj(level, mod.DEFLATED, 31)
                total += len(co.compress(body) + co.flush())
            return total
        return run

    size = gz_with(zlib, encoding.GZIP_LEVEL)()
    per_msg(f"gzip level {encoding.GZIP_LEVEL}, zlib {zlib.ZLIB_RUNTIME_VERSION} (shipped)",
            best(gz_with(zlib, encoding.GZIP_LEVEL)),
            f"{raw / 2**20:.0f} MiB -> {size / 2**20:.1f} MiB")
    for modname, level in (("isal.isal_zlib", 0), ("isal.isal_zlib", 1), ("zlib_ng.zlib_ng", 1)):
        try:
            mod = __import__(modname, fromlist=["x"])
        except ImportError:
            rows.append((f"gzip with {modname} level {level}", 0.0, "not installed"))
            continue
        s2 = gz_with(mod, level)()
        per_msg(f"gzip {modname} level {level} (candidate)", best(gz_with(mod, level)),
                f"{raw / 2**20:.0f} MiB -> {s2 / 2**20:.1f} MiB")

    # -- write-ahead spool -------------------------------------------------------------------
    per_msg("spool record encoding (_record)", best(lambda: [_record(b, 0) for b in batches]))
    sp = Spool(tmp / "spool")
    sp.open()

    def spool_all() -> None:
        for b in batches:
            sp.ack(sp.append(b))

    per_msg("Spool.append + ack (fsync)", best(spool_all, 2))
    sp.close()

    print(f"{n:,} frames, {events:,} events in {len(batches)} batches of "
          f"{settings.batch.max_events}; /array bodies {raw / 2**20:.1f} MiB")
    print(f"{'stage':<52} {'us/msg':>7}")
    for name, us, note in rows:
        print(f"{name:<52} {us:7.2f}  {note}")


if __name__ == "__main__":
    main()
