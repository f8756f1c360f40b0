"""Request bodies for the intake endpoints, built once per batch (never per event on the wire).

Pure functions: batch in, bytes out. Only `/array` carries a timestamp per event.
"""

from __future__ import annotations

import zlib

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


def encode_bounded(batch: Batch, endpoint: str, key: str) -> list[tuple[Batch, bytes]]:
    """Encode, halving the batch until every body is under the request limit."""
    body = encode(batch, endpoint, key)
    if len(body) <= MAX_REQUEST_BYTES or len(batch) == 1:
        return [(batch, body)]
    left, right = batch.split()
    return encode_bounded(left, endpoint, key) + encode_bounded(right, endpoint, key)


def gzip(body: bytes) -> bytes:
    # wbits=31: a gzip container, which is what Content-Encoding: gzip means.
    co = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    return co.compress(body) + co.flush()
