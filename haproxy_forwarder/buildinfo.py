"""What this installation runs: version, ingest implementation, gzip implementation.

Shown by `--version`, the `started` log line and /metrics (haproxy_forwarder_build_info).
"""

from __future__ import annotations

from . import __version__, ingest
from .sinks import encoding

EXPECT_COMPILED_ENV = "HAPROXY_FORWARDER_EXPECT_COMPILED"


def build_info() -> dict[str, str]:
    return {
        "version": __version__,
        "ingest": ingest.IMPLEMENTATION,
        "compressor": encoding.GZIP_IMPLEMENTATION,
    }


def describe() -> str:
    info = build_info()
    return (f"haproxy-forwarder {info['version']} "
            f"(ingest: {info['ingest']}, gzip: {info['compressor']})")
