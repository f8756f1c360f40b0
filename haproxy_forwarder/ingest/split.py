"""A reader whose events go to several destinations by their program (`[[routes]] program`).

The compiled reader returns events already encoded, without their program (HAProxy's tag is
not part of the event); a connection whose routes depend on the program gets this reader
instead: frames are de-framed and their header read in Python, grouped by destination, and
each group read by the reference reader. Slower than the compiled path (it is the pure one),
and only for such connections: routes by listener, source or certificate keep the compiled
reader. Pure: no IO.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..syslog.framing import FrameDecoder
from ..syslog.header import read_header
from ._py import DATAGRAM, PyChunkReader
from .filter import ProgramFilter
from .result import ChunkResult

D = TypeVar("D", bound=Hashable)


@dataclass(slots=True)
class SplitResult(ChunkResult, Generic[D]):
    """A chunk's frames by destination (`parts`, in order of first appearance), with the
    totals a source reads (frames, oversized, framing errors) on the result itself; its own
    `data`/`ends` stay empty, the events are in the parts."""

    parts: list[tuple[D, ChunkResult]] = field(default_factory=list)


class SplitReader(Generic[D]):
    """Stream (or datagram) reader that sends each frame where `destination(program)` says."""

    __slots__ = ("_decoder", "_destination", "_max", "_reader", "_seen_error")

    def __init__(self, filt: ProgramFilter, max_message_size: int, framing: str,
                 destination: Callable[[str], D]) -> None:
        self._reader = PyChunkReader(filt, max_message_size, DATAGRAM)
        self._max = max_message_size
        self._decoder = None if framing == DATAGRAM else FrameDecoder(max_message_size,
                                                                      framing=framing)
        self._destination = destination
        self._seen_error = False

    @property
    def buffered(self) -> int:
        return self._decoder.buffered if self._decoder is not None else 0

    def feed(self, chunk: bytes, received_at: bytes) -> SplitResult[D]:
        dec = self._decoder
        if dec is None:
            if len(chunk) > self._max:
                return SplitResult(oversized=1)
            chunk = chunk[:-1] if chunk.endswith(b"\n") else chunk
            return self._split([chunk] if chunk else [], received_at, 0)
        before = dec.oversized
        frames = dec.feed(chunk)
        return self._split(frames, received_at, dec.oversized - before)

    def close(self, received_at: bytes) -> SplitResult[D]:
        dec = self._decoder
        return self._split(dec.close(), received_at, 0) if dec is not None else SplitResult()

    def _split(self, frames: list[bytes], received_at: bytes, oversized: int) -> SplitResult[D]:
        groups: dict[D, list[bytes]] = {}
        where = self._destination
        for frame in frames:
            h = read_header(frame)
            # Latin-1: any byte is one character, so a prefix test on it is a byte test.
            program = frame[h.prog_start:h.prog_end].decode("latin-1")
            groups.setdefault(where(program), []).append(frame)
        out: SplitResult[D] = SplitResult(frames=len(frames), oversized=oversized)
        for dest, group in groups.items():
            part = self._reader.frames(group, received_at)
            out.accepted += part.accepted
            out.filtered += part.filtered
            out.bad_times += part.bad_times
            out.parts.append((dest, part))
        dec = self._decoder
        if dec is not None and dec.error is not None and not self._seen_error:
            self._seen_error = True
            out.framing_errors = 1
            out.error = dec.error
        return out
