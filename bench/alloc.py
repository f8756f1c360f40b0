"""Python heap blocks per message through reader + collector + batcher + body assembly.

    .venv/bin/python -m bench.alloc [--frames N] [--impl default|python]

Pushes the benchmark stream (`make bench`'s frames, 256 KiB reads) through the package's
public seams: `ingest.new_reader(...).feed`, `Collector.take` (which runs the `Batcher`), and
`encoding.body` (`/array`, gzip) for every closed batch. After a warm-up pass, it counts
`sys.getallocatedblocks()` (blocks of Python's object allocator held) at steady state:

- held by the closed batches: blocks allocated while N messages went in and were batched, the
  batches kept, as delivery keeps them until the intake answers; divided by the messages;
- after assembly: the same, once every batch was assembled into its body and the bodies
  dropped (what the whole path leaves behind).

An object per message shows as ~1 block per message held (an int per event end, a bytes per
timestamp); typed storage shows as a few blocks per batch. The figure counts blocks held,
not allocations made and freed (churn): that costs CPU, which `make bench` measures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from typing import Any

from devtools.keys import INTAKE_KEY

from .micro import MAX_MESSAGE_SIZE, READ, RECEIVED_AT
from .suts import CACHE, IMPLEMENTATIONS


class Held:
    """A delivery that keeps what it is given (the batches a real one holds until sent)."""

    def __init__(self) -> None:
        self.batches: list[Any] = []

    def submit(self, batch: Any) -> None:
        self.batches.append(batch)

    def dead_letter(self, batch: Any, reason: str) -> None:
        return None


async def measure(frames: int) -> dict[str, float]:
    from haproxy_forwarder import ingest
    from haproxy_forwarder.batching import Batcher
    from haproxy_forwarder.collector import Collector
    from haproxy_forwarder.config import BatchConfig
    from haproxy_forwarder.observability.counters import Counters
    from haproxy_forwarder.sinks import encoding

    from .stream import load_stream

    stream = load_stream(frames, CACHE)
    data = stream.path.read_bytes()
    chunks = [data[i : i + READ] for i in range(0, len(data), READ)]
    filt = ingest.ProgramFilter(["haproxy", "hapee"])
    cfg = BatchConfig()

    def one_pass() -> tuple[Held, int]:
        held = Held()
        collector = Collector(Batcher(cfg.max_events, cfg.max_bytes), held, Counters(),
                              cfg.max_delay)
        reader = ingest.new_reader(filt, MAX_MESSAGE_SIZE)
        for c in chunks:
            collector.take(reader.feed(c, RECEIVED_AT))
        collector.take(reader.close(RECEIVED_AT))
        collector.flush()
        return held, sum(len(b) for b in held.batches)

    def assemble(held: Held) -> int:
        size = 0
        for b in held.batches:
            size += len(encoding.body(b, "array", INTAKE_KEY, True)[0])
        return size

    # Warm-up: the reader's and collector's buffers, the caches of the first pass.
    warm, _ = one_pass()
    assemble(warm)
    del warm
    gc.collect()
    gc.disable()  # blocks freed by the cycle collector mid-pass would blur the count
    try:
        before = sys.getallocatedblocks()
        held, events = one_pass()
        after_batching = sys.getallocatedblocks()
        assemble(held)
        after_assembly = sys.getallocatedblocks()
        batches = len(held.batches)
        del held
        after_release = sys.getallocatedblocks()
    finally:
        gc.enable()
    return {
        "messages": float(stream.count),
        "events": float(events),
        "batches": float(batches),
        "held_per_message": (after_batching - before) / stream.count,
        "held_per_batch": (after_batching - before) / max(1, batches),
        "after_assembly_per_message": (after_assembly - before) / stream.count,
        "left_after_release": float(after_release - before),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.alloc", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--impl", choices=sorted(IMPLEMENTATIONS), default="default")
    args = ap.parse_args(argv)
    os.environ.update(IMPLEMENTATIONS[args.impl])  # before the package's first import
    r = asyncio.run(measure(args.frames))
    from haproxy_forwarder import ingest

    try:
        from haproxy_forwarder import storage
    except ImportError:  # the releases before typed storage (to measure them the same way)
        helpers = "none"
    else:
        helpers = storage.IMPLEMENTATION
    print(f"reader {ingest.IMPLEMENTATION}, storage helpers {helpers}: "
          f"{r['messages']:,.0f} messages, {r['events']:,.0f} events kept, "
          f"{r['batches']:,.0f} batches")
    print(f"  heap blocks held per message, batches kept    {r['held_per_message']:.4f}"
          f"  ({r['held_per_batch']:.1f} per batch)")
    print(f"  heap blocks per message after body assembly   "
          f"{r['after_assembly_per_message']:.4f}")
    print(f"  heap blocks left once the batches are dropped {r['left_after_release']:+,.0f}")
    verdict = "MET" if r["held_per_message"] < 0.01 else "NOT MET"
    print(f"  target < 0.01 blocks per message: {verdict}")


if __name__ == "__main__":
    main()
