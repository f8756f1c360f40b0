"""Request bodies for the intake endpoints, built once per batch (never per event on the wire).

Pure functions: batch in, bytes out. Only `/array` carries a timestamp per event.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

import orjson

from .batching import Batch
from .config import MAX_REQUEST_BYTES

# Level 1: log lines compress ~8x already and the CPU per message is what we are judged on.
GZIP_LEVEL = 1


def encode(batch: Batch, endpoint: str, key: str) -> bytes:
    if endpoint == "array":
        return orjson.dumps(
            [
                {"intake_key": key, "json": e, "timestamp": t}
                for e, t in zip(batch.events, batch.times, strict=True)
            ]
        )
    if endpoint == "batch":
        return orjson.dumps({"intake_key": key, "jsons": batch.events})
    if endpoint == "jsons":
        return orjson.dumps(batch.events)
    if endpoint == "plain-batch":
        # The intake splits on LF: an event containing one arrives in pieces (documented).
        return "\n".join(batch.events).encode("utf-8")
    raise ValueError(f"unknown endpoint {endpoint!r}")


# /array bodies are built and compressed this many events at a time: the whole JSON body
# never exists at once, which keeps peak memory low when several batches are in flight.
CHUNK = 512


def _array_chunks(batch: Batch, key: str) -> Iterator[bytes]:
    events, times = batch.events, batch.times
    yield b"["
    for i in range(0, len(events), CHUNK):
        part = orjson.dumps(
            [
                {"intake_key": key, "json": e, "timestamp": t}
                for e, t in zip(events[i : i + CHUNK], times[i : i + CHUNK], strict=True)
            ]
        )
        if i:
            yield b","
        yield part[1:-1]
    yield b"]"


def body(batch: Batch, endpoint: str, key: str, use_gzip: bool) -> tuple[bytes, int]:
    """The request body, and its size before compression (what the request limit is about)."""
    chunks: Iterable[bytes] = (
        _array_chunks(batch, key) if endpoint == "array" else (encode(batch, endpoint, key),)
    )
    if not use_gzip:
        raw = b"".join(chunks)
        return raw, len(raw)
    co = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    out: list[bytes] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        out.append(co.compress(chunk))
    out.append(co.flush())
    return b"".join(out), size


def bodies_bounded(
    batch: Batch, endpoint: str, key: str, use_gzip: bool
) -> list[tuple[Batch, bytes]]:
    """Encode, halving the batch until every body is under the request limit."""
    data, size = body(batch, endpoint, key, use_gzip)
    if size <= MAX_REQUEST_BYTES or len(batch) == 1:
        return [(batch, data)]
    left, right = batch.split()
    return bodies_bounded(left, endpoint, key, use_gzip) + bodies_bounded(
        right, endpoint, key, use_gzip
    )
