"""A byte flipped in a sealed spool segment while the daemon is stopped.

Sealed: any segment but the newest (the one a crash may leave torn). Before flipping, the
segment is read with the spool's own format module, so the soak knows which record it damaged,
whether that record was acked, and which event ids it held: the ledger then expects exactly
those events (if not acked) to be counted lost to corruption by the next run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from haproxy_forwarder.spool.format import HEADER_SIZE, scan, scan_acks

from .events import ID_RE, SOURCES


@dataclass
class Flip:
    segment: str
    offset: int
    record_offset: int
    acked: bool
    ids: list[int] = field(default_factory=list)
    last_record: bool = False  # the damaged record was the segment's last (no valid after)

    def describe(self) -> str:
        where = "last record" if self.last_record else "record"
        return (f"{self.segment} byte {self.offset} ({where} at {self.record_offset}, "
                f"{len(self.ids)} events, {'acked' if self.acked else 'not acked'})")


def flip_byte(spool_dir: Path, rng: random.Random) -> Flip | None:
    """Flip one byte of one record of a sealed segment; None when there is none to damage."""
    segs = sorted((spool_dir / "segments").glob("*.seg"))
    candidates = []
    for path in segs[:-1]:
        data = path.read_bytes()
        records = scan(data).records
        if records:
            candidates.append((path, data, records))
    if not candidates:
        return None
    path, data, records = rng.choice(candidates)
    i = rng.randrange(len(records))
    rec = records[i]
    # A byte of the payload (where the events are) three times in four, else of the header.
    if rng.random() < 0.75 and rec.length > HEADER_SIZE:
        offset = rec.offset + rng.randrange(HEADER_SIZE, rec.length)
    else:
        offset = rec.offset + rng.randrange(HEADER_SIZE)
    raw = data[rec.offset: rec.offset + rec.length]
    ids = [(SOURCES.index(m[1].decode()) << 40) | int(m[2]) for m in ID_RE.finditer(raw)]
    seq = int(path.stem)
    ack_path = path.with_suffix(".ack")
    acked = ack_path.exists() and rec.offset in scan_acks(ack_path.read_bytes(), seq).offsets
    damaged = bytearray(data)
    damaged[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(damaged))
    return Flip(path.name, offset, rec.offset, acked, ids, last_record=i == len(records) - 1)
