"""A logger for in-process tests: every line kept as (event, fields), as structlog's would be."""

from __future__ import annotations

from typing import Any


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    info = warning = error = exception = _add

    def named(self, event: str) -> list[dict[str, Any]]:
        """The fields of every line of `event`, in order."""
        return [f for e, f in self.lines if e == event]
