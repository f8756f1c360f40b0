"""Body assembly from a batch's fragments: the compiled functions, or their pure-Python twins.

One contract, two implementations (the same rule as ingest/): `array_chunk`,
`join_fragments` and `plain_lines` return the same bytes whichever runs;
tests/test_assemble.py proves it.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from itertools import repeat

import orjson

from ..extensions import disabled


def _fragments(data: bytes | bytearray, lens: array[int], lo: int, hi: int,
               start: int = 0) -> list[memoryview]:
    # Events lo..hi-1, whose first starts at `start`; ValueError past the data.
    view = memoryview(data)
    out = []
    for n in lens[lo:hi]:
        if start + n > len(view):
            raise ValueError(f"fragments end at {start + n}, past the data ({len(view)} bytes)")
        out.append(view[start : start + n])
        start += n
    return out


def py_array_chunk(data: bytes | bytearray, lens: array[int], tdata: bytes | bytearray,
                   tlens: array[int], lo: int, hi: int, mid: bytes, sep: bytes,
                   last: bytes) -> bytes:
    """For events lo..hi-1: F mid T sep ... F mid T last (the /array middle part)."""
    if lo < 0 or hi > len(lens) or lo > hi or len(tlens) != len(lens):
        raise ValueError("bad event range")
    d0, t0 = sum(lens[:lo]), sum(tlens[:lo])
    frags = _fragments(data, lens, lo, hi, d0)
    times = _fragments(tdata, tlens, lo, hi, t0)
    k = hi - lo
    if k <= 0:
        return b""
    parts: list[bytes | memoryview] = [b""] * (4 * k)
    parts[0::4] = frags
    parts[1::4] = repeat(mid, k)
    parts[2::4] = times
    parts[3::4] = repeat(sep, k)
    parts[-1] = last
    return b"".join(parts)


def py_join_fragments(data: bytes | bytearray, lens: array[int], sep: bytes) -> bytes:
    """The fragments separated by `sep` (/jsons, /batch)."""
    return sep.join(_fragments(data, lens, 0, len(lens)))


def py_plain_lines(data: bytes | bytearray, lens: array[int], sep: bytes) -> bytes:
    """The event texts (each fragment decoded from JSON), UTF-8, separated by `sep`."""
    frags = _fragments(data, lens, 0, len(lens))
    return sep.decode("utf-8").join([orjson.loads(f) for f in frags]).encode("utf-8")


def _plain_lines_native(data: bytes | bytearray, lens: array[int], sep: bytes) -> bytes:
    try:
        return _assemble.plain_lines(data, lens, sep)
    except ValueError:
        # A fragment that is not a plain JSON string literal (spool data from elsewhere):
        # decoded the reference way, which gives the same bytes or raises its own error.
        return py_plain_lines(data, lens, sep)


array_chunk: Callable[..., bytes] = py_array_chunk
join_fragments: Callable[..., bytes] = py_join_fragments
plain_lines: Callable[..., bytes] = py_plain_lines
IMPLEMENTATION = "python"
if not disabled():
    try:
        from . import _assemble
    except ImportError:
        pass
    else:
        array_chunk = _assemble.array_chunk
        join_fragments = _assemble.join_fragments
        plain_lines = _plain_lines_native
        IMPLEMENTATION = "native"
