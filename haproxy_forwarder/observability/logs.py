"""structlog set-up: JSON lines on stderr (console renderer on a terminal), secrets redacted.

stdout is reserved for dry-run events, so logs always go to stderr.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# What a secret (the intake key) is replaced with, wherever it would be shown.
MASK = "********"

_secrets: list[str] = []


def add_secret(value: str) -> None:
    """Register a value that must never appear in a log line (the intake key)."""
    if value and value not in _secrets:
        _secrets.append(value)


def redact(text: str) -> str:
    """`text` with every registered secret masked (for output that bypasses the logger)."""
    return str(_scrub(text))


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # Last line of defence: whatever a caller puts in a log line, the key is masked.
    if _secrets:
        for k, v in event_dict.items():
            event_dict[k] = _scrub(v if not isinstance(v, BaseException) else repr(v))
    return event_dict


def configure(level: str = "info", fmt: str = "auto") -> None:
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
