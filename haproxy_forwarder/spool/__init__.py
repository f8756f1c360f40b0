"""Durable on-disk spool of batches: append-only, checksummed segments; ack to delete.

format (records, pure) · recovery (open) · segments (files, behind `Filesystem`) · queue (`Spool`:
locks, state, the steps of each call) over index (what is held in memory), lifecycle (segments
created, sealed, deleted) and room (the size bound: block / drop_oldest, `Losses`).

API
---
    spool = Spool(directory, max_size=1 << 30, when_full="block", segment_size=32 << 20,
                  counters=registry.counters.spool, fs=Filesystem())
    report = spool.open()            # RecoveryReport: log report.as_dict()
    res = spool.append(batch)        # AppendResult(record_id, dropped_batches, dropped_events,
                                     # evicted), durable (fsync'd) on return; SpoolFull,
                                     # SpoolWriteError, RecordTooLarge
    item = spool.next_batch()        # (rid, Batch) oldest not handed out and not acked, or None
    spool.ack(rid)                   # delivered: never replayed after a restart
    spool.stats()                    # gauges: batches, events, bytes, oldest_age_seconds,
                                     # segments, inflight, max_size
    spool.counters                   # SpoolCounters (appended_batches, corrupt_records, ...)
    spool.take_losses()              # Losses not returned by an append (corrupt records, drops
                                     # of failed appends), each returned once: count them
    spool.purge()                    # delete every segment -> (batches, events) removed
    spool.close()
    spool.size_bytes, spool.pending_batches, spool.pending_events, spool.has_ready
    inspect_spool(directory)         # read-only {"stats", "recovery"}, for `spool stats` (CLI)

`Spool(d).open(readonly=True)` reads without modifying anything (no lock, no truncation, no
quarantine); append/ack/purge then raise SpoolError. A read-write open takes an exclusive
flock on segments/LOCK, so two daemons cannot share a spool (SpoolLocked).
"""

from __future__ import annotations

from .errors import (
    RecordTooLarge,
    SpoolError,
    SpoolFull,
    SpoolLocked,
    SpoolWriteError,
    UnsafeSpoolFile,
)
from .format import HEADER_SIZE
from .queue import AppendResult, Evicted, Losses, Spool, WhenFull, inspect_spool
from .recovery import QuarantinedSegment, RecoveryReport, TruncatedTail
from .segments import Filesystem

__all__ = [
    "HEADER_SIZE",
    "AppendResult",
    "Evicted",
    "Filesystem",
    "Losses",
    "QuarantinedSegment",
    "RecordTooLarge",
    "RecoveryReport",
    "Spool",
    "SpoolError",
    "SpoolFull",
    "SpoolLocked",
    "SpoolWriteError",
    "TruncatedTail",
    "UnsafeSpoolFile",
    "WhenFull",
    "inspect_spool",
]
