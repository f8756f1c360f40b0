"""Request bodies for the intake endpoints, assembled from a batch's encoded fragments.

Pure functions: batch in, bytes out. Bodies are concatenations of the fragments (already
JSON) and a few constant pieces; the key is inserted here and nowhere else. Only `/array`
carries a timestamp per event. Per-event work is compiled (sinks/assemble.py chooses).
gzip is ISA-L's (python-isal) where it imports, else zlib's: `GZIP_IMPLEMENTATION` says which.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Protocol

import orjson

from ..batching import Batch
from ..config import MAX_REQUEST_BYTES
from .assemble import array_chunk, join_fragments, plain_lines

# Level 1: log lines compress ~8x already and the CPU per message is what we are judged on.
# ISA-L's levels run 0-3; its level 1 is still a quarter of zlib level 1's CPU, smaller output.
GZIP_LEVEL = 1
# A gzip container (header + CRC-32 trailer) around the deflate stream, for Content-Encoding.
_GZIP_WBITS = 31

_isal: ModuleType | None
try:
    from isal import isal_zlib as _isal
except ImportError:  # a platform without an isal wheel, or an install that left it out
    _isal = None

GZIP_IMPLEMENTATIONS: tuple[str, ...] = ("isal", "zlib") if _isal is not None else ("zlib",)
# What compresses request bodies in this process; shown in the logs and /metrics.
GZIP_IMPLEMENTATION: str = GZIP_IMPLEMENTATIONS[0]


class Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...
    def flush(self) -> bytes: ...


def compressor(implementation: str | None = None) -> Compressor:
    """A fresh streaming gzip compressor, level 1: `implementation` ("isal" or "zlib"),
    by default GZIP_IMPLEMENTATION.  Both release the GIL while they compress."""
    name = GZIP_IMPLEMENTATION if implementation is None else implementation
    if name == "isal" and _isal is not None:
        co: Compressor = _isal.compressobj(GZIP_LEVEL, _isal.DEFLATED, _GZIP_WBITS)
        return co
    if name == "zlib":
        return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, _GZIP_WBITS)
    raise ValueError(f"gzip implementation {name!r} is not available here "
                     f"(available: {', '.join(GZIP_IMPLEMENTATIONS)})")

# /array bodies are built and compressed this many events at a time: the whole JSON body
# never exists at once, which keeps peak memory low when several batches are in flight.
CHUNK = 512


def _array_chunks(batch: Batch, key: str) -> Iterator[bytes]:
    # [{"intake_key":K,"json":F0,"timestamp":"T0"},{"intake_key":K,"json":F1,...}]
    head = b'{"intake_key":' + orjson.dumps(key) + b',"json":'
    mid = b',"timestamp":"'
    sep = b'"},' + head
    n = len(batch)
    yield b"[" + head if n else b"["
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        yield array_chunk(batch.data, batch.lens, batch.tdata, batch.tlens, lo, hi, mid, sep,
                          b'"}' if hi == n else sep)
    yield b"]"


def encode(batch: Batch, endpoint: str, key: str) -> bytes:
    if endpoint == "array":
        return b"".join(_array_chunks(batch, key))
    if endpoint == "batch":
        frags = join_fragments(batch.data, batch.lens, b",")
        return b'{"intake_key":%s,"jsons":[%s]}' % (orjson.dumps(key), frags)
    if endpoint == "jsons":
        return b"[" + join_fragments(batch.data, batch.lens, b",") + b"]"
    if endpoint == "plain-batch":
        # The intake splits on LF: an event containing one arrives in pieces (documented).
        return plain_lines(batch.data, batch.lens, b"\n")
    raise ValueError(f"unknown endpoint {endpoint!r}")


def body(
    batch: Batch, endpoint: str, key: str, use_gzip: bool, gzip_impl: str | None = None
) -> tuple[bytes, int]:
    """The request body, and its size before compression (what the request limit is about).
    `gzip_impl` names the compressor (see `compressor`); None is GZIP_IMPLEMENTATION."""
    chunks: Iterable[bytes] = (
        _array_chunks(batch, key) if endpoint == "array" else (encode(batch, endpoint, key),)
    )
    if not use_gzip:
        raw = b"".join(chunks)
        return raw, len(raw)
    co = compressor(gzip_impl)
    out: list[bytes] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        out.append(co.compress(chunk))
    out.append(co.flush())
    return b"".join(out), size


def bodies_bounded(
    batch: Batch, endpoint: str, key: str, use_gzip: bool, gzip_impl: str | None = None,
    limit: int = MAX_REQUEST_BYTES,
) -> list[tuple[Batch, bytes]]:
    """Encode, halving the batch until every body is under `limit` (before compression):
    the intake's request limit; tests lower it to get batches of several bodies."""
    data, size = body(batch, endpoint, key, use_gzip, gzip_impl)
    if size <= limit or len(batch) == 1:
        return [(batch, data)]
    left, right = batch.split()
    return bodies_bounded(left, endpoint, key, use_gzip, gzip_impl, limit) + bodies_bounded(
        right, endpoint, key, use_gzip, gzip_impl, limit
    )
