"""DeadLetters (sinks/deadletter.py): the bound follows the folder, not a count kept in memory.

`spool replay-dead-letter` (another process) renames the files into requeue/ while the daemon
runs; the daemon's bound must see the folder emptied (issue 17: it kept counting them, and
dropped new refusals as `dead_letter_full` into an empty folder)."""

from __future__ import annotations

import time
from pathlib import Path

from haproxy_forwarder.batching import Batch
from haproxy_forwarder.sinks.deadletter import DeadLetters, dead_letter_lines, read_dead_letters

AT = time.gmtime(0)
REASON = "intake answered 400"


def batch(tag: str, n: int, pad: int = 100) -> Batch:
    texts = [f"{tag} {i} " + "p" * pad for i in range(n)]
    return Batch.from_events(texts, ["2026-01-01T00:00:00Z"] * n)


def line_bytes(b: Batch) -> int:
    return len(dead_letter_lines(b, REASON, 400, "no", AT))


def events_in(dead: DeadLetters) -> list[str]:
    return [e for p in dead.files() for e, _ in read_dead_letters(p)]


def replay(dead: DeadLetters) -> list[Path]:
    """What `spool replay-dead-letter` does: rename every file into requeue/."""
    requeue = dead.dir.parent / "requeue"
    requeue.mkdir(exist_ok=True)
    moved = []
    for p in dead.files():
        moved.append(p.rename(requeue / f"{p.stem}-{time.time_ns()}.jsonl"))
    return moved


def test_the_bound_sees_files_moved_away_by_replay(tmp_path: Path) -> None:
    first, second = batch("first", 30), batch("second", 30)
    dead = DeadLetters(tmp_path, max_size=line_bytes(first) + line_bytes(second) // 2)
    assert dead.write(first, REASON, 400, "no", at=AT) is not None
    assert dead.size() == line_bytes(first)
    moved = replay(dead)
    assert dead.size() == 0 and len(moved) == 1
    # The folder is empty: the second refusal fits and is kept, not dropped.
    path = dead.write(second, REASON, 400, "no", at=AT)
    assert path is not None
    assert events_in(dead) == second.events()
    assert dead.size() == line_bytes(second)


def test_still_refused_when_the_folder_is_really_full(tmp_path: Path) -> None:
    first, second = batch("first", 30), batch("second", 30)
    dead = DeadLetters(tmp_path, max_size=line_bytes(first) + line_bytes(second) // 2)
    assert dead.write(first, REASON, 400, "no", at=AT) is not None
    assert dead.write(second, REASON, 400, "no", at=AT) is None
    assert events_in(dead) == first.events()
    # Refused as many times as asked, without writing anything.
    assert dead.write(second, REASON, 400, "no", at=AT) is None
    assert events_in(dead) == first.events()


def test_files_written_beside_the_daemon_count_once_it_matters(tmp_path: Path) -> None:
    """Another file appearing in the folder (a copy put back by hand) counts against the bound
    as soon as a write would pass it."""
    first, second = batch("first", 20), batch("second", 20)
    dead = DeadLetters(tmp_path, max_size=line_bytes(first) * 2 + line_bytes(second) // 2)
    assert dead.write(first, REASON, 400, "no", at=AT) is not None
    extra = dead.dir / "dead-letter-19700102.jsonl"
    extra.write_bytes(dead.files()[0].read_bytes())
    assert dead.size() == 2 * line_bytes(first)
    assert dead.write(second, REASON, 400, "no", at=AT) is None
