"""What opening a spool costs in memory: a segment is read once, not held twice.

A daemon restarted after an outage opens a spool of full 32 MiB segments; recovery reads each
one whole to check its records. Read in 1 MiB pieces joined at the end, a segment was in
memory twice at once (+61 MiB of peak RSS for one 30 MiB segment, measured on the bench's
replay spool): a container with a tight memory limit could be killed at every start while
the spool holds what it must deliver. Measured in a child process (VmHWM reset through
/proc/self/clear_refs), as peak RSS is the process's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import REPO

SEGMENT = 24 << 20  # the segment's size on disk, about

CHILD = r"""
import json, re, sys
from pathlib import Path
from haproxy_forwarder.batching import Batch
from haproxy_forwarder.spool import Spool
from haproxy_forwarder.storage import new_lens, new_tlens

def kib(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read())[1])

directory, segment = Path(sys.argv[1]), int(sys.argv[2])
event = b'"' + b"x" * ((1 << 20) - 2) + b'"'  # 1 MiB events: few records, a big segment
ts = b"2026-12-07T22:00:00.000000+00:00"
sp = Spool(directory, max_size=4 * segment, segment_size=2 * segment)
sp.open()
for _ in range(segment >> 21):  # records of 2 events, 2 MiB each
    sp.append(Batch(event * 2, new_lens([len(event)] * 2), ts * 2, new_tlens([len(ts)] * 2)))
sp.close()
del sp, event
size = sum(p.stat().st_size for p in (directory / "segments").glob("*.seg"))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = kib("VmRSS")
sp = Spool(directory, max_size=4 * segment, segment_size=2 * segment)
sp.open()
rise = (kib("VmHWM") - before) * 1024
print(json.dumps({"size": size, "rise": rise, "batches": sp.stats()["batches"]}))
sp.close()
"""


def test_opening_a_spool_reads_each_segment_into_memory_once(tmp_path: Path) -> None:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs: peak RSS cannot be reset here")
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "spool"), str(SEGMENT)],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout)
    assert got["batches"] == SEGMENT >> 21
    assert got["size"] >= SEGMENT  # one segment holds them all
    # Once (the file's bytes), with room for the scan's bookkeeping; twice would be 2x.
    assert got["rise"] < 1.3 * got["size"], got
