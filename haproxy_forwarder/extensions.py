"""Whether the compiled modules are wanted: one rule for every compiled/pure pair.

`HAPROXY_FORWARDER_NO_EXTENSIONS=1` (like AIOHTTP_NO_EXTENSIONS) selects the pure-Python twins.
"""

from __future__ import annotations

import os

NO_EXTENSIONS_ENV = "HAPROXY_FORWARDER_NO_EXTENSIONS"


def disabled() -> bool:
    """HAPROXY_FORWARDER_NO_EXTENSIONS asks for the pure-Python implementations (1, true, yes)."""
    return os.environ.get(NO_EXTENSIONS_ENV, "").strip().lower() not in ("", "0", "false", "no")
