"""Run the forwarder's CLI with candidate optimisations patched in, to measure them end to end
without touching haproxy_forwarder/ (its owners decide what to adopt).

    python -m bench.patches fasthdr,isal --config cfg.toml run

Patches:
  fasthdr  Pipeline.ingest uses a regex fast path for the dominant shape
           `<PRI>Mmm dd hh:mm:ss host tag[pid]: ` that returns the very same Header as
           read_header (falls back to read_header for anything else; `check_fasthdr()`
           proves equality on the benchmark stream).
  isal     gzip bodies with python-isal's igzip (level 1) instead of zlib level 1.
  zlibng   gzip bodies with zlib-ng (level 1).
  (nospill, measured in the earlier run of BENCHMARKS.md, is now the daemon's behaviour.)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

from haproxy_forwarder.syslog import header as _h

_new = tuple.__new__
Header = _h.Header

# Only what read_header's "Mmm dd hh:mm:ss " branch + plain HOSTNAME + "tag[pid]: " accept.
_FAST = re.compile(
    rb"<(\d{1,3})>"
    rb"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ 0-9][0-9] \d\d:\d\d:\d\d "
    rb"([A-Za-z0-9._-]+) "
    rb"([A-Za-z0-9_./-]+)\[(\d+)\]: "
)


def fast_read_header(frame: bytes, _match: Callable[..., Any] = _FAST.match,
                     _slow: Callable[[bytes], Any] = _h.read_header) -> Any:
    m = _match(frame)
    if m is None:
        return _slow(frame)
    # m.regs: every span in one attribute access (cheaper than span() calls)
    (_, end), (ds, de), (hs, he), (ps, pe), (qs, qe) = m.regs
    pri = int(frame[ds:de])
    if pri > 191:
        pri = -1
    return _new(Header, (ps, pe, ps, end, de + 1, de + 16, False, pri, 0, hs, he, qs, qe, 0, 0))


def check_fasthdr(frames: list[bytes]) -> tuple[int, int]:
    """(frames that took the fast path, mismatches against read_header)."""
    fast = bad = 0
    for f in frames:
        if _FAST.match(f):
            fast += 1
            if fast_read_header(f) != _h.read_header(f):
                bad += 1
    return fast, bad


def apply(names: str) -> list[str]:
    applied = []
    for name in filter(None, names.split(",")):
        if name == "fasthdr":
            from haproxy_forwarder import pipeline

            pipeline.read_header = fast_read_header  # type: ignore[assignment]
        elif name in ("isal", "zlibng"):
            from haproxy_forwarder import encoding

            # encoding.body() compresses with zlib.compressobj: swap in a module with the
            # same API.
            modname = "isal.isal_zlib" if name == "isal" else "zlib_ng.zlib_ng"
            encoding.zlib = __import__(modname, fromlist=["x"])  # type: ignore[assignment]
        elif name != "none":
            raise SystemExit(f"unknown patch {name!r}")
        applied.append(name)
    return applied


if __name__ == "__main__":
    apply(sys.argv[1])
    from haproxy_forwarder.cli import main

    sys.exit(main(sys.argv[2:]))
