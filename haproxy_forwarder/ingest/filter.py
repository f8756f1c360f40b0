"""The program filter: which frames are HAProxy's, and which keep their "name[pid]:" tag.

A named stage so that sources, the compiled reader and config speak of one thing.
"""

from __future__ import annotations

from collections.abc import Sequence


class ProgramFilter:
    """Keep frames whose program (APP-NAME / TAG) starts with one of `programs`.

    Events of programs starting with a `keep_tag` prefix keep "name[pid]: " in front of the
    message (HAProxy Enterprise's parser on the Sekoia side expects it).
    """

    __slots__ = ("keep_tag", "programs")

    def __init__(self, programs: Sequence[str], keep_tag: Sequence[str] = ("hapee",)) -> None:
        self.programs: tuple[bytes, ...] = ()
        self.keep_tag: tuple[bytes, ...] = ()
        self.update(programs, keep_tag)

    def update(self, programs: Sequence[str], keep_tag: Sequence[str]) -> None:
        """New prefixes, in place (a reload): every reader sharing this filter, including those
        of connections already open, applies them from its next chunk. Readers notice by the
        identity of the tuples: `programs` (never empty) is always a new one."""
        if not programs or any(not p for p in programs):
            raise ValueError("needs at least one non-empty program name prefix")
        self.programs = tuple(p.encode() for p in programs)
        self.keep_tag = tuple(p.encode() for p in keep_tag if p)
