"""What tests and the benchmark share: the daemon runner, the TOML writer, traffic, keys.

Development tooling only: not part of the wheel (pyproject packages only haproxy_forwarder*).
"""

from __future__ import annotations

from pathlib import Path

#: The repository's root (the daemon runs from there, config/ and tests/ live there).
REPO = Path(__file__).resolve().parents[1]
