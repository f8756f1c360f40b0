"""What one `ChunkReader.feed` returns: events already encoded, and the counts of the chunk.

The contract shared by the pure-Python reader and a compiled one: same bytes, same counts.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Protocol

from ..storage import Stored, new_lens, new_tlens


@dataclass(slots=True)
class ChunkResult(Stored):
    """Events completed by one chunk, in arrival order, stored as storage.py says.

    `data` holds each kept event as the JSON string literal orjson writes for its text
    (quotes included), back to back, `lens[i]` the length of event i's; `tdata` its timestamp
    (the header's own RFC 3339 time if zoned and valid, else the reception time), back to
    back, `tlens[i]` the length of event i's. No Python object per event.
    `too_large` holds events over the intake's 250 KiB limit, as (fragment, timestamp):
    they go to dead letters, never to a batch.
    """

    data: bytes = b""
    lens: array[int] = field(default_factory=new_lens)
    tdata: bytes = b""
    tlens: array[int] = field(default_factory=new_tlens)
    too_large: list[tuple[bytes, bytes]] = field(default_factory=list)
    frames: int = 0  # complete frames read (kept, filtered or too large)
    accepted: int = 0  # frames whose program passed the filter (too_large included)
    filtered: int = 0  # frames the program filter dropped
    oversized: int = 0  # frames over max_message_size, dropped by the framing
    bad_times: int = 0  # zoned header times that are no real date/time: reception time used
    framing_errors: int = 0  # 1 when the stream became unreadable (then `error` says why)
    error: str | None = None  # set once: the connection must be closed



class ChunkReader(Protocol):
    """One per connection (TCP) or per listener (UDP: every chunk is one datagram).

    A reader keeps the ProgramFilter it was made with and follows `ProgramFilter.update`
    from its next feed/close, frames already buffered included (SIGHUP reload).
    """

    def feed(self, chunk: bytes, received_at: bytes) -> ChunkResult: ...

    def close(self, received_at: bytes) -> ChunkResult:
        """End of stream: an unterminated LF line is a frame; a cut octet frame an error."""
        ...

    @property
    def buffered(self) -> int:
        """Bytes held between calls (a partial frame), bounded by max_message_size."""
        ...
