"""How a run of encoded events is stored: no Python object per event.

Four buffers, shared by the readers' results (ingest.ChunkResult) and the batches
(batching.Batch):
    data   the events' JSON string literals back to back (bytes / bytearray)
    lens   each literal's length, array("I")
    tdata  the events' timestamps (ASCII, RFC 3339) back to back
    tlens  each timestamp's length, array("H")
Lengths rather than end offsets: they do not depend on where a run sits, so appending one
run to another is four copies, with nothing to add to each element. The offsets a slice or a
byte budget needs are summed by `cut` and `offsets`, compiled (`_storage`) where built: the
pure-Python twins below create an int per element, the compiled ones nothing.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate

from .extensions import disabled

LENS = "I"  # u32: a literal is at most 6 x max_message_size (64 MiB) bytes
TLENS = "H"  # u16: timestamps are <= 32 bytes as read; v1 spool records may hold odd ones
MAX_TIME_BYTES = 0xFFFF

assert array(LENS).itemsize == 4 and array(TLENS).itemsize == 2


def new_lens(values: Iterable[int] = ()) -> array[int]:
    return array(LENS, values)


def new_tlens(values: Iterable[int] = ()) -> array[int]:
    return array(TLENS, values)


def ends_of(lens: Sequence[int]) -> list[int]:
    """End offsets from lengths (diagnostics, tests, the rare paths)."""
    return list(accumulate(lens))


def lens_of(ends: Sequence[int]) -> array[int]:
    """Lengths from end offsets; ValueError if they go backwards."""
    out = new_lens()
    prev = 0
    for e in ends:
        if e < prev:
            raise ValueError(f"end offset {e} before {prev}")
        out.append(e - prev)
        prev = e
    return out


def pieces(buf: bytes | bytearray, lens: Sequence[int]) -> list[bytes]:
    """The pieces of `buf` that `lens` describes, as bytes."""
    b = bytes(buf)
    ends = ends_of(lens)
    return [b[s:e] for s, e in zip([0, *ends[:-1]], ends, strict=True)] if ends else []


def pack_times(times: Iterable[bytes]) -> tuple[bytes, array[int]]:
    """Timestamps as (tdata, tlens); ValueError for one over MAX_TIME_BYTES."""
    ts = list(times)
    tlens = new_tlens()
    for t in ts:
        if len(t) > MAX_TIME_BYTES:
            raise ValueError(f"timestamp of {len(t)} bytes, over {MAX_TIME_BYTES}")
        tlens.append(len(t))
    return b"".join(ts), tlens


class Stored:
    """What a holder of the four parts (`data`, `lens`, `tdata`, `tlens`) gets for free: its
    length, and its events as lists, made on demand (dead letters, dry-run, tests): an object
    per event, never on the hot path."""

    __slots__ = ()
    data: bytes | bytearray
    lens: array[int]
    tdata: bytes | bytearray
    tlens: array[int]

    def __len__(self) -> int:
        return len(self.lens)

    @property
    def ends(self) -> list[int]:
        """Where each event's literal stops in `data`."""
        return ends_of(self.lens)

    @property
    def times(self) -> list[bytes]:
        return pieces(self.tdata, self.tlens)

    def fragments(self) -> list[bytes]:
        """Each event's JSON string literal, quotes included."""
        return pieces(self.data, self.lens)


def py_cut(lens: array[int], tlens: array[int], i: int, j: int,
           budget: int) -> tuple[int, int, int]:
    """Where a batch with `budget` bytes left stops taking events i..j-1.

    Returns (stop, nbytes, tbytes): events i..stop-1 are taken, stop the first index after
    the event whose bytes reach the budget (that event is taken: a batch overshoots its byte
    limit by at most one event), or j; nbytes and tbytes their data and timestamp bytes.
    """
    if len(tlens) != len(lens) or not 0 <= i <= j <= len(lens):
        raise ValueError("bad event range")
    nbytes = 0
    k = i
    while k < j:
        nbytes += lens[k]
        k += 1
        if nbytes >= budget:
            break
    return k, nbytes, sum(tlens[i:k])


def py_offsets(lens: array[int], tlens: array[int], k: int) -> tuple[int, int]:
    """(data offset, timestamp offset) where event k starts."""
    if not 0 <= k <= len(lens) or len(tlens) != len(lens):
        raise ValueError("bad event index")
    return sum(lens[:k]), sum(tlens[:k])


cut: Callable[[array[int], array[int], int, int, int], tuple[int, int, int]] = py_cut
offsets: Callable[[array[int], array[int], int], tuple[int, int]] = py_offsets
IMPLEMENTATION = "python"
if not disabled():
    try:
        from . import _storage
    except ImportError:
        pass
    else:
        cut = _storage.cut
        offsets = _storage.offsets
        IMPLEMENTATION = "native"
