"""Where the syslog conformance corpus lives (tests/conformance, with its README naming each
source), and its loaders.

The corpus is part of the repository: no test, tool or build step reads outside it, so a fresh
clone tests itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import REPO

CONFORMANCE = REPO / "tests" / "conformance"

FRAMING_VECTORS = "framing_vectors.jsonl"
RFC3164_VECTORS = "rfc3164_vectors.jsonl"
RFC5424_VECTORS = "rfc5424_vectors.jsonl"
HAPROXY_LINES = "haproxy_lines.txt"
SEKOIA_SAMPLES = "sekoia_haproxy_samples.txt"


def path(name: str) -> Path:
    return CONFORMANCE / name


def rows(name: str) -> list[Any]:
    """Every JSON value of a file holding one per line (the .jsonl vectors, the Sekoia samples).

    Blank lines are skipped.
    """
    return [json.loads(line) for line in path(name).read_text("utf-8").splitlines() if line]


def text_lines(name: str) -> list[bytes]:
    """The raw lines of a plain-text file (haproxy_lines.txt), without `#` comments or blanks."""
    return [
        line for line in path(name).read_bytes().split(b"\n")
        if line.strip() and not line.startswith(b"#")
    ]


def wire(row: dict[str, Any]) -> bytes:
    """The bytes on the wire of a parse vector (`input_encoding` latin-1: one octet a char)."""
    return bytes(row["input"].encode(row.get("input_encoding") or "utf-8"))
