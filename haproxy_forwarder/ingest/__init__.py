"""The hot-path seam: bytes from a socket in, encoded events out (`ChunkReader`).

`new_reader` is the one constructor the sources use; a compiled reader with the same contract
will sit behind it, chosen here, with the pure-Python one (`_py`) as the reference.
"""

from __future__ import annotations

from ..syslog.framing import AUTO, LF, OCTET
from ._py import DATAGRAM, PyChunkReader
from .filter import ProgramFilter
from .result import ChunkReader, ChunkResult

IMPLEMENTATION = "python"

__all__ = [
    "AUTO",
    "DATAGRAM",
    "IMPLEMENTATION",
    "LF",
    "OCTET",
    "ChunkReader",
    "ChunkResult",
    "ProgramFilter",
    "PyChunkReader",
    "new_reader",
]


def new_reader(filt: ProgramFilter, max_message_size: int, framing: str = AUTO) -> ChunkReader:
    return PyChunkReader(filt, max_message_size, framing)
