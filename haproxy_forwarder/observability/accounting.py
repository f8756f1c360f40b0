"""The accounting identity: every event that came in is delivered, dead-lettered, dropped or held.

    accepted + spool_recovered + requeued  =  delivered + dead_lettered + dropped + held

- in: `accepted_events` (put into batches by the listeners), `spool_recovered_events` (found
  un-acked in the spool at start, left by the previous run), `requeued_events` (dead letters
  sent back by `spool replay-dead-letter`);
- out: `delivered_events` (2xx), `dead_lettered_events{reason}`, `dropped_events{reason}`;
- held: `events_held{where}`: "memory" (the open batch, batches in memory only, in flight
  without a spool record) and "spool" (un-acked records on disk, those being sent included).

Outside the identity, because they never became events: messages filtered out (another
program), frames over listen.max_message_size, UDP datagrams dropped under backpressure or by
the kernel (`udp_dropped`, `udp_kernel_dropped`), connections refused, and events no route
sends to an intake (`unrouted_events{reason}`: a `drop = true` route, or no route matched):
like filtered-out messages, they never became an intake's events.

Several intakes: the identity holds for each intake on its own, with its own terms (the
series labelled intake="NAME", and its `events_held`), and for the total: `balance()` on the
flat snapshot, `balance_by_intake()` on each intake's (Registry.intake_snapshot).

The identity is exact at rest. While traffic flows, a scrape can land between a thread's
append, ack or dead-letter write and the moment the event loop hears of it: the sum is then off
by the events of those few batches (one per spool/dead-letter thread), never more, and it
settles as soon as they are reported. Pure arithmetic here; wiring.held_events measures `held`.
"""

from __future__ import annotations

from collections.abc import Mapping

IN = ("accepted_events", "spool_recovered_events", "requeued_events")
OUT = ("delivered_events", "dead_lettered_events", "dropped_events")


def balance(snapshot: Mapping[str, float]) -> dict[str, int]:
    """The identity's terms from a flat snapshot (the stats line's, or /metrics summed over
    labels) holding the counters and `events_held` summed over `where`: in, out, held and
    `unaccounted` (in - out - held, 0 at rest)."""
    came = sum(int(snapshot.get(k, 0)) for k in IN)
    went = sum(int(snapshot.get(k, 0)) for k in OUT)
    kept = int(snapshot.get("events_held", 0))
    return {"events_in": came, "events_out": went, "events_held": kept,
            "events_unaccounted": came - went - kept}


def balance_by_intake(snapshots: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, int]]:
    """{intake: its identity's terms} from {intake: its flat snapshot} (the counters and
    `events_held` of that intake alone: Registry.intake_snapshot, or /metrics' series of that
    intake label summed over the others)."""
    return {name: balance(snap) for name, snap in snapshots.items()}


# Gauges that are yes/no: shown as booleans on the stats line.
FLAGS = ("paused", "intake_failing", "spool_blocked")


def stats_fields(snapshot: Mapping[str, float]) -> dict[str, object]:
    """The fields of the periodic `stats` line (and the last, `stopped`): the snapshot with
    the identity's terms (`events_unaccounted` 0 at rest) and the flags as booleans."""
    fields: dict[str, object] = {**snapshot, **balance(snapshot)}
    for flag in FLAGS:
        if flag in fields:
            fields[flag] = bool(fields[flag])
    return fields
