"""The one registry of counters every component writes to, the spool included.

Plain int attributes on dataclasses: incrementing them is the cheapest thing Python can do,
which matters on the per-message path. One name per thing: the same flat names appear in
/metrics (as haproxy_forwarder_<name>_total), in the `stats` log line and in `spool stats`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class SpoolCounters:
    """What the disk spool did; exported with the prefix `spool_`."""

    appended_batches: int = 0
    appended_events: int = 0
    acked_batches: int = 0
    acked_events: int = 0
    # when_full = "drop_oldest": un-acked batches deleted to make room (lost, and said so)
    dropped_batches: int = 0
    dropped_events: int = 0
    # dropped from disk while handed out: still delivered from memory, only not durable
    evicted_inflight: int = 0
    rejected_full: int = 0  # when_full = "block": appends refused (input held back)
    write_errors: int = 0
    space_reclaims: int = 0  # ENOSPC answered by deleting fully acked segments
    ack_write_errors: int = 0  # an ack not persisted: a duplicate after a restart
    delete_errors: int = 0
    quarantined_segments: int = 0
    repair_errors: int = 0
    corrupt_records: int = 0  # records that failed their checksum (at open or when read)
    purged_batches: int = 0
    purged_events: int = 0

    def snapshot(self) -> dict[str, int]:
        return {f"spool_{k}": v for k, v in asdict(self).items()}


@dataclass(slots=True)
class Counters:
    # input
    connections_accepted: int = 0
    connections_refused: int = 0
    connections_evicted: int = 0
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
    requeued_events: int = 0
    dropped_events: int = 0  # lost for good: dead-letter store full or failing, shutdown
    spool: SpoolCounters = field(default_factory=SpoolCounters)

    def snapshot(self) -> dict[str, int]:
        out = {k: v for k, v in asdict(self).items() if k != "spool"}
        out.update(self.spool.snapshot())
        return out


class Registry:
    """Counters plus gauges read at scrape time from the components that own them."""

    def __init__(self, info: dict[str, str] | None = None) -> None:
        self.counters = Counters()
        self._gauges: dict[str, Callable[[], float]] = {}
        # Labels of the build_info gauge: version, which ingest and gzip implementations run.
        self.info: dict[str, str] = dict(info or {})

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        if name in self._gauges:
            raise ValueError(f"gauge {name!r} registered twice")
        self._gauges[name] = read

    def gauges(self) -> dict[str, float]:
        return {name: float(read()) for name, read in self._gauges.items()}

    def snapshot(self) -> dict[str, float]:
        """Everything, flat: the `stats` log line."""
        return {**self.counters.snapshot(), **self.gauges()}
