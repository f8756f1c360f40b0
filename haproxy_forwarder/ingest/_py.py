"""The pure-Python ChunkReader: the reference the compiled one must equal, byte for byte.

It composes the reference parsers in `syslog/` (framing, header, MSG extraction) with the
program filter, and encodes each kept event with orjson.
"""

from __future__ import annotations

import orjson

from ..config import MAX_EVENT_BYTES
from ..storage import pack_times
from ..syslog.framing import AUTO, FrameDecoder
from ..syslog.header import event_text, read_header, valid_time
from .filter import ProgramFilter
from .result import ChunkResult

DATAGRAM = "datagram"


class PyChunkReader:
    """Stream mode (`framing` auto / octet-counted / lf): one reader per TCP connection.

    Datagram mode: every chunk is one message (UDP); one trailing LF is dropped, a chunk over
    max_message_size is counted as oversized.
    """

    __slots__ = ("_decoder", "_filter", "_max", "_seen_error")

    def __init__(
        self, filt: ProgramFilter, max_message_size: int, framing: str = AUTO
    ) -> None:
        self._filter = filt
        self._max = max_message_size
        self._decoder = None if framing == DATAGRAM else FrameDecoder(
            max_message_size, framing=framing
        )
        self._seen_error = False

    @property
    def buffered(self) -> int:
        return self._decoder.buffered if self._decoder is not None else 0

    def feed(self, chunk: bytes, received_at: bytes) -> ChunkResult:
        dec = self._decoder
        if dec is None:
            if len(chunk) > self._max:
                return ChunkResult(oversized=1)
            if chunk.endswith(b"\n"):
                chunk = chunk[:-1]
            return self._frames([chunk] if chunk else [], received_at, 0)
        before = dec.oversized
        frames = dec.feed(chunk)
        return self._frames(frames, received_at, dec.oversized - before)

    def close(self, received_at: bytes) -> ChunkResult:
        dec = self._decoder
        if dec is None:
            return ChunkResult()
        return self._frames(dec.close(), received_at, 0)

    def frames(self, frames: list[bytes], received_at: bytes, oversized: int = 0) -> ChunkResult:
        """Whole frames, already de-framed, read as one chunk would be (a reader that splits
        frames between destinations first: ingest/split.py)."""
        return self._frames(frames, received_at, oversized)

    def _frames(self, frames: list[bytes], received_at: bytes, oversized: int) -> ChunkResult:
        out = ChunkResult(frames=len(frames), oversized=oversized)
        # The per-message loop: locals instead of attribute and method lookups (this is the
        # reference, but it also runs wherever the compiled reader is not available).
        programs = self._filter.programs
        keep_tag = self._filter.keep_tag
        dumps = orjson.dumps
        header = read_header
        text_of = event_text
        time_ok = valid_time
        bad_times = 0
        parts: list[bytes] = []
        append = parts.append
        lens = out.lens
        tparts: list[bytes] = []
        accepted = 0
        for frame in frames:
            h = header(frame)
            ps, pe = h.prog_start, h.prog_end
            # startswith with a span: no slice, no object for the messages we drop.
            if not frame.startswith(programs, ps, pe):
                continue
            accepted += 1
            text = text_of(frame, h, bool(keep_tag) and frame.startswith(keep_tag, ps, pe))
            frag = dumps(text)
            if h.ts_zoned:
                ts = frame[h.ts_start : h.ts_end]
                if not time_ok(ts):
                    # A sender's impossible time: the reception time instead, counted.
                    bad_times += 1
                    ts = received_at
            else:
                ts = received_at
            # The literal is the UTF-8 text plus two quotes plus escapes, never less: only
            # a fragment over the limit needs the exact count.  (Bounding by the frame's
            # MSG bytes missed a kept "name[pid]: " tag and let such events through.)
            if len(frag) - 2 > MAX_EVENT_BYTES and len(text.encode("utf-8")) > MAX_EVENT_BYTES:
                out.too_large.append((frag, ts))
                continue
            append(frag)
            lens.append(len(frag))
            tparts.append(ts)
        out.accepted = accepted
        out.bad_times = bad_times
        out.filtered = out.frames - out.accepted
        out.data = b"".join(parts)
        out.tdata, out.tlens = pack_times(tparts)
        dec = self._decoder
        if dec is not None and dec.error is not None and not self._seen_error:
            self._seen_error = True
            out.framing_errors = 1
            out.error = dec.error
        return out
