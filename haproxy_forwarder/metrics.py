"""Counters shared by every component, named like Vector's (component_received_events...).

Plain int attributes on one object: incrementing them is the cheapest thing Python can do,
which matters on the per-message path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Counters:
    # input
    connections_accepted: int = 0
    connections_refused: int = 0
    connections_evicted: int = 0
    connections_open: int = 0
    received_frames: int = 0
    received_bytes: int = 0
    framing_errors: int = 0
    oversized_frames: int = 0
    udp_dropped: int = 0
    # filter
    filtered_out: int = 0
    accepted_events: int = 0
    # delivery
    batches_sent: int = 0
    delivered_events: int = 0
    delivered_batches: int = 0
    retries: int = 0
    uncertain_deliveries: int = 0
    dead_lettered_events: int = 0
    spooled_batches: int = 0
    spool_dropped_events: int = 0
    spool_write_errors: int = 0
    requeued_events: int = 0
    dropped_events: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)
