"""Per-stage cost of the forwarder's work on the benchmark stream, in one process.

    .venv/bin/python -m bench.micro [--frames N] [--impl default|python]

Times the package's public seams (no copies of them) on the frames `make bench` sends and
prints microseconds per input message for each stage: the ingest seam
(`ingest.new_reader(...).feed`, with the reference framing and header parsers it composes
timed alone), `batching.Batcher`, request bodies (`sinks.encoding.body`, gzip as shipped and,
when importable, isal / zlib-ng as candidates on the same bodies), and the spool's
append / read / ack.  `--impl python` sets HAPROXY_FORWARDER_NO_EXTENSIONS=1 before the
package is imported: the pure-Python reference even where a compiled core exists.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devtools.keys import INTAKE_KEY

from .suts import CACHE, IMPLEMENTATIONS

READ = 256 * 1024  # what uvloop hands data_received at most
MAX_MESSAGE_SIZE = 262144  # listen.max_message_size's default
RECEIVED_AT = b"2026-11-26T21:58:51.000Z"
GZIP_CANDIDATES = (("isal.isal_zlib", 0), ("isal.isal_zlib", 1), ("zlib_ng.zlib_ng", 1))


def best(fn: Callable[[], Any], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=300_000)
    ap.add_argument("--impl", choices=sorted(IMPLEMENTATIONS), default="default")
    args = ap.parse_args(argv)
    # Before the first import of the package: the ingest seam picks its implementation then.
    os.environ.update(IMPLEMENTATIONS[args.impl])
    tmp = Path(tempfile.mkdtemp(prefix="micro-"))
    try:
        run(args.frames, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(frames: int, tmp: Path) -> None:
    from haproxy_forwarder import ingest
    from haproxy_forwarder.batching import Batch, Batcher
    from haproxy_forwarder.config import BatchConfig
    from haproxy_forwarder.sinks import encoding
    from haproxy_forwarder.spool import Spool
    from haproxy_forwarder.syslog.framing import FrameDecoder
    from haproxy_forwarder.syslog.header import read_header

    from .stream import load_stream

    stream = load_stream(frames, CACHE)
    data = stream.path.read_bytes()
    n = stream.count
    chunks = [data[i : i + READ] for i in range(0, len(data), READ)]
    rows: list[tuple[str, float, str]] = []

    def per_msg(name: str, seconds: float, note: str = "") -> None:
        rows.append((name, seconds / n * 1e6, note))

    # -- the ingest seam: chunk in, encoded events out ---------------------------------------
    filt = ingest.ProgramFilter(["haproxy", "hapee"])

    def read_all() -> list[ingest.ChunkResult]:
        reader = ingest.new_reader(filt, MAX_MESSAGE_SIZE)
        out = [reader.feed(c, RECEIVED_AT) for c in chunks]
        out.append(reader.close(RECEIVED_AT))
        return out

    per_msg(f"ingest: ChunkReader.feed ({ingest.IMPLEMENTATION}, 256 KiB reads)", best(read_all))
    results = read_all()
    kept = sum(len(r) for r in results)
    assert sum(r.frames for r in results) == n, "the reader lost frames"
    assert kept == stream.haproxy, f"{kept} events kept, {stream.haproxy} expected"

    # The reference parsers the pure reader composes, alone: where its time goes.
    def deframe() -> list[list[bytes]]:
        dec = FrameDecoder(MAX_MESSAGE_SIZE)
        return [dec.feed(c) for c in chunks]

    per_msg("  of which syslog.framing.FrameDecoder.feed", best(deframe))
    all_frames = [f for fl in deframe() for f in fl]

    def headers() -> None:
        for f in all_frames:
            read_header(f)

    per_msg("  of which syslog.header.read_header", best(headers))

    # -- batching -----------------------------------------------------------------------------
    cfg = BatchConfig()

    def batch_all() -> list[Batch]:
        b = Batcher(cfg.max_events, cfg.max_bytes)
        out: list[Batch] = []
        for r in results:
            out += b.add(r.data, r.lens, r.tdata, r.tlens)
        last = b.take()
        return [*out, last] if last is not None else out

    per_msg("batching: Batcher.add + take", best(batch_all))
    batches = batch_all()
    assert sum(len(b) for b in batches) == kept

    # -- request bodies -----------------------------------------------------------------------
    def bodies(endpoint: str, gz: bool) -> Callable[[], list[bytes]]:
        return lambda: [encoding.body(b, endpoint, INTAKE_KEY, gz)[0] for b in batches]

    raw = bodies("array", False)()
    raw_size = sum(len(x) for x in raw)
    per_msg("encoding.body /array, no gzip", best(bodies("array", False)))
    shipped = sum(len(x) for x in bodies("array", True)())
    gz_name = (f"zlib {zlib.ZLIB_RUNTIME_VERSION}" if encoding.GZIP_IMPLEMENTATION == "zlib"
               else encoding.GZIP_IMPLEMENTATION)
    per_msg(f"encoding.body /array, gzip ({gz_name} level {encoding.GZIP_LEVEL}, shipped)",
            best(bodies("array", True)),
            f"{raw_size / 2**20:.0f} MiB -> {shipped / 2**20:.1f} MiB")
    per_msg("encoding.body /plain/batch, no gzip", best(bodies("plain-batch", False)),
            "alternative endpoint")

    def gz_with(mod: Any, level: int) -> Callable[[], int]:
        def go() -> int:
            total = 0
            for body in raw:
                co = mod.compressobj(level, mod.DEFLATED, 31)
                total += len(co.compress(body) + co.flush())
            return total
        return go

    for modname, level in GZIP_CANDIDATES:
        try:
            mod = __import__(modname, fromlist=["x"])
        except ImportError:
            rows.append((f"  gzip with {modname} level {level} (candidate)", 0.0,
                         "not installed"))
            continue
        size = gz_with(mod, level)()
        per_msg(f"  gzip with {modname} level {level} (candidate, on the raw bodies)",
                best(gz_with(mod, level)), f"{raw_size / 2**20:.0f} MiB -> {size / 2**20:.1f} MiB")

    # -- the spool, through its public API ------------------------------------------------
    def spool_round() -> tuple[float, float]:
        d = tmp / f"spool-{time.monotonic_ns()}"
        sp = Spool(d)
        sp.open()
        t0 = time.perf_counter()
        for b in batches:
            sp.append(b)
        t1 = time.perf_counter()
        read = 0
        while (got := sp.next_batch()) is not None:
            rid, back = got
            read += len(back)
            sp.ack(rid)
        t2 = time.perf_counter()
        sp.close()
        shutil.rmtree(d, ignore_errors=True)
        assert read == kept, f"spool gave back {read} of {kept} events"
        return t1 - t0, t2 - t1

    rounds = [spool_round() for _ in range(2)]
    per_msg("spool: Spool.append (fsync per batch)", min(r[0] for r in rounds))
    per_msg("spool: Spool.next_batch + ack", min(r[1] for r in rounds))

    # -- the intake client: httpx + TLS per request, on this process's CPU ------------------
    gz_bodies = bodies("array", True)()
    per_request = post_cpu(tmp, gz_bodies)
    rows.append((f"intake: IntakeClient.post, {len(gz_bodies)} gzip /array bodies over TLS",
                 per_request * len(gz_bodies) / n * 1e6,
                 f"{per_request * 1e3:.2f} ms of CPU per request (httpx, TLS, loopback)"))

    print(f"{n:,} frames, {kept:,} events in {len(batches)} batches of "
          f"{cfg.max_events}; /array bodies {raw_size / 2**20:.1f} MiB")
    print(f"{'stage':<64} {'us/msg':>7}")
    for name, us, note in rows:
        print(f"{name:<64} {f'{us:7.2f}' if us else '      -'}  {note}")


def scan_resync(units: tuple[int, ...] = (1, 4)) -> list[str]:
    """`spool.format.scan` resynchronising over garbage between two records (a damaged
    segment at recovery): MiB/s at each size, and the time ratio between the largest and the
    smallest against the size ratio (linear: the two agree; quadratic: the first is far more).

    Moved from tests/test_spool.py (test_scan_resync_is_linear_on_garbage), which keeps what
    the scan finds and no longer times it."""
    from haproxy_forwarder.batching import Batch
    from haproxy_forwarder.spool import format as fmt

    rec = fmt.encode_record(Batch.from_events(["ok"], ["t"]), 0)
    # Random bytes, zeros, and magic bytes every few bytes whose headers never check out.
    unit = (os.urandom(1 << 20) + bytes(1 << 20)
            + (fmt.MAGIC + b"\x01\x00" + bytes(4) + b"\xff" * 4) * 50_000
            + (fmt.MAGIC + b"\x02\x00" + bytes(4) + b"\xff" * 4) * 50_000)
    lines, times = [], []
    for k in units:
        data = rec + unit * k + rec
        scan = fmt.scan(data)
        assert len(scan.records) == 2, "the scan lost a record"
        t = best(functools.partial(fmt.scan, data), repeat=3)
        times.append(t)
        mib = len(data) / 2**20
        lines.append(f"spool.format.scan over {mib:.1f} MiB of garbage: {t * 1e3:.0f} ms "
                     f"({mib / t:.0f} MiB/s)")
    lines.append(f"  time x{times[-1] / times[0]:.1f} for size x{units[-1] / units[0]:.0f} "
                 "(linear: about equal)")
    return lines


def fake_intake_ingest(batches: int = 20, per_batch: int = 5000) -> str:
    """The tests' FakeIntake (tests/fake_intake.py) taking `batches` gzip'd /jsons requests
    of `per_batch` HAProxy lines, one keep-alive client: events/s.

    Moved from tests/test_fake_intake.py (test_100k_events_fast), which keeps what the intake
    records and no longer times it."""
    import gzip
    import importlib

    import httpx
    import orjson

    fake = importlib.import_module("tests.fake_intake")  # at run time: mypy stays off tests/
    line = ("10.0.0.1:51234 [26/Nov/2024:21:59:00.123] fe be/srv 0/0/1/2/3 200 512 - - ---- "
            '1/1/0/0/0 0/0 "GET /x HTTP/1.1"')
    bodies = [gzip.compress(orjson.dumps([f"{line} #{b * per_batch + i}"
                                          for i in range(per_batch)]), compresslevel=1)
              for b in range(batches)]
    headers = {"X-SEKOIAIO-INTAKE-KEY": fake.VALID_KEY, "Content-Encoding": "gzip",
               "Content-Type": "application/json"}
    with fake.FakeIntake() as fi, \
            httpx.Client(base_url=fi.url, verify=fi.client_ssl_context()) as client:
        t = time.perf_counter()
        for body in bodies:
            r = client.post("/jsons", content=body, headers=headers)
            assert r.status_code == 200, r.text
        seconds = time.perf_counter() - t
        assert len(fi.events) == batches * per_batch
    n = batches * per_batch
    return (f"tests' FakeIntake: {n:,} events in {batches} gzip /jsons requests: "
            f"{seconds:.2f} s ({n / seconds:,.0f} events/s)")


def post_cpu(tmp: Path, gz_bodies: list[bytes], rounds: int = 3, concurrency: int = 4) -> float:
    """CPU seconds (user + sys of this process) per POST of these bodies to the bench intake,
    `concurrency` at a time as the daemon's workers do; the intake runs in another process."""
    import asyncio
    import resource

    from haproxy_forwarder.config import IntakeConfig
    from haproxy_forwarder.sinks.intake import IntakeClient, Kind

    from .control import Intake

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    async def go(url: str, ca_file: Path) -> float:
        client = IntakeClient(IntakeConfig(url=url, key=INTAKE_KEY, ca_file=ca_file,
                                           concurrency=concurrency))
        sem = asyncio.Semaphore(concurrency)

        async def one(body: bytes) -> None:
            async with sem:
                outcome = await client.post(body)
            assert outcome.kind is Kind.DELIVERED, outcome

        await one(gz_bodies[0])  # connect and warm up outside the measured window
        c0 = cpu()
        for _ in range(rounds):
            await asyncio.gather(*(one(b) for b in gz_bodies))
        spent = cpu() - c0
        await client.aclose()
        return spent / (rounds * len(gz_bodies))

    intake = Intake(tmp).start()
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - a dependency of the package
            return asyncio.run(go(intake.url, intake.ca_file))
        return uvloop.run(go(intake.url, intake.ca_file))
    finally:
        intake.stop()


if __name__ == "__main__":
    main()
