"""The spool's exceptions, one module so that every part (format, segments, queue) raises the same.

All derive from SpoolError; RecordTooLarge is also a ValueError (the batch itself is at fault).
"""

from __future__ import annotations


class SpoolError(Exception):
    """Base class of the spool's errors."""


class SpoolFull(SpoolError):
    """append() with when_full="block" and no room: apply backpressure, retry later."""


class RecordTooLarge(SpoolError, ValueError):
    """The batch can never fit (larger than max_size, or payload over 4 GiB)."""


class SpoolLocked(SpoolError):
    """Another process holds the spool directory."""


class UnsafeSpoolFile(SpoolError, OSError):
    """A spool file that is a symbolic link, or owned by another user: never opened.

    Also an OSError, so that the paths that survive a failing disk survive this too.
    """

    def __init__(self, path: object, why: str) -> None:
        super().__init__(f"refusing spool file {path}: {why}")
        self.path = path


class SpoolWriteError(SpoolError):
    """The disk refused a write (ENOSPC, EIO, EROFS...); the spool is still consistent."""

    def __init__(self, message: str, cause: OSError) -> None:
        super().__init__(f"{message}: {cause}")
        self.cause = cause
        self.errno = cause.errno
