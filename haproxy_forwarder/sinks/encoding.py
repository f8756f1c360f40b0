"""Request bodies for the intake endpoints, assembled from a batch's encoded fragments.

Pure functions: batch in, bytes out. Bodies are concatenations of the fragments (already
JSON) and a few constant pieces; the key is inserted here and nowhere else. Only `/array`
carries a timestamp per event. Per-event work is done by C iterators (slices, join).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from itertools import repeat

import orjson

from ..batching import Batch
from ..config import MAX_REQUEST_BYTES

# Level 1: log lines compress ~8x already and the CPU per message is what we are judged on.
GZIP_LEVEL = 1

# /array bodies are built and compressed this many events at a time: the whole JSON body
# never exists at once, which keeps peak memory low when several batches are in flight.
CHUNK = 512


def _fragments(batch: Batch, lo: int, hi: int) -> list[memoryview]:
    view = memoryview(batch.data)
    ends = batch.ends
    starts = [ends[lo - 1] if lo else 0, *ends[lo : hi - 1]]
    return list(map(view.__getitem__, map(slice, starts, ends[lo:hi])))


def _array_chunks(batch: Batch, key: str) -> Iterator[bytes]:
    # [{"intake_key":K,"json":F0,"timestamp":"T0"},{"intake_key":K,"json":F1,...}]
    head = b'{"intake_key":' + orjson.dumps(key) + b',"json":'
    mid = b',"timestamp":"'
    sep = b'"},' + head
    n = len(batch)
    yield b"[" + head if n else b"["
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        k = hi - lo
        parts: list[bytes | memoryview] = [b""] * (4 * k)
        parts[0::4] = _fragments(batch, lo, hi)
        parts[1::4] = repeat(mid, k)
        parts[2::4] = batch.times[lo:hi]
        parts[3::4] = repeat(sep, k)
        if hi == n:
            parts[-1] = b'"}'
        yield b"".join(parts)
    yield b"]"


def encode(batch: Batch, endpoint: str, key: str) -> bytes:
    if endpoint == "array":
        return b"".join(_array_chunks(batch, key))
    frags = _fragments(batch, 0, len(batch))
    if endpoint == "batch":
        return b'{"intake_key":%s,"jsons":[%s]}' % (orjson.dumps(key), b",".join(frags))
    if endpoint == "jsons":
        return b"[" + b",".join(frags) + b"]"
    if endpoint == "plain-batch":
        # The intake splits on LF: an event containing one arrives in pieces (documented).
        return "\n".join(batch.events()).encode("utf-8")
    raise ValueError(f"unknown endpoint {endpoint!r}")


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
