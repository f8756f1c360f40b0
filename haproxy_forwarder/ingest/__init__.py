"""The hot-path seam: bytes from a socket in, encoded events out (`ChunkReader`).

`new_reader` is the one constructor the sources use. The compiled reader (`_native`, Cython)
runs by default; `HAPROXY_FORWARDER_NO_EXTENSIONS=1` selects the pure-Python reference (`_py`).
"""

from __future__ import annotations

import importlib.machinery
from collections.abc import Callable
from pathlib import Path

from ..extensions import NO_EXTENSIONS_ENV, disabled
from ..syslog.framing import AUTO, LF, OCTET
from ._py import DATAGRAM, PyChunkReader
from .filter import ProgramFilter
from .result import ChunkReader, ChunkResult

__all__ = [
    "AUTO",
    "DATAGRAM",
    "IMPLEMENTATION",
    "IMPORT_ERROR",
    "LF",
    "NO_EXTENSIONS_ENV",
    "OCTET",
    "ChunkReader",
    "ChunkResult",
    "ProgramFilter",
    "PyChunkReader",
    "built",
    "disabled",
    "new_reader",
]

def built() -> bool:
    """Was the compiled reader built into this installation (a `_native` extension file)?"""
    here = Path(__file__).parent
    return any(
        (here / f"_native{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


_reader: Callable[[ProgramFilter, int, str], ChunkReader] = PyChunkReader
IMPLEMENTATION = "python"
# Why the compiled reader is not in use although it was built: said loudly at start-up.
IMPORT_ERROR: str | None = None

if not disabled():
    try:
        from ._native import NativeChunkReader
    except ImportError as exc:
        if built():
            IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    else:
        _reader = NativeChunkReader
        IMPLEMENTATION = "native"


def new_reader(filt: ProgramFilter, max_message_size: int, framing: str = AUTO) -> ChunkReader:
    return _reader(filt, max_message_size, framing)
