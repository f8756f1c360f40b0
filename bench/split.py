"""What routing by program costs: the reader a connection gets when its routes depend on the
program (ingest/split.py, pure Python) against the compiled reader and the pure reference.

    .venv/bin/python -m bench.split [--events N]

In-process, one 64 KiB chunk at a time, CPU time of the best of three runs; half the events
go to each of two destinations. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from devtools.traffic import haproxy_line, octet_counted, traditional
from haproxy_forwarder.ingest import (
    IMPLEMENTATION,
    OCTET,
    ChunkReader,
    ProgramFilter,
    PyChunkReader,
    new_reader,
)
from haproxy_forwarder.ingest.split import SplitReader, SplitResult

FILTER = ProgramFilter(["haproxy", "hapee"], ["hapee"])
MAX = 262144
TS = b"2026-12-07T10:00:00.000Z"


def cpu_seconds(reader: ChunkReader, chunks: list[bytes]) -> tuple[int, float]:
    start = time.process_time()
    events = 0
    for c in chunks:
        res = reader.feed(c, TS)
        if isinstance(res, SplitResult):
            events += sum(len(part) for _, part in res.parts)
        else:
            events += len(res)
    return events, time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    n = ap.parse_args().events
    stream = octet_counted(traditional("haproxy" if i % 2 else "haproxy-b", haproxy_line(i))
                           for i in range(n))
    chunks = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]

    def by_program(program: str) -> str:
        return "b" if program.startswith("haproxy-b") else "a"

    readers: list[tuple[str, Callable[[], ChunkReader]]] = [
        (f"compiled reader ({IMPLEMENTATION})", lambda: new_reader(FILTER, MAX, OCTET)),
        ("pure reference reader", lambda: PyChunkReader(FILTER, MAX, OCTET)),
        ("split by program", lambda: SplitReader(FILTER, MAX, OCTET, by_program)),
    ]
    print(f"{n:,} events, {len(stream) / 2**20:.1f} MiB, octet-counted, 64 KiB chunks")
    for name, make in readers:
        runs = [cpu_seconds(make(), chunks) for _ in range(3)]
        assert all(events == n for events, _ in runs), runs
        best = min(seconds for _, seconds in runs)
        print(f"  {name:28s} {n / best:12,.0f} events per CPU-second")


if __name__ == "__main__":
    main()
