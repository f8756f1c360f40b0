"""Where every batch in delivery is, and what happens to it next: a pure state machine.

No asyncio, no IO, no tasks: the writer and the workers ask it, act, and report back; an
injected clock dates what waits in memory, so every rule is unit-tested with a fake clock.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..acks import Waiter, lose_all, release_all
from ..batching import Batch

# A batch waiting in memory longer than this (the intake is slower than the input) is written
# to the spool: "cannot be delivered at once" must not mean "only in RAM".
SPILL_AFTER = 1.0


class Location(enum.Enum):
    MEMORY = "memory"  # queued for a worker; only in RAM
    TO_SPOOL = "to_spool"  # queued for the spool writer; only in RAM
    SPOOLING = "spooling"  # the writer's append is running; only in RAM until it returns
    SPOOLED = "spooled"  # durable and ready: the spool's queue owns it from here on
    SENDING = "sending"  # held by a worker; `Entry.record` says whether it is on disk too
    # (drop_oldest may delete a record a worker holds: `Router.evicted` clears its record)
    DONE = "done"  # delivered or dead-lettered (its record, if any, acked)


class RouterError(RuntimeError):
    """A transition the rules forbid (a bug): a batch in two places, a record sent twice."""


@dataclass(eq=False, slots=True)
class Entry:
    """One batch and where it is. Identity matters: an entry is in exactly one place."""

    batch: Batch
    location: Location
    queued_at: float
    record: int | None = None  # spool record id once the batch is on disk
    worker: int | None = None
    # A request for it is on the wire. Cleared when the answer comes, never on cancellation:
    # a request cut off at shutdown may have been taken (an uncertain delivery).
    on_wire: bool = False
    spoolable: bool = True  # False once the spool said the record can never fit
    # drop_oldest deleted its record while a worker held it: the writer does not claim it
    # again to keep order (drop_oldest would delete other batches to make room for one that
    # is being sent); a failure or a stop writes it again, as before.
    evicted: bool = False
    # The waiters of the takes whose events it holds (RELP; `Batch.acks` at submit): released
    # once it is fsync'd on the spool, or delivered (every part, its dead letters on disk)
    # when it cannot be; then None.
    acks: list[Waiter] | None = None
    # Submission number: the writer appends in its order. 0 for a record the spool handed
    # out: older than anything not on disk.
    seq: int = 0


def durable(entry: Entry) -> None:
    """Every event of `entry` is on disk or delivered: its waiters are released (once)."""
    acks, entry.acks = entry.acks, None
    release_all(acks)


def lost(entry: Entry) -> None:
    """Some events of `entry` may be lost: its waiters are never called."""
    acks, entry.acks = entry.acks, None
    lose_all(acks)


class FromSpool:
    """`Router.take`'s answer when the next batch is the spool's oldest ready record."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FROM_SPOOL"


FROM_SPOOL = FromSpool()


class Router:
    """The locations of batches not yet delivered, and the rules that move them.

    `spool_ready` reads the spool's cheap "has ready records" flag; None means no spool
    (dry-run). `on_pressure(True/False)` is called when backpressure must switch.
    """

    def __init__(
        self,
        *,
        now: Callable[[], float],
        spool_ready: Callable[[], bool] | None,
        write_ahead: bool,
        max_in_flight: int,
        on_pressure: Callable[[bool], None],
    ) -> None:
        self._now = now
        self._spool_ready = spool_ready
        self.has_spool = spool_ready is not None
        self.write_ahead = write_ahead and self.has_spool
        self.max_in_flight = max_in_flight
        self._on_pressure = on_pressure
        self.memory: deque[Entry] = deque()
        self.to_spool: deque[Entry] = deque()
        self.spooling: Entry | None = None  # the writer appends one batch at a time
        self.held: dict[int, Entry] = {}  # worker number -> the entry it sends
        self.failing = False
        self.spool_blocked = False
        self.stopping = False
        self.closed = False  # stop() was called: late reports are ignored
        self.submitted = 0  # batches submitted so far: the last one's Entry.seq
        self.pressure = False
        # Handed-out records drop_oldest deleted before their worker was known to hold them
        # (the report of an append can overtake took_record or claimed): record -> events.
        self.gone: dict[int, int] = {}

    # -- accounting ---------------------------------------------------------------------------

    def _ready(self) -> bool:
        return self._spool_ready is not None and self._spool_ready()

    @property
    def waiting(self) -> int:
        """Batches waiting for a worker or for the spool writer: what backpressure limits."""
        return len(self.memory) + len(self.to_spool) + (self.spooling is not None)

    def check_pressure(self) -> None:
        """Switch backpressure if what waits crossed its limits (on at max_in_flight, off
        below half of it)."""
        n = self.waiting
        if not self.pressure and n >= self.max_in_flight:
            self.pressure = True
            self._on_pressure(True)
        elif self.pressure and n < max(1, self.max_in_flight // 2):
            self.pressure = False
            self._on_pressure(False)

    def set_max_in_flight(self, n: int) -> None:
        """batch.max_in_flight changed (a reload): backpressure follows at once."""
        self.max_in_flight = n
        self.check_pressure()

    def memory_only(self) -> list[Entry]:
        """Entries neither delivered nor on disk, oldest first (what a crash would lose)."""
        held = [e for e in self.held.values() if e.record is None]
        spooling = [self.spooling] if self.spooling is not None else []
        # In submission order (a stop appends them so): the queues are, but a held batch may
        # be older or newer than what waits (several workers, a batch too large for the spool).
        return sorted([*held, *self.memory, *spooling, *self.to_spool], key=lambda e: e.seq)

    @property
    def in_memory(self) -> int:
        held = sum(1 for e in self.held.values() if e.record is None)
        return held + len(self.memory) + (self.spooling is not None) + len(self.to_spool)

    def settled(self) -> bool:
        """Nothing exists only in memory and no request is on the wire: stopping loses nothing."""
        return (
            not self.memory
            and not self.to_spool
            and self.spooling is None
            and all(e.record is not None and not e.on_wire for e in self.held.values())
        )

    # -- closed batches -----------------------------------------------------------------------

    def submit(self, batch: Batch) -> Entry:
        """A closed batch: to memory for a worker, or behind what is on (or going to) disk."""
        self.submitted = seq = self.submitted + 1
        entry = Entry(batch, Location.MEMORY, self._now(), seq=seq)
        acks = batch.acks
        if acks is not None:
            batch.acks = None  # the entry's from now on (its batch may be replaced)
            entry.acks = acks
        if self.has_spool and (
            self.write_ahead
            or acks is not None  # its senders wait for the fsync: write-ahead for it
            or self.failing
            or self.to_spool
            or self.spooling is not None
            or self._ready()
        ):
            # Behind what is already on disk or on its way there, so order is kept.
            entry.location = Location.TO_SPOOL
            self.to_spool.append(entry)
        else:
            # A burst the intake absorbs within SPILL_AFTER stays in memory (bounded by
            # max_in_flight through backpressure); spill() moves what waits longer.
            self.memory.append(entry)
        self.check_pressure()
        return entry

    def spill(self) -> bool:
        """If the oldest memory batch waited more than SPILL_AFTER, queue ALL of memory for disk.

        All of them, not just the stale ones: newer batches must stay behind older ones, or
        per-connection order breaks. True when something moved (wake the writer).
        """
        if not self.has_spool:
            return False
        oldest = next((e for e in self.memory if e.spoolable), None)
        if oldest is None or self._now() - oldest.queued_at <= SPILL_AFTER:
            return False
        self._memory_to_spool()
        return True

    def _memory_to_spool(self) -> None:
        # Ahead of what is queued already: memory batches are the older ones. Not an event
        # too large for the whole spool: it never fits, it stays (in its place) for a worker.
        moved = [e for e in self.memory if e.spoolable]
        if len(moved) < len(self.memory):
            self.memory = deque(e for e in self.memory if not e.spoolable)
        else:
            self.memory.clear()
        for e in reversed(moved):
            e.location = Location.TO_SPOOL
            self.to_spool.appendleft(e)

    # -- the spool writer ---------------------------------------------------------------------

    def next_write(self) -> Entry | None:
        """The batch the writer should append now, if anything must go to disk.

        Appends keep submission order, as the spool replays in append order (after a crash
        or a restart too): before the oldest batch queued for disk, every older batch still
        only in memory goes first. Memory batches join the queue ahead of it; a batch a
        worker holds (SENDING, no record) is returned as it is: the writer claims it (on disk,
        not handed out again), and the worker goes on sending it. Without this, a batch on
        the wire when newer ones are spilled, or written ahead for RELP, would be replayed
        after them (claimed at its first failure, or spooled at a stop).
        """
        if self.spooling is not None:
            raise RouterError("the writer appends one batch at a time")
        if not self.to_spool:
            return None
        self._older_memory_ahead()
        head = self.to_spool[0].seq
        older = [e for e in self.held.values()
                 if e.record is None and e.spoolable and not e.evicted and e.seq < head]
        if older:
            return min(older, key=lambda e: e.seq)
        entry = self.spooling = self.to_spool.popleft()
        entry.location = Location.SPOOLING
        return entry

    def _older_memory_ahead(self) -> None:
        # Older than the head of the spool queue: there only after a RELP batch was queued
        # for disk (submit) while older ones waited in memory. Not those too large
        # for the spool (they stay, or the writer would try them again and again).
        head = self.to_spool[0].seq
        if not self.memory or self.memory[0].seq > head:
            return  # nothing in memory is older than the queue
        older = [e for e in self.memory if e.spoolable and e.seq < head]
        self.memory = deque(e for e in self.memory if not (e.spoolable and e.seq < head))
        for e in reversed(older):
            e.location = Location.TO_SPOOL
            self.to_spool.appendleft(e)

    def _end_write(self, entry: Entry) -> None:
        if entry is not self.spooling:
            raise RouterError(f"{entry.location.value} batch reported as written")
        self.spooling = None

    def written(self, entry: Entry) -> None:
        """Durable and ready on disk: the spool hands it out from now on."""
        self._end_write(entry)
        entry.location = Location.SPOOLED
        self.check_pressure()

    def write_refused(self, entry: Entry) -> None:
        """Spool full or failing: back at the head of the queue; a worker may send it from RAM."""
        self._end_write(entry)
        entry.location = Location.TO_SPOOL
        self.to_spool.appendleft(entry)
        self.block_spool()

    def unspoolable(self, entry: Entry) -> None:
        """Larger than the whole spool (a tiny max_size). Several events: replaced by its two
        halves at the head of the queue, written next (in order, so a restart replays them
        in their place; sent from memory, it would overtake older records on the spool).
        One event: it can only go from memory."""
        self._end_write(entry)
        if len(entry.batch) > 1:
            entry.location = Location.DONE  # its halves stand for it from now on
            first, second = entry.batch.split()
            acks, entry.acks = entry.acks, None
            parts = [Entry(first, Location.TO_SPOOL, entry.queued_at, seq=entry.seq, acks=acks),
                     Entry(second, Location.TO_SPOOL, entry.queued_at, seq=entry.seq)]
            if acks is not None:
                for w in acks:
                    w.hold()  # the second half holds its waiters too (the first, the original's)
                parts[1].acks = list(acks)
            self.to_spool.extendleft(reversed(parts))
            self.check_pressure()
            return
        entry.spoolable = False
        entry.location = Location.MEMORY
        self.memory.append(entry)
        self.check_pressure()

    def block_spool(self) -> None:
        """The spool refused a write (full, failing): workers may send what waits for it from
        memory, and it counts as refusing writes until unblock_spool()."""
        self.spool_blocked = True

    def unblock_spool(self) -> bool:
        """An append succeeded, or nothing waits for the disk any more (what it refused was
        sent from memory); True if the spool had been refusing writes."""
        was, self.spool_blocked = self.spool_blocked, False
        return was

    def never_fits(self, entry: Entry) -> None:
        """The spool said the batch a worker holds is larger than it can ever hold (its claim
        was refused as too large): it is sent from memory only, never claimed again."""
        entry.spoolable = False

    def take_gone(self) -> dict[int, int]:
        """The handed-out records drop_oldest deleted that no worker was known to hold
        (record -> events), forgotten here: after a stop, the caller counts them as lost."""
        gone, self.gone = self.gone, {}
        return gone

    # -- workers ------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Shutdown: from now on the workers send only what is in memory (the spool keeps the
        rest for the next start)."""
        self.stopping = True

    def take(self, worker: int) -> Entry | FromSpool | None:
        """What `worker` sends next: an entry, FROM_SPOOL (ask the spool), or None (wait)."""
        if worker in self.held:
            raise RouterError(f"worker {worker} already holds a batch")
        # While the intake fails, the workers already retrying are the probes; the others
        # wait instead of adding to a retry storm (Vector #10870).
        if self.failing:
            return None
        if self.memory:
            return self._hold(worker, self.memory.popleft())
        if self._ready() and not self.stopping:
            # Draining at shutdown is about what is only in memory; the spool keeps the rest.
            return FROM_SPOOL
        if self.spool_blocked and self.to_spool and self.spooling is None:
            # The disk refuses them, but a healthy intake can still take them from memory.
            # Not while the writer tries again: if its (older) batch landed on disk after a
            # newer one was sent, order would break.
            return self._hold(worker, self.to_spool.popleft())
        return None

    def _hold(self, worker: int, entry: Entry) -> Entry:
        entry.location = Location.SENDING
        entry.worker = worker
        self.held[worker] = entry
        self.check_pressure()
        return entry

    def took_record(self, worker: int, record: int, batch: Batch) -> Entry:
        """The spool handed `worker` a record (after take() said FROM_SPOOL)."""
        if worker in self.held:
            raise RouterError(f"worker {worker} already holds a batch")
        if any(e.record == record for e in self.held.values()):
            raise RouterError(f"spool record {record} handed out twice")
        # Deleted from disk meanwhile (drop_oldest): the worker holds it in memory only.
        on_disk = self.gone.pop(record, None) is None
        entry = Entry(batch, Location.SENDING, self._now(), record=record if on_disk else None,
                      evicted=not on_disk)
        return self._hold(worker, entry)

    def entry(self, worker: int) -> Entry:
        try:
            return self.held[worker]
        except KeyError:
            raise RouterError(f"worker {worker} holds nothing") from None

    def failed(self, worker: int, outstanding: Batch) -> Batch | None:
        """An attempt failed (to be retried); `outstanding` is what is not delivered yet.

        The first failure turns on `failing` and sends the memory batches to the writer (the
        outage may last). Returns the batch to claim on the spool NOW, before the retry wait,
        so a crash cannot lose it; None when it is on disk already or cannot be.
        """
        entry = self.entry(worker)
        if not self.failing:
            self.failing = True
            if self.has_spool:
                self._memory_to_spool()
        # What is left to deliver, also of a batch on disk: if drop_oldest deletes its record
        # during the retries, only this part must be written again at a shutdown.
        entry.batch = outstanding
        if entry.record is not None:
            return None  # the whole record stays on disk until acked
        if not self.has_spool or not entry.spoolable:
            return None
        return outstanding

    def claimed(self, entry: Entry, record: int) -> bool:
        """A batch a worker holds is on disk, claimed (the spool will not hand it out): its
        first failure, or the writer keeping order (next_write).

        True when its worker finished it meanwhile (delivered while the claim was written):
        the record must be acked now, or a restart would send it again.
        """
        if self.gone.pop(record, None) is not None:
            entry.evicted = True  # deleted by drop_oldest already: memory-only, as before
            return False
        if entry.location is Location.DONE:
            return True
        if entry.location is not Location.SENDING or entry.record is not None:
            raise RouterError(f"claim for a {entry.location.value} batch")
        entry.record = record
        return False

    def evicted(self, records: Iterable[tuple[int, int]]) -> None:
        """drop_oldest deleted these handed-out records, (record id, events), from disk.

        Their batches now exist only in the memory of the workers holding them: they count
        as memory-only (backlog, `settled`), a failure claims them again, and stop() writes
        them to the spool again. A record no worker holds yet is remembered for took_record
        or claimed, whichever comes (the append's report may overtake them).
        """
        holders = {e.record: e for e in self.held.values() if e.record is not None}
        for record, events in records:
            entry = holders.get(record)
            if entry is not None:
                entry.record = None
                entry.evicted = True
            else:
                self.gone[record] = events

    def recovered(self) -> bool:
        """An attempt succeeded; True if the intake had been failing (wake the workers)."""
        was, self.failing = self.failing, False
        return was

    def finished(self, worker: int) -> Entry:
        """Every event of the worker's batch delivered or dead-lettered; ack its record."""
        entry = self.held.pop(worker, None)
        if entry is None:
            raise RouterError(f"worker {worker} holds nothing")
        entry.location = Location.DONE
        entry.worker = None
        self.check_pressure()
        return entry

    # -- shutdown -----------------------------------------------------------------------------

    def stop(self) -> list[Entry]:
        """Forget everything; returns what must be spooled now (only in memory), oldest first."""
        leftovers = self.memory_only()
        self.closed = True
        self.memory.clear()
        self.to_spool.clear()
        self.spooling = None
        self.held.clear()
        for e in leftovers:
            e.location = Location.DONE
        return leftovers
