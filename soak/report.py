"""The soak's printed figures: per cause, per run, and the verdict."""

from __future__ import annotations

from typing import Any, Protocol

from .ledger import DeadLetter, Report, RunInfo
from .metrics import Scrape
from .spoolfault import Flip


class Soak(Protocol):
    """What the report reads of a finished soak (run.Soak): a protocol, so this module does
    not import the one that calls it."""

    seed: int
    seconds: float
    runs: list[RunInfo]
    flips: list[Flip]
    replayed: list[DeadLetter]
    tmpfs_used: bool
    code: str
    final: Scrape | None
    intake: Any  # a SoakIntake: answers, delivered_events()


def _runs(soak: Soak) -> list[str]:
    lines = ["per run (final counters: the `stopped` line, else the last /metrics before "
             "the kill):",
             "  run end    accepted recovered delivered dead-let. dropped udp_drop kern_drop "
             "uncertain  spool"]
    for r in soak.runs:
        sp = r.config["spool"]
        lines.append(
            f"  {r.index:3d} {r.end:<6} {r.counter('accepted_events'):9d} "
            f"{r.counter('spool_recovered_events'):9d} {r.counter('delivered_events'):9d} "
            f"{r.counter('dead_lettered_events'):9d} {r.counter('dropped_events'):7d} "
            f"{r.counter('udp_dropped'):8d} {r.counter('udp_kernel_dropped'):9d} "
            f"{r.counter('uncertain_deliveries'):9d}  {sp['mode']}/{sp['when_full']}/"
            f"{sp['max_size'] // 1024}K" + (f"  then flip {r.flip.describe()}" if r.flip else ""))
    total = {name: sum(r.counter(name) for r in soak.runs) for name in (
        "accepted_events", "spool_recovered_events", "delivered_events", "dead_lettered_events",
        "dropped_events", "uncertain_deliveries", "requeued_events")}
    lines.append(f"  sum        {total['accepted_events']:9d} {total['spool_recovered_events']:9d} "
                 f"{total['delivered_events']:9d} {total['dead_lettered_events']:9d} "
                 f"{total['dropped_events']:7d}   (re-queued dead letters: "
                 f"{total['requeued_events']})")
    at_intake = soak.intake.delivered_events()
    lines.append(f"  the intake took {at_intake} events in 2xx answers, the daemons counted "
                 f"{total['delivered_events']} delivered: {at_intake - total['delivered_events']}"
                 f" taken without the daemon hearing the answer (uncertain deliveries: "
                 f"{total['uncertain_deliveries']} requests) or after the last scrape of a "
                 f"killed run")
    return lines


def render(rep: Report, soak: Soak, wall: float) -> str:
    sent = sum(rep.sent.values())
    out = [
        "",
        "=" * 78,
        f"soak ledger: seed {soak.seed}, {soak.seconds / 60:g} min of faults, "
        f"{wall:.0f} s wall, {len(soak.runs)} daemon runs "
        f"({sum(1 for r in soak.runs if r.end == 'kill')} kill -9, "
        f"{sum(1 for r in soak.runs if r.end == 'term')} SIGTERM, "
        f"{sum(r.reloads for r in soak.runs)} SIGHUP, {len(soak.flips)} flipped bytes, "
        f"{len(soak.replayed)} dead letters replayed), "
        f"tmpfs {'8 MiB' if soak.tmpfs_used else 'no (spool on disk)'}; code {soak.code}",
        f"sent: {sent} events ({', '.join(f'{k} {v}' for k, v in rep.sent.items())}); "
        f"part of a failed write: {sum(rep.maybe.values())}",
        f"intake answers (requests by status): "
        f"{dict(sorted(soak.intake.answers.items()))}",
        f"delivered exactly once: {rep.delivered_once}",
        f"delivered or dead-lettered more than once: {rep.duplicated_events} events, "
        f"{sum(rep.extra_copies.values())} extra copies: {dict(rep.extra_copies)}",
        f"dead-lettered: {sum(rep.dead_lettered.values())} lines "
        f"{dict(rep.dead_lettered)}; for a 400 no body answered 400 carried: "
        f"{rep.dead_letter_not_carried}",
        f"missing: {sum(rep.missing_by_source.values())} "
        f"({dict(rep.missing_by_source)}), by cause:",
    ]
    for cause, n in sorted(rep.missing.items()):
        bound = rep.bounds.get(cause)
        extra = f" (bound: {bound[1]})" if bound else ""
        out.append(f"  {cause:<16} {n:8d}{extra}")
    out.append(f"daemon drop counters over all runs: {rep.drops}; beside the identity: "
               f"{rep.udp_counters}")
    if soak.final is not None:
        out.append(f"identity on /metrics after the final drain: {soak.final.identity()}")
    out += _runs(soak)
    out.append(f"delivered but never sent: {rep.phantom}; altered text: {rep.altered}; "
               f"events without a soak id: {rep.foreign}")
    for what, examples in rep.examples.items():
        out.append(f"examples, {what}:")
        out += [f"  {e}" for e in examples]
    for p in rep.problems:
        out.append(f"PROBLEM: {p}")
    total_unacc = sum(rep.unaccounted.values())
    out.append(f"UNACCOUNTED: {total_unacc} {dict(rep.unaccounted) if total_unacc else ''}")
    out.append(f"verdict: {'FAIL' if rep.failed else 'PASS'} "
               f"(reproduce: make soak SOAK_ARGS=\"--minutes {soak.seconds / 60:g} "
               f"--seed {soak.seed}\")")
    out.append("=" * 78)
    return "\n".join(out)
