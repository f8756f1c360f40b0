"""The benchmark's input: rsyslog's default forward format, octet-counted, written once to a file.

    <134>Nov 26 21:58:51 lb1 haproxy[4242]: <HAProxy HTTP log line>

HAProxy lines (devtools.traffic.httplog_line) follow the default `option httplog` format with
captured request headers, so each carries a 9-digit sequence number `|r000123456}` that the
intake uses for the latency measurement.  Client IPs, ports, frontends, servers, timers,
status codes, sizes, termination states, methods and paths vary; the MSG part is 200-260
bytes, the frame about 240-300.  About 10 % of the messages come from other programs
(sshd, CRON, systemd, postfix, kernel) and must be filtered out.
"""

from __future__ import annotations

import json
import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from devtools.traffic import (
    httplog_line,
    octet_frame,
    other_program_line,
    syslog_time,
    traditional,
)

#: Bump when the stream's bytes change, so cached streams are rewritten.
STREAM_VERSION = 2


def frame(seq: int, t: int, rng: random.Random, other: bool) -> bytes:
    if other:
        prog, msg = other_program_line(rng)
        return traditional(prog, msg, pri=86, ts=syslog_time(t), pid=rng.randrange(300, 99999))
    return traditional("haproxy", httplog_line(rng, seq, t), ts=syslog_time(t))


@dataclass
class Stream:
    path: Path
    count: int  # frames
    haproxy: int  # frames that must reach the intake
    size: int  # bytes
    offsets: array[int]  # byte offset of frame i; offsets[count] == size
    msg_bytes_avg: float  # average HAProxy MSG length


def write_stream(path: Path, count: int, seed: int = 4242, rate: int = 20_000) -> Stream:
    """Write `count` octet-counted frames; the syslog clock advances `rate` frames a second."""
    rng = random.Random(seed)
    offsets = array("Q", [0])
    haproxy = 0
    msg_total = 0
    pos = 0
    t0 = 21 * 3600 + 58 * 60
    chunks: list[bytes] = []
    with path.open("wb") as f:
        for seq in range(count):
            other = rng.random() < 0.10
            fr = frame(seq, t0 + seq // rate, rng, other)
            if not other:
                haproxy += 1
                msg_total += len(fr) - fr.index(b"]: ") - 3
            rec = octet_frame(fr)
            chunks.append(rec)
            pos += len(rec)
            offsets.append(pos)
            if len(chunks) >= 4096:
                f.write(b"".join(chunks))
                chunks.clear()
        f.write(b"".join(chunks))
    return Stream(path, count, haproxy, pos, offsets, msg_total / max(1, haproxy))


def load_stream(frames: int, cache: Path) -> Stream:
    """Written once into `cache` (~70 MB for 300k frames) and reused."""
    path = cache / f"stream-{frames}-v{STREAM_VERSION}.bin"
    meta = path.with_suffix(".json")
    idx = path.with_suffix(".idx")
    if path.exists() and meta.exists() and idx.exists():
        m = json.loads(meta.read_text())
        offsets = array("Q")
        offsets.frombytes(idx.read_bytes())
        if m.get("size") == path.stat().st_size and len(offsets) == frames + 1:
            return Stream(path, frames, m["haproxy"], m["size"], offsets, m["msg_bytes_avg"])
    cache.mkdir(parents=True, exist_ok=True)
    s = write_stream(path, frames)
    idx.write_bytes(s.offsets.tobytes())
    meta.write_text(json.dumps({"haproxy": s.haproxy, "size": s.size,
                                "msg_bytes_avg": s.msg_bytes_avg}))
    return s


def spool_batches(count: int, per_batch: int,
                  seed: int = 99) -> Iterator[tuple[list[str], list[str]]]:
    """(events, times) lists as the daemon would have spooled them: MSG text, ISO times;
    made one batch at a time (2M events at once would be half a GiB of strings)."""
    rng = random.Random(seed)
    seq = 0
    for b in range(count):
        ts = f"2026-11-26T21:{58 + b // 60 % 2:02d}:{b % 60:02d}.000Z"
        events = []
        for _ in range(per_batch):
            events.append(httplog_line(rng, seq, 79_080 + b))
            seq += 1
        yield events, [ts] * per_batch
